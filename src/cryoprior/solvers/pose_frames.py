"""Frames of estimated poses: perturbation, alignment to reference poses, pose errors.

Poses estimated against a map are only defined up to the map's rigid motion: a map
V(Aᵀ(r − c)) with poses R_i Aᵀ and shifts s_i + (R_i Aᵀ c)_xy explains the images equally
well. :func:`global_alignment` finds (A, c) against reference poses, :func:`align_poses`
applies it, :func:`pose_errors` reports errors before and after; :func:`perturb_poses`
moves poses by a set angle and shift (for experiments).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoprior.core.errors import require
from cryoprior.geometry.rotations import axis_angle_to_matrix, rotation_angle


def perturb_poses(
    rotations: torch.Tensor,
    shifts: torch.Tensor | np.ndarray,
    angle_deg: float,
    shift_angstrom: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses moved by exactly ``angle_deg`` about uniformly random axes (for experiments).

    R' = exp(θ u) R with u uniform on the sphere and θ = angle_deg; shifts (Å) move by
    ``shift_angstrom`` in a uniformly random in-plane direction. Returns (N,3,3) float64
    rotations and (N,2) float64 shifts.
    """
    require(angle_deg >= 0 and shift_angstrom >= 0, "perturbations must be >= 0")
    rot = torch.as_tensor(rotations, dtype=torch.float64)
    sh = torch.as_tensor(np.asarray(shifts), dtype=torch.float64)
    n = rot.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    axis = torch.randn(n, 3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    phi = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    moved = axis_angle_to_matrix(axis * math.radians(angle_deg)) @ rot
    step = shift_angstrom * torch.stack([torch.cos(phi), torch.sin(phi)], -1)
    return moved, sh + step


def _project_to_rotation(m: torch.Tensor) -> torch.Tensor:
    """The rotation nearest to a 3×3 matrix (SVD, det = +1)."""
    u, _, vt = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return u @ fix @ vt


def _robust_frame(
    m: torch.Tensor, inlier_deg: float = 15.0, candidates: int = 64, seed: int = 0
) -> torch.Tensor:
    """The frame A of per-particle frames m_i = R_ref,iᵀ R_i (n, 3, 3), robust to
    particles in another frame (RANSAC): of the plain mean's rotation and ``candidates``
    of the m_i themselves, the one within ``inlier_deg`` of most m_i, refined to the
    rotation nearest the mean of those inliers. When most particles agree this is the
    least-squares frame of the plain mean; when a share of them locks onto a
    (pseudo-)symmetric copy the plain mean falls between the two frames and would
    misstate every error."""
    n = m.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    picks = torch.randperm(n, generator=g)[: min(int(candidates), n)]
    cands = torch.cat([_project_to_rotation(m.mean(0))[None], m[picks]])
    limit = math.radians(inlier_deg)
    best, best_count = cands[0], -1
    for c in cands:
        count = int((rotation_angle(m, c.expand_as(m)) <= limit).sum())
        if count > best_count:
            best, best_count = c, count
    for _ in range(3):  # refine on the inliers of the current frame
        keep = rotation_angle(m, best.expand_as(m)) <= limit
        if int(keep.sum()) < 3:
            break
        best = _project_to_rotation(m[keep].mean(0))
    return best


def global_alignment(
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    ref_rotations: torch.Tensor,
    ref_shifts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rigid motion (A, c) relating an estimated frame to a reference one.

    A: the rotation with R_i ≈ R_ref,i A (least squares: the rotation nearest to
    mean_i R_ref,iᵀ R_i over the particles that agree on it; :func:`_robust_frame`).
    c (Å, (x, y, z)): least-squares solution of s_ref,i - s_i = (R_i Aᵀ c)_xy over all
    particles. The estimated map V corresponds to the reference-frame map V(Aᵀ(r - c))
    (e.g. :func:`cryoprior.solvers.mfn_render.render_aligned`), the poses to
    (R_i Aᵀ, s_i + (R_i Aᵀ c)_xy) (:func:`align_poses`).
    """
    r = torch.as_tensor(rotations, dtype=torch.float64)
    rr = torch.as_tensor(ref_rotations, dtype=torch.float64)
    a = _robust_frame(rr.transpose(-1, -2) @ r)
    aligned = r @ a.T
    rows = aligned[:, :2, :].reshape(-1, 3)
    rhs = (
        torch.as_tensor(ref_shifts, dtype=torch.float64)
        - torch.as_tensor(shifts, dtype=torch.float64)
    ).reshape(-1, 1)
    c = torch.linalg.lstsq(rows, rhs).solution.reshape(3)
    return a, c


def align_poses(
    rotations: torch.Tensor, shifts: torch.Tensor, a: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses in the reference frame of :func:`global_alignment`: (R Aᵀ, s + (R Aᵀ c)_xy)."""
    r = torch.as_tensor(rotations, dtype=torch.float64) @ a.to(torch.float64).T
    s = torch.as_tensor(shifts, dtype=torch.float64) + (r @ c.to(torch.float64))[:, :2]
    return r, s


def pose_errors(
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    ref_rotations: torch.Tensor,
    ref_shifts: torch.Tensor,
    align: bool = True,
) -> dict[str, float]:
    """Per-particle pose errors against reference poses, summarised.

    Angle: geodesic angle between R_i and R_ref,i in degrees (mean, median, and the
    fraction within 10°); shift: |s_i - s_ref,i| in Å.
    With ``align`` the global rigid motion of :func:`global_alignment` is removed first
    (and its rotation angle in degrees and translation in Å are reported).
    """
    r = torch.as_tensor(rotations, dtype=torch.float64)
    s = torch.as_tensor(shifts, dtype=torch.float64)
    out: dict[str, float] = {}
    if align:
        a, c = global_alignment(r, s, ref_rotations, ref_shifts)
        r, s = align_poses(r, s, a, c)
        out["frame_rotation_deg"] = math.degrees(
            float(rotation_angle(a, torch.eye(3, dtype=torch.float64)))
        )
        out["frame_translation_angstrom"] = float(c.norm())
    ang = torch.rad2deg(rotation_angle(r, torch.as_tensor(ref_rotations, dtype=torch.float64)))
    dist = (s - torch.as_tensor(ref_shifts, dtype=torch.float64)).norm(dim=-1)
    out.update(
        mean_angle_deg=float(ang.mean()),
        median_angle_deg=float(ang.median()),
        within_10_deg=float((ang <= 10.0).double().mean()),
        mean_shift_angstrom=float(dist.mean()),
        median_shift_angstrom=float(dist.median()),
    )
    return out


__all__ = ["align_poses", "global_alignment", "perturb_poses", "pose_errors"]
