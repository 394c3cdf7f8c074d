"""Figures of training and sampling: the loss curve and image grids (written atomically,
with the Agg canvas directly: no pyplot, no global matplotlib state)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from cryoprior.core.files import atomic_path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(
    records: Iterable[Mapping[str, Any]], path: str | os.PathLike, title: str = "training loss"
) -> Path:
    """Plot train loss (and validation loss where present) against step into a PNG.

    ``records`` are metrics rows with ``step`` and ``train_loss`` and/or ``val_loss``. Uses
    the Agg canvas directly (no pyplot, no global backend switch); the file is written
    atomically. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), lw=1.2, label="train (mean since last log)")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.2, ms=3, label="validation (EMA weights)")
    positive = [v for _, v in train + val]
    if positive and min(positive) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    ncols: int | None = None,
    title: str | None = None,
) -> Path:
    """Save images (n, H, W) or (n, 1, H, W) as one PNG grid, atomically.

    Grey scale from the smallest to the largest value over all images (one shared scale,
    so the images are comparable); ``ncols`` defaults to ceil(sqrt(n)). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = images.detach().to("cpu", torch.float32)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must be (n, H, W) or (n, 1, H, W), got {tuple(images.shape)}")
    n, h, w = x.shape
    ncols = int(ncols or math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    lo, hi = float(x.min()), float(x.max())
    fig = Figure(figsize=(1.2 * ncols, 1.2 * nrows + (0.4 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_axis_off()
        if i < n:
            ax.imshow(
                x[i].numpy(),
                cmap="gray",
                vmin=lo,
                vmax=hi if hi > lo else lo + 1,
                origin="upper",
                interpolation="nearest",
            )
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
