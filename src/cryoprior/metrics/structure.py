"""Structure metrics on coordinates (Å): RMSD with and without superposition, Rg."""

from __future__ import annotations

import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import kabsch


def _weights(
    coords: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    if coords.ndim < 2 or coords.shape[-1] != 3:
        raise InputError(f"coordinates must have shape (..., N, 3), got {tuple(coords.shape)}")
    w = torch.ones(coords.shape[:-1], dtype=coords.dtype, device=coords.device)
    for extra in (mask, weights):
        if extra is not None:
            w = w * torch.as_tensor(extra, device=coords.device).to(coords.dtype)
    w = torch.broadcast_to(w, coords.shape[:-1])
    if bool((w.sum(-1) <= 0).any()):
        raise InputError("no atoms selected (mask/weights sum to 0)")
    return w


def rmsd(P: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Root-mean-square deviation in Å between (..., N, 3) coordinate sets, no alignment.

    ``mask`` (..., N) selects (or weights) atoms. Returns shape (...).
    """
    if P.shape != Q.shape:
        raise InputError(f"RMSD needs equal shapes, got {tuple(P.shape)} and {tuple(Q.shape)}")
    w = _weights(P, mask)
    d2 = ((P - Q) ** 2).sum(-1)
    return torch.sqrt((w * d2).sum(-1) / w.sum(-1))


def kabsch_rmsd(P: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMSD in Å after the optimal proper rigid superposition of P onto Q (Kabsch 1976).

    P, Q (..., N, 3); ``mask`` (..., N) selects the atoms used both to fit and to score.
    Batched over leading dims; returns shape (...). Reflections are not allowed.
    """
    if P.shape != Q.shape:
        raise InputError(f"RMSD needs equal shapes, got {tuple(P.shape)} and {tuple(Q.shape)}")
    w = _weights(P, mask)
    R, t = kabsch(P, Q, w)
    aligned = P @ R.transpose(-1, -2) + t.unsqueeze(-2)
    return rmsd(aligned, Q, w)


def radius_of_gyration(
    coords: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Radius of gyration in Å: sqrt(sum w |r - r_mean|^2 / sum w), r_mean weighted.

    ``mask`` and ``weights`` (..., N) multiply (e.g. atomic masses as weights).
    """
    w = _weights(coords, mask, weights)
    wsum = w.sum(-1, keepdim=True)
    centre = (w.unsqueeze(-1) * coords).sum(-2, keepdim=True) / wsum.unsqueeze(-1)
    d2 = ((coords - centre) ** 2).sum(-1)
    return torch.sqrt((w * d2).sum(-1) / wsum.squeeze(-1))
