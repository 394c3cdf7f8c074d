"""Rank-agnostic tensor helpers shared by every layer."""

from __future__ import annotations

import numpy as np
import torch


def expand_like(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample value ``v`` (shape (B,) or scalar) to broadcast against ``x``.

    ``x`` has the batch first and any number of further dims: (B,C,H,W) images,
    (B,C,D,H,W) volumes, (B,N,3) point clouds. Returns ``v`` viewed as (B,1,...,1).
    """
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v.reshape((1,) * x.ndim)
    return v.reshape(v.shape[0], *((1,) * (x.ndim - 1)))


def as_tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``a`` as a torch tensor of ``dtype`` (no copy when it already is one)."""
    if isinstance(a, torch.Tensor):
        return a.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype matching a real float dtype (float32 -> complex64)."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64
