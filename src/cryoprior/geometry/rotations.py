"""Rotations: matrices, quaternions, RELION ZYZ Euler angles, uniform SO(3), Kabsch.

Convention: a pose R maps volume coordinates (x, y, z) to the microscope frame,
r_mic = R @ r_vol; the image is the integral of the rotated volume along z_mic.
RELION's Euler angles (rot, tilt, psi) give R = Rz(psi) Ry(tilt) Rz(rot) written with
RELION's passive elementary rotations (relion src/euler.cpp, Euler_angles2matrix).
All angles here are in radians.
"""

from __future__ import annotations

import math

import torch


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """RELION (rot, tilt, psi) in radians, shape (..., 3) -> rotation matrices (..., 3, 3)."""
    a, b, g = angles.unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_euler(R: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> RELION (rot, tilt, psi) in radians, tilt in [0, pi].

    Inverse of :func:`euler_to_matrix` up to the usual gimbal ambiguity at tilt 0 or pi,
    where rot is set to 0 and the whole in-plane angle goes to psi.
    """
    R = R.to(torch.float64) if R.dtype not in (torch.float32, torch.float64) else R
    sb = torch.sqrt(R[..., 0, 2] ** 2 + R[..., 1, 2] ** 2)
    tilt = torch.atan2(sb, R[..., 2, 2])
    regular = sb > eps
    rot = torch.where(regular, torch.atan2(R[..., 2, 1], R[..., 2, 0]), torch.zeros_like(sb))
    psi_regular = torch.atan2(R[..., 1, 2], -R[..., 0, 2])
    # tilt ~ 0: R = Rz(psi + rot); tilt ~ pi: R00 = -cos(psi - rot), R01 = sin(psi - rot).
    psi_up = torch.atan2(R[..., 0, 1], R[..., 0, 0])
    psi_down = torch.atan2(R[..., 0, 1], -R[..., 0, 0])
    psi = torch.where(regular, psi_regular, torch.where(R[..., 2, 2] > 0, psi_up, psi_down))
    return torch.stack([rot, tilt, psi], -1)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (..., 4) as (w, x, y, z) -> active rotation matrices (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (w, x, y, z) with w >= 0.

    Uses the largest-diagonal branch (Shepperd 1978) for numerical stability.
    """
    m = R
    t = torch.stack(
        [
            1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2],
            1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
            1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2],
            1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2],
        ],
        -1,
    )
    k = t.argmax(-1, keepdim=True)
    s = torch.sqrt(t.gather(-1, k).clamp_min(1e-12)).squeeze(-1) * 2  # s = 4 * |component|
    cands = torch.stack(
        [
            torch.stack(
                [
                    s / 4,
                    (m[..., 2, 1] - m[..., 1, 2]) / s,
                    (m[..., 0, 2] - m[..., 2, 0]) / s,
                    (m[..., 1, 0] - m[..., 0, 1]) / s,
                ],
                -1,
            ),
            torch.stack(
                [
                    (m[..., 2, 1] - m[..., 1, 2]) / s,
                    s / 4,
                    (m[..., 0, 1] + m[..., 1, 0]) / s,
                    (m[..., 0, 2] + m[..., 2, 0]) / s,
                ],
                -1,
            ),
            torch.stack(
                [
                    (m[..., 0, 2] - m[..., 2, 0]) / s,
                    (m[..., 0, 1] + m[..., 1, 0]) / s,
                    s / 4,
                    (m[..., 1, 2] + m[..., 2, 1]) / s,
                ],
                -1,
            ),
            torch.stack(
                [
                    (m[..., 1, 0] - m[..., 0, 1]) / s,
                    (m[..., 0, 2] + m[..., 2, 0]) / s,
                    (m[..., 1, 2] + m[..., 2, 1]) / s,
                    s / 4,
                ],
                -1,
            ),
        ],
        -2,
    )
    q = cands.gather(-2, k.unsqueeze(-1).expand(*k.shape[:-1], 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` rotation matrices drawn uniformly (Haar) from SO(3); det = +1 always.

    Normalised 4-D Gaussian vectors are uniform on S^3, hence uniform unit quaternions.
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return quaternion_to_matrix(q).to(dtype)


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (..., 3) (axis * angle in radians) -> matrices, by Rodrigues' formula.

    Differentiable at v = 0 (uses the Taylor series of sin(t)/t and (1-cos t)/t^2).
    """
    theta2 = (v * v).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2.clamp_min(1e-24))
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-24))
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(K.shape)
    return eye + a[..., None] * K + b[..., None] * (K @ K)


def rotation_angle(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in radians between rotations (..., 3, 3): angle of R1ᵀ R2."""
    tr = (R1.transpose(-1, -2) @ R2).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.arccos(((tr - 1) / 2).clamp(-1.0, 1.0))


def rotation_about_axis(
    axis: str, angle: float, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Active rotation matrix by ``angle`` radians about 'x', 'y' or 'z'."""
    c, s = math.cos(angle), math.sin(angle)
    m = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }[axis]
    return torch.tensor(m, dtype=dtype)


def kabsch(
    P: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best proper rotation R and translation t with R p_i + t ≈ q_i (least squares).

    P, Q: (..., N, 3); mask: (..., N) of 0/1 weights. Returns R (..., 3, 3), t (..., 3).
    The reflection case is excluded (det R = +1), as in Kabsch 1976 with the sign fix.
    """
    w = torch.ones(P.shape[:-1], dtype=P.dtype, device=P.device) if mask is None else mask
    w = w.to(P.dtype).unsqueeze(-1)
    n = w.sum(-2, keepdim=True).clamp_min(1e-12)
    p0 = (P * w).sum(-2, keepdim=True) / n
    q0 = (Q * w).sum(-2, keepdim=True) / n
    H = ((P - p0) * w).transpose(-1, -2) @ (Q - q0)
    U, _, Vt = torch.linalg.svd(H)
    d = torch.sign(torch.linalg.det(Vt.transpose(-1, -2) @ U.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vt.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    t = q0.squeeze(-2) - (R @ p0.transpose(-1, -2)).squeeze(-1)
    return R, t
