"""Noise at a given SNR, and Fourier sub-pixel shifts."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fft2_c, ifft2_c
from cryoprior.physics.noise import add_noise, add_noise_at_snr, noise_sigma_for_snr
from cryoprior.physics.shifts import shift_images, shift_spectra

# ---------------------------------------------------------------- noise


def test_sigma_from_mean_of_per_image_variances():
    a = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)  # variance 1
    # Variance 3; the offset does not count.
    b = 3.0**0.5 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64) + 5.0
    stack = torch.stack([a, b])
    assert noise_sigma_for_snr(stack, 0.5) == pytest.approx(2.0, rel=1e-12)
    vols = torch.stack([a, b])[:, None]  # (2, 1, 2, 2) as volumes
    assert noise_sigma_for_snr(vols, 2.0, image_ndim=3) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("snr", [0.05, 1.0, 10.0])
def test_add_noise_at_snr_matches_request(snr, gen):
    period = 3.0 + torch.arange(64.0)[:, None, None]
    axis = torch.arange(32.0)
    clean = torch.sin(axis[None, None, :] / period) * torch.cos(axis[None, :, None] / 5)
    noisy, sigma = add_noise_at_snr(clean, snr, gen)
    noise = noisy - clean
    measured = clean.var(dim=(-2, -1), unbiased=False).mean() / noise.var(unbiased=False)
    # 65536 noise samples: relative sampling error of the variance ~ 0.6 %.
    assert float(measured) == pytest.approx(snr, rel=0.03)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.03)
    assert abs(float(noise.mean())) < 5 * sigma / 256


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_snr_raises(bad):
    with pytest.raises(InputError, match="SNR"):
        add_noise_at_snr(torch.randn(2, 4, 4), bad)


def test_noise_is_seeded_and_per_image_sigma():
    x = torch.zeros(3, 16, 16)
    n1 = add_noise(x, 1.0, torch.Generator().manual_seed(7))
    n2 = add_noise(x, 1.0, torch.Generator().manual_seed(7))
    n3 = add_noise(x, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    per = add_noise(x, torch.tensor([0.0, 1.0, 10.0]), torch.Generator().manual_seed(7))
    assert float(per[0].abs().max()) == 0.0
    torch.testing.assert_close(per[1:], n1[1:] * torch.tensor([1.0, 10.0])[:, None, None])
    with pytest.raises(InputError):
        noise_sigma_for_snr(torch.ones(2, 4, 4), 1.0)  # constant: SNR undefined


# ---------------------------------------------------------------- shifts


def _delta(n: int, dtype=torch.float64) -> torch.Tensor:
    d = torch.zeros(1, n, n, dtype=dtype)
    d[0, n // 2, n // 2] = 1.0
    return d


@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("dx,dy", [(2, 0), (0, 3), (-3, 1), (5, -4)])
def test_delta_moves_to_expected_index(n, dx, dy):
    out = shift_images(_delta(n), torch.tensor([[float(dx), float(dy)]], dtype=torch.float64))
    c = n // 2
    expected = torch.zeros_like(out)
    expected[0, c + dy, c + dx] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_shift_equals_roll(n, dtype, gen):
    images = torch.randn(3, n, n, generator=gen, dtype=torch.float64).to(dtype)
    shifts = torch.tensor([[1.0, 0.0], [-2.0, 3.0], [4.0, -5.0]])
    out = shift_images(images, shifts)
    assert out.dtype == dtype
    for i, (dx, dy) in enumerate(shifts.tolist()):
        ref = torch.roll(images[i], shifts=(int(dy), int(dx)), dims=(-2, -1))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out[i], ref, atol=tol, rtol=0)


@pytest.mark.parametrize("n", [32, 33])
def test_subpixel_shift_moves_gaussian_blob(n):
    c = n // 2
    yy, xx = torch.meshgrid(
        torch.arange(n, dtype=torch.float64) - c,
        torch.arange(n, dtype=torch.float64) - c,
        indexing="ij",
    )

    def blob(x0: float, y0: float) -> torch.Tensor:
        return torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.0**2))

    dx, dy = 1.3, -0.7
    out = shift_images(blob(0.0, 0.0)[None], torch.tensor([[dx, dy]], dtype=torch.float64))[0]
    torch.testing.assert_close(out, blob(dx, dy), atol=1e-9, rtol=0)


@pytest.mark.parametrize("n", [16, 17])
def test_shift_then_unshift(n, gen):
    images = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
    if n % 2 == 0:  # remove Nyquist content: a non-integer shift damps it (documented)
        spec = fft2_c(images)
        spec[..., 0, :] = 0
        spec[..., :, 0] = 0
        images = ifft2_c(spec).real
    shifts = torch.tensor([[0.37, -1.61], [2.5, 0.25]], dtype=torch.float64)
    back = shift_images(shift_images(images, shifts), -shifts)
    torch.testing.assert_close(back, images, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [16, 17])
def test_shift_spectra_consistent_and_real(n, gen):
    images = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
    shifts = torch.tensor([[0.4, 1.7], [-2.2, 0.9]], dtype=torch.float64)
    via_spectra = ifft2_c(shift_spectra(fft2_c(images), shifts))
    assert float(via_spectra.imag.abs().max()) < 1e-12  # the Nyquist terms keep it real
    torch.testing.assert_close(via_spectra.real, shift_images(images, shifts), atol=1e-12, rtol=0)
    # Energy is preserved apart from the damped Nyquist lines of even sizes.
    if n % 2 == 1:
        assert float(shift_images(images, shifts).norm()) == pytest.approx(
            float(images.norm()), rel=1e-12
        )


def test_shift_bad_shapes():
    with pytest.raises(InputError, match="dx, dy"):
        shift_images(torch.zeros(2, 8, 8), torch.zeros(2, 3))
    assert math.isclose(float(shift_images(torch.ones(1, 8, 8), torch.zeros(1, 2)).mean()), 1.0)
