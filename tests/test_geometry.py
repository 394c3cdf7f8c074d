"""Pins the geometric conventions: Euler angles (RELION ZYZ), quaternions, SO(3) sampling,
Kabsch, centred grids and centred FFTs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.geometry import fft, grids, rotations


def test_euler_matches_relion_formula_at_known_angles():
    # RELION Euler_angles2matrix for rot=30, tilt=60, psi=45 degrees, written out by hand.
    a, b, g = map(math.radians, (30.0, 60.0, 45.0))
    ca, sa, cb, sb, cg, sg = (
        math.cos(a),
        math.sin(a),
        math.cos(b),
        math.sin(b),
        math.cos(g),
        math.sin(g),
    )
    expected = np.array(
        [
            [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
            [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
            [sb * ca, sb * sa, cb],
        ]
    )
    R = rotations.euler_to_matrix(torch.tensor([a, b, g], dtype=torch.float64))
    np.testing.assert_allclose(R.numpy(), expected, atol=1e-12)


def test_euler_is_passive_zyz_composition():
    # R(rot, tilt, psi) = Rz(psi)^T-style passive composition: equals the transpose of the
    # active rotation Rz(rot) Ry(tilt) Rz(psi).
    rot, tilt, psi = 0.3, 1.1, -0.7
    Rz = lambda t: rotations.rotation_about_axis("z", t)  # noqa: E731
    Ry = lambda t: rotations.rotation_about_axis("y", t)  # noqa: E731
    active = Rz(rot) @ Ry(tilt) @ Rz(psi)
    R = rotations.euler_to_matrix(torch.tensor([rot, tilt, psi], dtype=torch.float64))
    torch.testing.assert_close(R, active.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euler_matrix_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    R = rotations.random_rotations(500, g, dtype=dtype)
    R2 = rotations.euler_to_matrix(rotations.matrix_to_euler(R))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (R2 - R).abs().max() < tol
    e = rotations.matrix_to_euler(R)
    assert (e[:, 1] >= 0).all() and (e[:, 1] <= math.pi + 1e-6).all()


@pytest.mark.parametrize("tilt", [0.0, math.pi])
def test_euler_gimbal_lock(tilt):
    e = torch.tensor([[0.4, tilt, 1.3]], dtype=torch.float64)
    R = rotations.euler_to_matrix(e)
    assert (rotations.euler_to_matrix(rotations.matrix_to_euler(R)) - R).abs().max() < 1e-10


def test_quaternion_round_trip_and_axis_angle():
    g = torch.Generator().manual_seed(1)
    R = rotations.random_rotations(300, g, dtype=torch.float64)
    q = rotations.matrix_to_quaternion(R)
    assert (q[:, 0] >= 0).all()
    assert (rotations.quaternion_to_matrix(q) - R).abs().max() < 1e-10
    # 90 degrees about z as a quaternion and as a rotation vector.
    qz = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    Rz = rotations.rotation_about_axis("z", math.pi / 2)
    assert (rotations.quaternion_to_matrix(qz) - Rz).abs().max() < 1e-12
    v = torch.tensor([0, 0, math.pi / 2], dtype=torch.float64)
    assert (rotations.axis_angle_to_matrix(v) - Rz).abs().max() < 1e-12
    # The active rotation maps x onto y.
    x = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    assert torch.allclose(Rz @ x, torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)


def test_axis_angle_small_angle_gradient_is_finite():
    v = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    R = rotations.axis_angle_to_matrix(v)
    R.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_random_rotations_are_proper_and_uniform():
    g = torch.Generator().manual_seed(2)
    R = rotations.random_rotations(20000, g, dtype=torch.float64)
    det = torch.linalg.det(R)
    assert torch.allclose(det, torch.ones_like(det), atol=1e-10)
    # Haar measure: the rotated z axis is uniform on the sphere (mean 0, E[z_i^2] = 1/3),
    # and the rotation angle has density (1 - cos t)/pi, mean pi/2 + 2/pi.
    z = R[:, :, 2]
    assert z.mean(0).abs().max() < 0.02
    assert ((z**2).mean(0) - 1 / 3).abs().max() < 0.01
    angle = rotations.rotation_angle(torch.eye(3, dtype=torch.float64).expand_as(R), R)
    assert abs(angle.mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.02


def test_rotation_angle():
    Rz = rotations.rotation_about_axis("z", 0.3)
    Ry = rotations.rotation_about_axis("y", 0.3)
    assert abs(rotations.rotation_angle(Rz, Rz @ Ry).item() - 0.3) < 1e-10


@pytest.mark.parametrize("reflected", [False, True])
def test_kabsch_recovers_proper_rotation(reflected):
    g = torch.Generator().manual_seed(3)
    P = torch.randn(30, 3, generator=g, dtype=torch.float64)
    R_true = rotations.random_rotations(1, g, dtype=torch.float64)[0]
    t_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    Q = P @ R_true.T + t_true
    if reflected:
        Q = Q * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    R, t = rotations.kabsch(P, Q)
    assert abs(torch.linalg.det(R).item() - 1.0) < 1e-10  # never a reflection
    if not reflected:
        assert (R - R_true).abs().max() < 1e-10
        assert (t - t_true).abs().max() < 1e-10


def test_kabsch_mask_ignores_padding():
    g = torch.Generator().manual_seed(4)
    P = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    R_true = rotations.random_rotations(2, g, dtype=torch.float64)
    Q = P @ R_true.transpose(-1, -2)
    mask = torch.ones(2, 12, dtype=torch.float64)
    mask[:, 9:] = 0
    Q[:, 9:] = 100.0  # garbage on padded nodes
    R, _ = rotations.kabsch(P, Q, mask)
    assert (R - R_true).abs().max() < 1e-10


@pytest.mark.parametrize("n", [6, 7])
def test_grids_origin_at_n_over_2(n):
    c = grids.coordinate_grid((n, n, n), pixel_size=2.0)
    assert c.shape == (n, n, n, 3)
    assert torch.all(c[n // 2, n // 2, n // 2] == 0)
    # Last array axis is x: moving along it changes the x coordinate only.
    assert torch.allclose(c[n // 2, n // 2, n // 2 + 1], torch.tensor([2.0, 0.0, 0.0]))
    assert torch.allclose(c[n // 2 + 1, n // 2, n // 2], torch.tensor([0.0, 0.0, 2.0]))
    f = grids.frequency_grid((n, n), pixel_size=2.0)
    assert torch.allclose(f[n // 2, n // 2 + 1], torch.tensor([1 / (2.0 * n), 0.0]))


@pytest.mark.parametrize("n", [8, 9])
def test_centred_fft_puts_dc_and_origin_at_n_over_2(n):
    x = torch.zeros(n, n, dtype=torch.float64)
    x[n // 2, n // 2] = 1.0  # delta at the origin
    X = fft.fft2_c(x)
    assert torch.allclose(X, torch.ones_like(X))  # flat spectrum, zero phase
    y = torch.ones(n, n, dtype=torch.float64)
    Y = fft.fft2_c(y)
    assert abs(Y[n // 2, n // 2].real.item() - n * n) < 1e-9
    assert Y.abs().sum().item() == pytest.approx(n * n)
    z = torch.randn(n, n, n, dtype=torch.float64)
    assert torch.allclose(fft.ifft3_c(fft.fft3_c(z)).real, z)


def test_shell_indices():
    s = grids.shell_indices((9, 9))
    assert s[4, 4] == 0 and s[4, 5] == 1 and s[4, 8] == 4 and s[0, 4] == 4
