"""Heat-kernel degradations: kernel normalisation, padding, symmetries, limits, process."""

from __future__ import annotations

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.heat_kernel import (
    HeatKernelProcess,
    gaussian_kernel_blur,
    gaussian_kernel_matrix,
    graph_laplacian,
    heat_semigroup,
    heat_semigroup_matrix,
    semigroup_time,
)

DT = torch.float64


def blur(x, s, mask):
    return gaussian_kernel_blur(x, s, mask)


def semigroup(x, s, mask):
    return heat_semigroup(x, s, mask, length_scale=2.5)


OPS = {"gaussian": blur, "semigroup": semigroup}
op_params = pytest.mark.parametrize("op", list(OPS), ids=list(OPS))


def cloud(gen, b=2, n=9, dtype=DT, scale=3.0):
    """A random cloud (B, N, 3) Å with its COM away from the origin and a padded mask."""
    x = torch.randn(b, n, 3, generator=gen, dtype=dtype) * scale + 5.0
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, -2:] = False
    return x * mask[..., None], mask


def com(x, mask):
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1)


def amount(b, dtype=DT):
    return torch.linspace(0.8, 2.0, b, dtype=dtype)


@pytest.mark.parametrize("n", [7, 8])
def test_kernel_rows_sum_to_one_over_real_atoms(gen, n):
    x, mask = cloud(gen, n=n)
    w = gaussian_kernel_matrix(x, torch.tensor([1.0, 2.5], dtype=DT), mask)
    m = mask.to(DT)
    torch.testing.assert_close(w.sum(-1), m, rtol=0, atol=1e-12)
    assert (w * (1 - m)[:, None, :]).abs().max() == 0  # no weight on padding columns
    assert (w * (1 - m)[:, :, None]).abs().max() == 0  # padding rows are empty
    # Gaussian in the squared distance: W_ij / W_ii = exp(-d²/(2σ²))
    d2 = ((x[0, 0] - x[0, 3]) ** 2).sum()
    torch.testing.assert_close(w[0, 0, 3] / w[0, 0, 0], torch.exp(-d2 / 2.0), rtol=1e-12, atol=0)


def test_semigroup_matrix_is_doubly_stochastic_and_symmetric(gen):
    x, mask = cloud(gen)
    k = heat_semigroup_matrix(x, torch.tensor([0.3, 1.7], dtype=DT), mask, length_scale=2.5)
    m = mask.to(DT)
    torch.testing.assert_close(k, k.transpose(1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close((k * m[:, None]).sum(-1) * m, m, rtol=0, atol=1e-12)
    lap = graph_laplacian(x, mask, 2.5)
    torch.testing.assert_close(lap.sum(-1), torch.zeros_like(m), rtol=0, atol=1e-12)
    assert (lap * (1 - m)[:, None, :]).abs().max() == 0
    assert k[0].abs().max() < 1.0 - 1e-3  # not the identity: the graph does smooth


@op_params
@pytest.mark.parametrize("where", ["end", "start", "interleaved"])
def test_padding_has_no_effect(gen, op, where):
    n, extra = 8, 5
    x = torch.randn(1, n, 3, generator=gen, dtype=DT) * 3.0 + 2.0
    ref = OPS[op](x, 1.5, None)
    total = n + extra
    if where == "end":
        real = torch.arange(n)
    elif where == "start":
        real = torch.arange(extra, total)
    else:
        real = torch.randperm(total, generator=gen)[:n].sort().values
    mask = torch.zeros(1, total, dtype=torch.bool)
    mask[0, real] = True
    xp = torch.randn(1, total, 3, generator=gen, dtype=DT) * 50.0  # junk in padding
    xp[0, real] = x[0]
    out = OPS[op](xp, 1.5, mask)
    torch.testing.assert_close(out[0, real], ref[0], rtol=0, atol=1e-10)
    assert out[~mask].abs().max() == 0
    assert (ref - x).abs().max() > 1e-2  # the operator does move the atoms


@op_params
@pytest.mark.parametrize("improper", [False, True], ids=["rotation", "reflection"])
def test_e3_equivariance(gen, op, improper):
    x, mask = cloud(gen)
    s = amount(x.shape[0])
    R = random_rotations(1, gen, dtype=DT)[0]
    if improper:
        R = R @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=DT))
    shift = torch.randn(1, 1, 3, generator=gen, dtype=DT) * 10.0
    m3 = mask[..., None].to(DT)
    out = OPS[op](x, s, mask)
    moved = OPS[op]((x @ R.T + shift) * m3, s, mask)
    torch.testing.assert_close(moved, (out @ R.T + shift) * m3, rtol=0, atol=1e-10)


@op_params
def test_permutation_equivariance(gen, op):
    x, mask = cloud(gen)
    perm = torch.randperm(x.shape[1], generator=gen)
    out = OPS[op](x, amount(2), mask)
    torch.testing.assert_close(
        OPS[op](x[:, perm], amount(2), mask[:, perm]), out[:, perm], rtol=0, atol=1e-10
    )


@op_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_centre_of_mass(gen, op, dtype):
    x, mask = cloud(gen, dtype=dtype, n=12)
    out = OPS[op](x, torch.tensor([1.0, 3.0], dtype=dtype), mask)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(com(out, mask), com(x, mask), rtol=0, atol=tol)
    # the bare row-normalised W X does move the COM: the re-centring is needed
    w = gaussian_kernel_matrix(x, 3.0, mask)
    assert (com(w @ x, mask) - com(x, mask)).abs().max() > 1e-3


@op_params
def test_zero_amount_is_identity(gen, op):
    x, mask = cloud(gen)
    assert torch.equal(OPS[op](x, 0.0, mask), x)
    out = OPS[op](x, torch.tensor([0.0, 3.0], dtype=DT), mask)
    assert torch.equal(out[0], x[0])
    assert (out[1] - x[1]).abs().max() > 1e-2
    # continuity at 0: a tiny amount is almost the identity
    tiny = 1e-3 if op == "gaussian" else 1e-8
    torch.testing.assert_close(OPS[op](x, tiny, mask), x, rtol=0, atol=1e-6)


def test_semigroup_property_and_collapse(gen):
    x, mask = cloud(gen, scale=1.5)
    k1 = heat_semigroup_matrix(x, 0.4, mask, 2.5)
    k2 = heat_semigroup_matrix(x, 0.9, mask, 2.5)
    torch.testing.assert_close(
        k1 @ k2, heat_semigroup_matrix(x, 1.3, mask, 2.5), rtol=0, atol=1e-10
    )
    far = heat_semigroup(x, 1e4, mask, length_scale=2.5)
    target = com(x, mask)[:, None, :] * mask[..., None]
    torch.testing.assert_close(far, target, rtol=0, atol=1e-8)


def test_gaussian_large_sigma_collapses(gen):
    x, mask = cloud(gen, scale=1.0)
    out = gaussian_kernel_blur(x, 1e4, mask)
    torch.testing.assert_close(out, com(x, mask)[:, None, :] * mask[..., None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "semigroup"])
@pytest.mark.parametrize("schedule", ["linear", "quadratic"])
def test_process(gen, kind, schedule):
    p = HeatKernelProcess(max_radius=4.0, kind=kind, schedule=schedule, length_scale=3.0)
    assert HeatKernelProcess(**p.config()).config() == p.config()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    expect = 4.0 * t if schedule == "linear" else 4.0 * t**2
    torch.testing.assert_close(p.sigma(t), expect)
    x, mask = cloud(gen, b=3, n=10)
    out = p.degrade(x, t, mask)
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(com(out, mask), com(x, mask), rtol=0, atol=1e-10)
    spread = [float(((out[i] - com(out, mask)[i]) ** 2)[mask[i]].sum()) for i in range(3)]
    orig = [float(((x[i] - com(x, mask)[i]) ** 2)[mask[i]].sum()) for i in range(3)]
    assert spread[1] < orig[1] and spread[2] < orig[2]  # blur contracts the cloud
    # a monotone family: more blur, less spread (same cloud at two times)
    both = p.degrade(x[:1].expand(2, -1, -1), torch.tensor([0.4, 0.9], dtype=DT), None)
    centred = both - both.mean(1, keepdim=True)
    assert centred[1].pow(2).sum() < centred[0].pow(2).sum()


def test_process_noise(gen):
    p = HeatKernelProcess(max_radius=3.0)
    x, mask = cloud(gen, n=40)
    clean = p.degrade(x, 0.5, mask)
    noisy = p.degrade(x, 0.5, mask, noise_std=0.2, generator=torch.Generator().manual_seed(3))
    again = p.degrade(x, 0.5, mask, noise_std=0.2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)
    torch.testing.assert_close(com(noisy, mask), com(x, mask), rtol=0, atol=1e-10)
    assert noisy[~mask].abs().max() == 0
    std = float((noisy - clean)[mask].std())
    assert 0.15 < std < 0.25


def test_semigroup_time_calibration(gen):
    x, mask = cloud(gen)
    tau = semigroup_time(x, torch.tensor([1.0, 2.0], dtype=DT), mask, length_scale=2.5)
    assert (tau > 0).all()
    # τ ∝ σ²
    tau2 = semigroup_time(x, torch.tensor([2.0, 4.0], dtype=DT), mask, length_scale=2.5)
    torch.testing.assert_close(tau2, 4 * tau)
    single = torch.zeros(1, 3, 3, dtype=DT)
    assert semigroup_time(single, 1.0, torch.tensor([[True, False, False]])) == 0


def test_bad_inputs(gen):
    x, mask = cloud(gen)
    with pytest.raises(InputError):
        gaussian_kernel_blur(x, -1.0, mask)
    with pytest.raises(InputError):
        gaussian_kernel_blur(x, torch.ones(3, dtype=DT), mask)
    with pytest.raises(InputError):
        heat_semigroup(x, 1.0, torch.zeros_like(mask))
    with pytest.raises(InputError):
        gaussian_kernel_blur(x[0], 1.0)
    with pytest.raises(InputError):
        HeatKernelProcess(kind="exp")
    with pytest.raises(InputError):
        HeatKernelProcess().sigma(1.5)


def test_semigroup_time_gives_the_requested_spread(gen):
    # uniform ball, 0.024 atoms/Å³: the heat kernel's RMS spread per axis ≈ σ
    n = 400
    x = torch.randn(n, 3, generator=gen, dtype=DT)
    r = torch.rand(n, 1, generator=gen, dtype=DT) ** (1 / 3) * 16.0
    x = (x / x.norm(dim=1, keepdim=True) * r)[None]
    central = x[0].norm(dim=1) < 6.0
    d2 = ((x[0][:, None] - x[0][None]) ** 2).sum(-1)
    for sigma in (1.0, 3.0):
        k = heat_semigroup_matrix(x, semigroup_time(x, sigma, None, 2.5), None, 2.5)[0]
        spread = float(((k * d2).sum(1)[central].mean() / 3).sqrt())
        assert abs(spread - sigma) < 0.2 * sigma
