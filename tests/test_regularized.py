"""Regularised least squares: CG against dense direct solves, and the discrepancy rule."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.ctf import CTFParams
from cryoprior.physics.operators import GradientOperator, MatrixOperator, ProjectionCTFOperator
from cryoprior.physics.projection import gaussian_blobs
from cryoprior.solvers.regularized import conjugate_gradient, regularized_least_squares

F64 = torch.float64


def _dense(op, shape) -> torch.Tensor:
    """The matrix of a linear operator, column j = op(e_j) (x flattened row-major)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=F64).reshape(n, *shape)
    return op(basis).reshape(n, -1).T


def test_conjugate_gradient_solves_batched_spd_systems(gen):
    m = torch.randn(3, 6, 6, generator=gen, dtype=F64)
    spd = m @ m.transpose(-1, -2) + 0.5 * torch.eye(6, dtype=F64)
    b = torch.randn(3, 6, generator=gen, dtype=F64)
    res = conjugate_gradient(lambda x: (spd @ x[..., None])[..., 0], b, tol=1e-12, batch_ndim=1)
    torch.testing.assert_close(res.x, torch.linalg.solve(spd, b))
    assert res.converged and res.n_iter <= 8
    early = conjugate_gradient(lambda x: (spd @ x[..., None])[..., 0], b, max_iter=2, batch_ndim=1)
    assert not early.converged and early.relative_residual.shape == (3,)


@pytest.mark.parametrize("regularizer", ["gradient", "identity"])
def test_fixed_lambda_matches_dense_solve_on_a_matrix(regularizer, gen):
    n, m, sigma, lam = 12, 9, 0.1, 3.0
    a = torch.randn(m, n, generator=gen, dtype=F64)
    op = MatrixOperator(a)
    y = op(torch.sin(torch.arange(n, dtype=F64) / 2)) + sigma * torch.randn(
        m, generator=gen, dtype=F64
    )
    reg = _dense(GradientOperator((n,)), (n,)) if regularizer == "gradient" else torch.eye(n)
    reg = reg.to(F64)
    direct = torch.linalg.solve(a.T @ a / sigma**2 + lam * reg.T @ reg, a.T @ y / sigma**2)
    res = regularized_least_squares(op, y, sigma, lam, regularizer=regularizer, tol=1e-12)
    torch.testing.assert_close(res.x, direct, rtol=1e-8, atol=1e-10)
    assert res.rule == "fixed" and res.converged
    assert res.residual_norm == pytest.approx(float((y - a @ direct).norm()), rel=1e-8)


@pytest.mark.parametrize("size", [6, 7])
def test_fixed_lambda_matches_dense_solve_on_a_projection(size, gen):
    """A tiny cryo-EM problem: projections with CTF and shifts, the normal equations dense."""
    k, sigma, lam = 4, 0.05, 0.7
    params = CTFParams(
        defocus_u=torch.linspace(8000.0, 12000.0, k),
        defocus_v=8000.0,
        defocus_angle=0.2,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
    )
    shifts = torch.rand(k, 2, generator=gen, dtype=F64) - 0.5
    op = ProjectionCTFOperator.from_ctf_params(
        random_rotations(k, gen, F64), size, 3.0, params, shifts, kernel="linear"
    )
    truth = gaussian_blobs(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.5]]), 1.0, size)
    y = op(truth) + sigma * torch.randn(op.range_shape, generator=gen, dtype=F64)
    shape = op.domain_shape
    a = _dense(op, shape)
    d = _dense(GradientOperator(shape), shape)
    direct = torch.linalg.solve(a.T @ a / sigma**2 + lam * d.T @ d, a.T @ y.reshape(-1) / sigma**2)
    res = regularized_least_squares(op, y, sigma, lam, tol=1e-12, max_iter=2000)
    assert res.converged
    rel = float((res.x.reshape(-1) - direct).norm() / direct.norm())
    assert rel < 1e-7


def test_discrepancy_principle_hits_the_noise_level_without_the_truth(gen):
    size, k, sigma = 10, 12, 0.02
    op = ProjectionCTFOperator(random_rotations(k, gen, F64), size, kernel="linear")
    truth = gaussian_blobs(torch.tensor([[2.0, 0.0, -1.0], [-2.0, 1.0, 1.5]]), 1.3, size)
    y = op(truth) + sigma * torch.randn(op.range_shape, generator=gen, dtype=F64)
    res = regularized_least_squares(op, y, sigma, "discrepancy", tol=1e-8, max_iter=400)
    target = sigma * math.sqrt(y.numel())
    assert res.converged and res.rule == "discrepancy"
    assert res.target_residual_norm == pytest.approx(target)
    assert res.residual_norm == pytest.approx(target, rel=0.011)
    assert len(res.history) <= 12
    # the chosen λ helps: closer to the truth than an almost unregularised fit
    loose = regularized_least_squares(op, y, sigma, res.lam * 1e-4, tol=1e-8, max_iter=400)
    assert float((res.x - truth).norm()) < 0.8 * float((loose.x - truth).norm())


def test_discrepancy_target_out_of_reach_is_reported(gen):
    a = torch.randn(5, 3, generator=gen, dtype=F64)
    y = torch.randn(5, generator=gen, dtype=F64)  # no x fits: residual >> σ√M for any λ
    res = regularized_least_squares(MatrixOperator(a), y, 1e-3, regularizer="identity")
    assert not res.converged
    assert res.lam == pytest.approx(min(lam for lam, _ in res.history))


def test_regularized_rejects_bad_inputs(gen):
    op = MatrixOperator(torch.eye(3, dtype=F64))
    y = torch.zeros(3, dtype=F64)
    with pytest.raises(InputError, match="regularizer"):
        regularized_least_squares(op, y, 0.1, 1.0, regularizer="tv")
    with pytest.raises(InputError, match="lam"):
        regularized_least_squares(op, y, 0.1, "gcv")
    with pytest.raises(InputError, match="noise sigma"):
        regularized_least_squares(op, y, 0.0, 1.0)
    with pytest.raises(InputError, match="range shape"):
        regularized_least_squares(op, torch.zeros(2, 3, dtype=F64), 0.1, 1.0)
