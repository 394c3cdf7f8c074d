"""MTD measurement generator and patch model (cryoprior.physics.mtd)."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.physics.mtd import (
    ImageRotation,
    empty_shifts,
    extract_patches,
    mtd_snr,
    noise_sigma_for_mtd_snr,
    patch_model,
    patch_shifts,
    place_copies,
    rotate_image,
    rotation_grid,
    simulate_mtd,
)


def _image(L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, L, generator=g, dtype=torch.float64) + 0.5


# ----------------------------------------------------------------------- rotations


@pytest.mark.parametrize("L", [5, 6])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_quarter_turns_are_exact_rot90(L, interpolation):
    f = _image(L)
    op = ImageRotation(L, rotation_grid(4), interpolation)
    assert op.exact
    out = op.apply(f)
    for k in range(4):
        assert torch.equal(out[k], torch.rot90(f, k, dims=(-2, -1)))


@pytest.mark.parametrize("L", [5, 6])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_rotation_adjoint_and_normal_diagonal(L, interpolation):
    g = torch.Generator().manual_seed(1)
    op = ImageRotation(L, rotation_grid(7), interpolation)
    assert not op.exact
    f = torch.randn(2, L, L, generator=g, dtype=torch.float64)
    h = torch.randn(2, 7, L, L, generator=g, dtype=torch.float64)
    lhs = (op.apply(f) * h).sum()
    rhs = (f * op.adjoint(h)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    # diag(Σ_k R_kᵀ diag(c_k) R_k) against the explicit matrix
    c = torch.rand(7, L, L, generator=g, dtype=torch.float64)
    eye = torch.eye(L * L, dtype=torch.float64).reshape(L * L, L, L)
    cols = op.adjoint(c * op.apply(eye))  # column j = A e_j
    explicit = torch.diagonal(cols.reshape(L * L, L * L)).reshape(L, L)
    assert torch.allclose(op.normal_diagonal(c), explicit, atol=1e-12)


def test_rotation_direction_and_interpolated_angle():
    # a smooth blob off centre: rotating by 45° twice is close to one 90° turn
    L = 21
    u = torch.arange(L, dtype=torch.float64) - 10
    blob = torch.exp(-((u[:, None] - 4) ** 2 + (u[None, :] + 2) ** 2) / 8)
    twice = rotate_image(rotate_image(blob, math.pi / 4)[0], math.pi / 4)[0]
    quarter = torch.rot90(blob, 1, dims=(-2, -1))
    assert float((twice - quarter).norm() / quarter.norm()) < 0.02
    # and far from the opposite direction
    assert float((twice - torch.rot90(blob, -1, dims=(-2, -1))).norm() / quarter.norm()) > 0.5


# ----------------------------------------------------------------------- patch model


@pytest.mark.parametrize("L", [3, 4])
def test_patch_model_definition(L):
    f = _image(L)
    assert torch.equal(patch_model(f, (0, 0)), f)
    for a in range(2 * L):
        for b in range(2 * L):
            p = patch_model(f, (a, b))
            direct = torch.zeros(L, L, dtype=torch.float64)
            for i in range(L):
                for j in range(L):
                    r, c = (i + a) % (2 * L), (j + b) % (2 * L)
                    if r < L and c < L:
                        direct[i, j] = f[r, c]
            assert torch.equal(p, direct)
            assert bool(empty_shifts(L)[a, b]) == bool((p == 0).all())


def test_extract_patches_layout():
    m = torch.arange(7 * 7, dtype=torch.float64).reshape(7, 7)
    p = extract_patches(m, 3)
    assert p.shape == (4, 3, 3)  # the last row and column are dropped
    assert torch.equal(p[1], m[0:3, 3:6])
    assert torch.equal(p[2], m[3:6, 0:3])


@pytest.mark.parametrize("L", [5, 6])
def test_generator_copies_match_the_patch_model(L):
    g = torch.Generator().manual_seed(3)
    f = _image(L, 3)
    m = simulate_mtd(f, math.inf, generator=g)
    assert m.sigma == 0 and torch.equal(m.measurement, m.clean)
    patches = extract_patches(m.clean, L)
    labels = patch_shifts(m.positions, L, m.n)
    rotated = rotate_image(f, m.angles)
    for idx in range(len(patches)):
        if idx in labels:
            copy, a, b = labels[idx]
            assert torch.allclose(patches[idx], patch_model(rotated[copy], (a, b)))
        else:
            assert bool((patches[idx] == 0).all())


# ----------------------------------------------------------------------- generator


@pytest.mark.parametrize("L", [5, 6])
@pytest.mark.parametrize("separation", [None, "L"])
def test_copies_never_overlap(L, separation):
    sep = L if separation == "L" else None
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        f = _image(L, seed)
        m = simulate_mtd(f, 1.0, separation=sep, generator=g)
        assert m.n == 11 * L and len(m.positions) == 12  # round(0.1 · 121)
        pos = m.positions
        cheb = (pos[:, None] - pos[None]).abs().amax(-1)
        cheb.fill_diagonal_(10**6)
        assert int(cheb.min()) >= (2 * L if sep is None else L)
        assert bool((pos >= 0).all()) and bool((pos <= m.n - L).all())
        # each copy sits intact in the noiseless measurement, and nothing else is there
        cover = torch.zeros(m.n, m.n, dtype=torch.int64)
        for (r, c), copy in zip(pos.tolist(), rotate_image(f, m.angles)):
            assert torch.equal(m.clean[r : r + L, c : c + L], copy)
            cover[r : r + L, c : c + L] += 1
        assert int(cover.max()) == 1
        assert bool((m.clean[cover == 0] == 0).all())


@pytest.mark.parametrize("snr", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("L", [5, 6])
def test_snr_matches_request(snr, L):
    g = torch.Generator().manual_seed(11)
    f = _image(L, 2)
    m = simulate_mtd(f, snr, n=40 * L, generator=g)
    # the stated definition, exactly
    assert m.sigma == pytest.approx(math.sqrt(float((f**2).sum()) / (L * L * snr)))
    assert mtd_snr(f, m.sigma) == pytest.approx(snr)
    # and measured: the noise actually added has variance σ²
    noise = m.measurement - m.clean
    var = float(noise.var())
    tol = 4 * math.sqrt(2 / noise.numel())  # 4 standard errors of a variance estimate
    assert abs(var / m.sigma**2 - 1) < tol
    assert mtd_snr(f, math.sqrt(var)) == pytest.approx(snr, rel=tol)


def test_angles_discrete_or_continuous_and_seeded():
    f = _image(5)
    a = simulate_mtd(f, 1.0, generator=torch.Generator().manual_seed(5))
    b = simulate_mtd(f, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.measurement, b.measurement) and torch.equal(a.positions, b.positions)
    k = a.angles / (math.pi / 2)
    assert torch.allclose(k, k.round())
    c = simulate_mtd(f, 1.0, rotations=None, generator=torch.Generator().manual_seed(5))
    assert c.rotations is None
    assert not torch.allclose(c.angles / (math.pi / 2), (c.angles / (math.pi / 2)).round())
    assert bool((c.angles >= 0).all()) and bool((c.angles < 2 * math.pi).all())


def test_generator_rejects_bad_input():
    f = _image(5)
    with pytest.raises(InputError, match="separation"):
        simulate_mtd(f, 1.0, separation=3)
    with pytest.raises(InputError, match="SNR"):
        simulate_mtd(f, -1.0)
    with pytest.raises(InputError, match="square"):
        simulate_mtd(torch.ones(4, 5), 1.0)
    with pytest.raises(InputError, match="could not place"):
        place_copies(20, 5, 10, 10, torch.Generator().manual_seed(0), max_restarts=2)
    with pytest.raises(InputError, match="all zeros"):
        noise_sigma_for_mtd_snr(torch.zeros(5, 5), 1.0)
