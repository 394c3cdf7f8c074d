"""Matching clouds of unlabelled points: optimal assignment, superposition, averaging.

Two clouds of the same N points whose order carries no meaning (Cα clouds from a likelihood
or a permutation-equivariant prior) are compared under the assignment that minimises the
summed squared distance (Hungarian algorithm), alternated with the Kabsch superposition.
Distances in the clouds' units (Å for Cα clouds).
"""

from __future__ import annotations

import torch

from cryoprior.core.errors import require
from cryoprior.geometry.rotations import kabsch


def _assignment(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """perm with p[perm[i]] matched to q[i], minimising Σ ‖p[perm[i]] − q[i]‖² (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(q.double(), p.double()).pow(2).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, dtype=torch.long, device=p.device)


def _superpose(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p rigidly superposed on q (Kabsch, proper rotation)."""
    R, t = kabsch(p.double(), q.double())
    return (p.double() @ R.T + t).to(p.dtype)


def match_cloud(
    p: torch.Tensor, q: torch.Tensor, n_iter: int = 10, superpose: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder (and superpose) cloud ``p`` (N, 3) onto ``q`` (N, 3): returns (p', perm).

    Alternates the optimal assignment (Hungarian algorithm on squared distances) with the
    Kabsch superposition of the matched pairs, starting from the given frame, until the
    assignment stops changing (an ICP with exact assignments). ``p'`` is ``p[perm]``
    superposed on ``q`` (or only reordered when ``superpose`` is False).
    """
    require(
        p.ndim == 2 and p.shape == q.shape and p.shape[-1] == 3,
        f"clouds must both be (N, 3), got {tuple(p.shape)} and {tuple(q.shape)}",
    )
    perm = _assignment(p, q)
    if not superpose:
        return p[perm], perm
    for _ in range(int(n_iter)):
        R, t = kabsch(p[perm].double(), q.double())
        new = _assignment(p.double() @ R.T + t, q)
        if bool((new == perm).all()):
            break
        perm = new
    return _superpose(p[perm], q), perm


def matched_kabsch_rmsd(p: torch.Tensor, q: torch.Tensor, superpose: bool = True) -> float:
    """RMSD (Å) between clouds ``p`` and ``q`` (N, 3) under the best residue assignment.

    With ``superpose`` the Kabsch RMSD after :func:`match_cloud` (assignment and rigid
    superposition); without, the RMSD in the given frame under the optimal assignment.
    """
    moved, _ = match_cloud(p, q, superpose=superpose)
    return float(((moved.double() - q.double()) ** 2).sum(-1).mean().sqrt())


def average_clouds(
    samples: torch.Tensor, reference: int = 0, n_iter: int = 3, align: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of clouds (S, N, 3) whose points are unlabelled: (mean, matched samples, spread).

    Each sample is matched (Hungarian assignment, then Kabsch superposition when ``align``)
    to the reference (first ``samples[reference]``, then the current mean, ``n_iter``
    rounds) and the matched samples are averaged. ``spread`` (N,) is the RMS distance (Å)
    of the matched samples from the mean, per point (0 for one sample).
    """
    require(
        samples.ndim == 3 and samples.shape[-1] == 3 and samples.shape[0] >= 1,
        f"samples must be (S, N, 3), got {tuple(samples.shape)}",
    )
    ref = samples[int(reference)]
    matched = samples
    for _ in range(max(1, int(n_iter))):
        matched = torch.stack([match_cloud(s, ref, superpose=align)[0] for s in samples])
        ref = matched.mean(0)
    spread = ((matched - ref) ** 2).sum(-1).mean(0).sqrt()
    return ref, matched, spread


__all__ = ["average_clouds", "match_cloud", "matched_kabsch_rmsd"]
