"""Seeding, thread count and progress bars: the run-time knobs every entry point shares."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def set_threads(n: int | None) -> None:
    """Set torch's intra-op thread count (None leaves the default)."""
    if n is not None and n > 0:
        torch.set_num_threads(int(n))


def progress(it: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool = True) -> Iterator[T]:
    """Wrap ``it`` in a tqdm progress bar on stderr (silent when ``enabled`` is False)."""
    if not enabled:
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5)
