"""Shared test settings: float64 where physics is pinned, few threads, fixed seeds."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny ops are faster single-threaded; CI has 2 cores


@pytest.fixture
def gen() -> torch.Generator:
    """A torch Generator with a fixed seed."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g
