"""Metrics: FSC/FRC and resolution, masked correlation, RMSD, Rg, PSNR/SSIM, MTD error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fftn_c, ifftn_c
from cryoprior.geometry.grids import shell_indices
from cryoprior.geometry.rotations import random_rotations
from cryoprior.metrics import (
    fsc,
    kabsch_rmsd,
    masked_correlation,
    plot_fsc,
    psnr,
    radius_of_gyration,
    resolution_from_curve,
    rmsd,
    rotation_invariant_error,
    spherical_mask,
    ssim,
)

# ---------------------------------------------------------------- FSC


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 17, 17), (32, 32), (33, 33)])
def test_fsc_with_itself_is_one(shape, gen):
    x = torch.randn(shape, generator=gen)
    res = fsc(x, 2.5 * x + 0.0, pixel_size=1.7)
    n = shape[0]
    assert len(res.fsc) == n // 2 + 1
    np.testing.assert_allclose(res.fsc, 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diff(res.frequency), 1 / (n * 1.7))
    assert res.frequency[-1] == pytest.approx((n // 2) / (n * 1.7))
    assert res.nyquist_0143 and res.nyquist_05
    assert res.resolution_0143 == pytest.approx(n * 1.7 / (n // 2))
    assert res.n_voxels[0] == 1 and res.n_voxels.sum() == int(
        (shell_indices(shape) <= n // 2).sum()
    )
    assert res.ndim == len(shape)


def test_fsc_independent_noise_is_near_zero(gen):
    a = torch.randn(32, 32, 32, generator=gen, dtype=torch.float64)
    b = torch.randn(32, 32, 32, generator=gen, dtype=torch.float64)
    res = fsc(a, b, 1.0)
    k = np.arange(len(res.fsc)) >= 2
    assert abs(res.fsc[k].mean()) < 0.03
    assert np.all(np.abs(res.fsc[k]) < 5 / np.sqrt(res.n_voxels[k]))
    assert not res.nyquist_0143


def test_fsc_of_lowpassed_map_reads_the_cutoff(gen):
    n, px, cutoff = 32, 2.0, 6
    a = torch.randn(n, n, n, generator=gen, dtype=torch.float64)
    shells = shell_indices((n, n, n))
    spec = fftn_c(a, 3)
    # Above the cutoff b holds a's spectrum times i sign(kx): same power, real map, and
    # Re(F_a conj(F_b)) = 0 voxel by voxel, so those shells correlate exactly 0.
    kx = torch.arange(n) - n // 2
    hilbert = 1j * torch.sign(kx).to(torch.float64) * spec
    hilbert[..., 0] = 0  # the unpaired Nyquist plane of even n
    b = ifftn_c(torch.where(shells <= cutoff, spec, hilbert), 3).real
    res = fsc(a, b, px)
    np.testing.assert_allclose(res.fsc[: cutoff + 1], 1.0, atol=1e-10)
    np.testing.assert_allclose(res.fsc[cutoff + 1 :], 0.0, atol=1e-10)
    # Linear interpolation between shell 6 (1.0) and 7 (0.0).
    assert res.resolution_0143 == pytest.approx(n * px / (cutoff + 1 - 0.143))
    assert res.resolution_05 == pytest.approx(n * px / (cutoff + 0.5))


def test_resolution_interpolation_on_synthetic_curve():
    f = np.arange(11) / 20.0
    c = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.1, 0.2, 0.05, 0.0, 0.0, 0.0])
    res05, cap = resolution_from_curve(f, c, 0.5)
    assert not cap and res05 == pytest.approx(20 / 3.5)
    res0143, _ = resolution_from_curve(f, c, 0.143)
    # First crossing (between shells 4 and 5), although the curve rises again at shell 6.
    assert res0143 == pytest.approx(20 / (4 + (0.4 - 0.143) / 0.3))
    never, cap = resolution_from_curve(f, np.ones(11), 0.143)
    assert cap and never == pytest.approx(2.0)
    low_dc, cap = resolution_from_curve(f, np.full(11, 0.1), 0.143)
    assert not cap and low_dc == pytest.approx(20.0)


def test_fsc_mask_is_applied_in_real_space(gen):
    a = torch.randn(17, 17, 17, generator=gen, dtype=torch.float64)
    b = a + torch.randn(17, 17, 17, generator=gen, dtype=torch.float64)
    m = spherical_mask((17, 17, 17), 5.0, 2.0, dtype=torch.float64)
    np.testing.assert_allclose(fsc(a, b, 1.0, mask=m).fsc, fsc(a * m, b * m, 1.0).fsc)
    with pytest.raises(InputError, match="cubic"):
        fsc(torch.zeros(8, 8, 9), torch.zeros(8, 8, 9), 1.0)
    with pytest.raises(InputError, match="same shape"):
        fsc(torch.zeros(8, 8), torch.zeros(9, 9), 1.0)


@pytest.mark.parametrize("n", [16, 17])
def test_spherical_mask(n):
    hard = spherical_mask((n, n, n), 4.0)
    c = n // 2
    assert hard[c, c, c] == 1 and hard[c, c, c + 4] == 1 and hard[c, c, c + 5] == 0
    soft = spherical_mask((n, n), 3.0, soft_edge_px=4.0, dtype=torch.float64)
    row = soft[c, c:]
    assert row[:4].eq(1).all() and row[7:].eq(0).all()
    assert 0 < float(row[5]) < 1 and float(row[5]) == pytest.approx(0.5)
    assert torch.all(row[1:] <= row[:-1])


def test_fsc_result_json_describe_and_plot(tmp_path, gen):
    a = torch.randn(16, 16, 16, generator=gen)
    b = a + 2 * torch.randn(16, 16, 16, generator=gen)
    res = fsc(a, b, 1.5)
    d = json.loads(res.to_json())
    assert d["kind"] == "FSC" and len(d["fsc"]) == 9
    assert d["resolution_0143_angstrom"] == pytest.approx(res.resolution_0143)
    text = res.describe()
    assert "0.143" in text and "first" in text and f"{res.resolution_0143:.2f}" in text
    out = plot_fsc(
        {"noisy": res, "self": fsc(a, a, 1.5)}, tmp_path / "sub" / "fsc.png", title="test"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["fsc.png"]


# ---------------------------------------------------------------- correlation


def test_masked_correlation_matches_numpy(gen):
    a = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    b = 0.5 * a + torch.randn(10, 12, generator=gen, dtype=torch.float64)
    mask = torch.rand(10, 12, generator=gen) > 0.4
    got = masked_correlation(a, b, mask)
    ref = np.corrcoef(a[mask].numpy(), b[mask].numpy())[0, 1]
    assert float(got) == pytest.approx(ref, abs=1e-12)
    assert float(masked_correlation(a, b)) == pytest.approx(
        np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12
    )
    # Soft mask = weighted Pearson.
    w = torch.rand(10, 12, generator=gen, dtype=torch.float64)
    cov = np.cov(a.ravel(), b.ravel(), aweights=w.ravel().numpy())
    assert float(masked_correlation(a, b, w)) == pytest.approx(
        cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), abs=1e-12
    )
    # Batched over the leading dim, invariant to affine changes.
    batch = masked_correlation(torch.stack([a, a]), torch.stack([b, -3 * b + 1]), ndim=2)
    full = masked_correlation(a, b)
    torch.testing.assert_close(batch, torch.stack([full, -full]))
    assert batch.shape == (2,)


# ---------------------------------------------------------------- structure


def test_kabsch_rmsd_rigid_copy_and_invariance(gen):
    P = torch.randn(4, 20, 3, generator=gen, dtype=torch.float64) * 5
    R = random_rotations(4, gen, dtype=torch.float64)
    t = torch.randn(4, 1, 3, generator=gen, dtype=torch.float64) * 10
    Q = P @ R.transpose(-1, -2) + t
    val = kabsch_rmsd(P, Q)
    assert val.shape == (4,) and float(val.max()) < 1e-10
    assert float(rmsd(P, Q).min()) > 1.0
    noisy = Q + 0.3 * torch.randn(Q.shape, generator=gen, dtype=torch.float64)
    base = kabsch_rmsd(P, noisy)
    R2 = random_rotations(1, gen, dtype=torch.float64)[0]
    torch.testing.assert_close(kabsch_rmsd(P @ R2.T, noisy), base)
    assert torch.all(base <= rmsd(P, noisy))
    assert torch.all(base > 0.1)


def test_rmsd_mask_and_radius_of_gyration():
    P = torch.zeros(3, 3, dtype=torch.float64)
    Q = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [100.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(rmsd(P, Q, mask=torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(math.sqrt(25 / 2))
    square = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]]) + 7.0
    assert float(radius_of_gyration(square)) == pytest.approx(1.0)
    line = torch.tensor([[0.0, 0, 0], [4.0, 0, 0], [50.0, 0, 0]])
    # Weighted: masses 1 and 3 at 0 and 4 -> centre 3, Rg^2 = (1*9 + 3*1)/4 = 3.
    assert float(
        radius_of_gyration(
            line, mask=torch.tensor([1.0, 1.0, 0.0]), weights=torch.tensor([1.0, 3.0, 5.0])
        )
    ) == pytest.approx(math.sqrt(3.0))
    with pytest.raises(InputError):
        radius_of_gyration(line, mask=torch.zeros(3))


# ---------------------------------------------------------------- images


def test_psnr_known_values(gen):
    ref = torch.rand(2, 8, 8, generator=gen, dtype=torch.float64)
    x = ref + 0.1
    torch.testing.assert_close(
        psnr(x, ref, data_range=1.0), torch.full((2,), 20.0, dtype=torch.float64)
    )
    auto = psnr(x, ref)
    rng = ref.flatten(-2).amax(-1) - ref.flatten(-2).amin(-1)
    torch.testing.assert_close(auto, 20 * torch.log10(rng / 0.1))
    assert math.isinf(float(psnr(ref[0], ref[0])))


def ssim_bruteforce(x: np.ndarray, y: np.ndarray, L: float) -> float:
    """SSIM with an explicit 11 x 11 Gaussian window (sigma 1.5) at every valid position."""
    t = np.arange(11) - 5.0
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_ssim_identities_and_reference(gen):
    x = torch.rand(2, 16, 15, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    y = x + 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    val = ssim(y, x, data_range=1.0)
    assert torch.all(val < 0.95)
    torch.testing.assert_close(val, ssim(x, y, data_range=1.0))  # symmetric
    for i in range(2):
        assert float(val[i]) == pytest.approx(
            ssim_bruteforce(y[i].numpy(), x[i].numpy(), 1.0), abs=1e-10
        )


def test_rotation_invariant_error(gen):
    truth = torch.randn(3, 12, 12, generator=gen, dtype=torch.float64)
    est = torch.rot90(truth, 1, dims=(-2, -1))
    assert float(rotation_invariant_error(est, truth).max()) < 1e-12
    assert float(rotation_invariant_error(est, truth, k=1).min()) > 0.5
    flipped = torch.rot90(truth, 2, dims=(-2, -1))
    assert float(rotation_invariant_error(flipped, truth, k=2).max()) < 1e-12
    noisy = truth + 0.1 * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    err = rotation_invariant_error(torch.rot90(noisy, 3, dims=(-2, -1)), truth)
    expected = (noisy - truth).flatten(-2).norm(dim=-1) / truth.flatten(-2).norm(dim=-1)
    torch.testing.assert_close(err, expected)
    with pytest.raises(InputError, match="k = 1, 2 or 4"):
        rotation_invariant_error(est, truth, k=3)
