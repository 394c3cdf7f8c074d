"""Masked (weighted) Pearson correlation between maps or images."""

from __future__ import annotations

import torch

from cryoprior.core.errors import InputError


def masked_correlation(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, ndim: int | None = None
) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` within ``mask``, centred and normalised.

    With weights w (the mask; soft values allowed, 0 excludes a voxel):
    mean_a = sum w a / sum w, cov = sum w (a - mean_a)(b - mean_b), and
    corr = cov / sqrt(var_a var_b). The sums run over the last ``ndim`` dims (all dims by
    default), so batched inputs (B, ...) give one value per sample. Returns a tensor;
    0 where either input is constant within the mask.
    """
    if a.shape != b.shape:
        raise InputError(
            f"correlation needs inputs of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    nd = a.ndim if ndim is None else int(ndim)
    if not 1 <= nd <= a.ndim:
        raise InputError(f"ndim must be in 1..{a.ndim}, got {ndim}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    x, y = a.to(dtype), b.to(dtype)
    w = torch.ones_like(x) if mask is None else torch.as_tensor(mask, device=x.device).to(dtype)
    if mask is not None and bool((w < 0).any()):
        raise InputError("mask weights must be >= 0")
    w = torch.broadcast_to(w, x.shape)
    dims = tuple(range(x.ndim - nd, x.ndim))
    wsum = w.sum(dims, keepdim=True)
    if bool((wsum <= 0).any()):
        raise InputError("the mask is empty (all weights 0): nothing to correlate")
    xc = x - (w * x).sum(dims, keepdim=True) / wsum
    yc = y - (w * y).sum(dims, keepdim=True) / wsum
    cov = (w * xc * yc).sum(dims)
    var = (w * xc * xc).sum(dims) * (w * yc * yc).sum(dims)
    return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), torch.zeros_like(cov))
