"""Seeding, thread count and progress bars: the run-time knobs every entry point shares."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- seeds legacy global users too
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def set_threads(n: int | None) -> None:
    """Set torch's intra-op thread count (None leaves the default)."""
    if n is not None and n > 0:
        torch.set_num_threads(int(n))


def progress(
    it: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterable[T]:
    """``it`` wrapped in a tqdm progress bar on stderr, or ``it`` itself when not enabled.

    The tqdm object is returned, so callers may use ``set_postfix`` on it (guard with
    ``hasattr``: a disabled bar is the plain iterable).
    """
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
