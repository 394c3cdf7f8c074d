"""Degradation operators: Fourier resampling (adjoint, round trip, means, Nyquist), linear
upsampling, resolution blur convention and the composed forward model."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fftn_c
from cryoprior.physics.degrade import (
    SIGMA_PER_RESOLUTION,
    DownsampleOperator,
    degrade,
    fourier_downsample,
    fourier_upsample,
    linear_upsample,
    resolution_blur,
    resolution_to_sigma,
)

# (high-res spatial shape, factor): even/odd in and out, 2-D and 3-D, non-square
CASES = [
    ((12, 12), 2),  # 12 -> 6 (even -> even)
    ((20, 20), 2),  # 20 -> 10
    ((15, 15), 3),  # odd -> odd
    ((12, 12), 4),  # even -> odd
    ((18, 12), 3),  # even -> even / even
    ((8, 8, 8), 2),
    ((9, 9, 9), 3),
    ((12, 6, 10), 2),  # -> (6, 3, 5)
]


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


@pytest.mark.parametrize(("shape", "factor"), CASES)
def test_downsample_operator_adjoint(shape, factor, gen):
    op = DownsampleOperator(shape, factor)
    x = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    y = torch.randn(3, *op.range_shape, generator=gen, dtype=torch.float64)
    lhs, rhs = _inner(op(x), y), _inner(x, op.adjoint(y))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert op.range_shape == tuple(n // factor for n in shape)


def test_adjoint_gradient_is_adjoint(gen):
    op = DownsampleOperator((10, 10), 2)
    x = torch.randn(2, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    (op(x) * y).sum().backward()
    torch.testing.assert_close(x.grad, op.adjoint(y))


@pytest.mark.parametrize(("shape", "factor"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_down_of_up_is_identity(shape, factor, dtype, gen):
    low = tuple(n // factor for n in shape)
    y = torch.randn(2, *low, generator=gen, dtype=torch.float64).to(dtype)
    up = fourier_upsample(y, factor, ndim=len(shape))
    assert up.shape == (2, *shape) and up.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fourier_downsample(up, factor, ndim=len(shape)), y, rtol=0, atol=tol)


@pytest.mark.parametrize(("shape", "factor"), CASES)
def test_upsample_interpolates(shape, factor, gen):
    """U y sampled at the low-res positions f (m - M//2) + N//2 gives back y (Nyquist too)."""
    low = tuple(n // factor for n in shape)
    y = torch.randn(*low, generator=gen, dtype=torch.float64)
    up = fourier_upsample(y, factor)
    idx = [factor * (torch.arange(m) - m // 2) + n // 2 for n, m in zip(shape, low)]
    torch.testing.assert_close(up[torch.meshgrid(*idx, indexing="ij")], y)


@pytest.mark.parametrize(("shape", "factor"), CASES)
def test_means_and_constants_preserved(shape, factor, gen):
    x = torch.randn(4, *shape, generator=gen, dtype=torch.float64) + 3.0
    dims = tuple(range(1, len(shape) + 1))
    down = fourier_downsample(x, factor, ndim=len(shape))
    torch.testing.assert_close(down.mean(dim=dims), x.mean(dim=dims))
    up = fourier_upsample(down, factor, ndim=len(shape))
    torch.testing.assert_close(up.mean(dim=dims), x.mean(dim=dims))
    c = torch.full(shape, 2.5, dtype=torch.float64)
    torch.testing.assert_close(
        fourier_downsample(c, factor), torch.full(down.shape[1:], 2.5, dtype=torch.float64)
    )


@pytest.mark.parametrize("n", [16, 15])
def test_downsample_keeps_low_frequencies(n):
    """A cosine below the low-res Nyquist is sampled exactly; one above it is removed."""
    f = 2 if n % 2 == 0 else 3
    m = n // f
    i = torch.arange(n, dtype=torch.float64) - n // 2
    j = torch.arange(m, dtype=torch.float64) - m // 2
    low_k, high_k = 2, m // 2 + 2
    x = (
        torch.cos(2 * math.pi * low_k * i / n)[:, None]
        + torch.cos(2 * math.pi * high_k * i / n)[None, :]
    )
    expected = torch.cos(2 * math.pi * low_k * (f * j) / n)[:, None] + 0 * j[None, :]
    torch.testing.assert_close(fourier_downsample(x, f), expected)


@pytest.mark.parametrize(("shape", "factor"), [((12, 12), 2), ((15, 15), 3), ((8, 8, 8), 2)])
def test_adjoint_equals_scaled_upsample_off_nyquist(shape, factor, gen):
    op = DownsampleOperator(shape, factor)
    y = torch.randn(*op.range_shape, generator=gen, dtype=torch.float64)
    nd = len(shape)
    if all(m % 2 for m in op.range_shape):
        torch.testing.assert_close(op.adjoint(y), fourier_upsample(y, factor) / factor**nd)
    else:
        # even low-res sizes: they differ, but only at the Nyquist frequencies ±M/2
        diff = op.adjoint(y) - fourier_upsample(y, factor) / factor**nd
        assert diff.abs().max() > 1e-3
        spec = fftn_c(diff, nd).abs()
        nyq = torch.zeros(shape, dtype=torch.bool)
        for axis, (n, m) in enumerate(zip(shape, op.range_shape)):
            if m % 2 == 0:
                idx = torch.tensor([n // 2 - m // 2, n // 2 + m // 2])
                nyq |= torch.zeros(shape, dtype=torch.bool).index_fill(axis, idx, True)
        assert spec[~nyq].max() < 1e-10


def test_project_replaces_low_frequencies(gen):
    op = DownsampleOperator((16, 16), 4)
    x = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    p = op.project(x, y)
    torch.testing.assert_close(op(p), y)
    # idempotent, and the high frequencies (the null space of D) are kept
    torch.testing.assert_close(op.project(p, y), p)
    torch.testing.assert_close(p - x, op.right_inverse(op(p - x)))


def test_linear_upsample_convention(gen):
    y = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    up = linear_upsample(y, 2, ndim=2)
    assert up.shape == (2, 10, 12)
    # low-res sample m lies at high-res index 2 (m - M//2) + N//2
    iy = 2 * (torch.arange(5) - 2) + 5
    ix = 2 * (torch.arange(6) - 3) + 6
    torch.testing.assert_close(up[:, iy][:, :, ix], y)
    # linear data (a ramp) is reproduced between samples, and constants stay constant
    ramp = torch.arange(6, dtype=torch.float64).expand(4, 6)
    up_ramp = linear_upsample(ramp, 2)
    expected = (torch.arange(12, dtype=torch.float64) / 2).clamp(max=5.0).expand(8, 12)
    torch.testing.assert_close(up_ramp, expected)
    c = torch.full((3, 3, 3), 1.5, dtype=torch.float64)
    torch.testing.assert_close(
        linear_upsample(c, 3), torch.full((9, 9, 9), 1.5, dtype=torch.float64)
    )


def test_non_dividing_sizes_and_ambiguous_rank_rejected():
    with pytest.raises(InputError, match="whole number"):
        fourier_downsample(torch.zeros(10, 10), 3)
    with pytest.raises(InputError, match="ndim"):
        fourier_downsample(torch.zeros(2, 1, 8, 8), 2)
    with pytest.raises(InputError, match="sharpen"):
        resolution_blur(torch.zeros(8, 8), 1.0, 6.0, 3.0)


def test_resolution_convention():
    assert SIGMA_PER_RESOLUTION == pytest.approx(0.225, abs=1e-3)  # Chimera molmap
    # the Gaussian's Fourier transform falls to 1/e at k = 1/R
    sigma = resolution_to_sigma(4.0)
    assert math.exp(-2 * math.pi**2 * sigma**2 / 4.0**2) == pytest.approx(math.exp(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blur_equal_resolutions_is_identity(dtype, gen):
    x = torch.randn(2, 9, 9, 9, generator=gen, dtype=torch.float64).to(dtype)
    assert torch.equal(resolution_blur(x, 1.2, 4.0, 4.0, ndim=3), x)


def _gaussian(shape, px, sigma):
    axes = [(torch.arange(n, dtype=torch.float64) - n // 2) * px for n in shape]
    r2 = sum(a**2 for a in torch.meshgrid(*axes, indexing="ij"))
    return torch.exp(-r2 / (2 * sigma**2))


def _width(v: torch.Tensor, px: float) -> float:
    """Gaussian σ (Å) from the second moment along the last axis."""
    n = v.shape[-1]
    x = (torch.arange(n, dtype=torch.float64) - n // 2) * px
    w = v.sum(dim=tuple(range(v.ndim - 1)))
    return float(((w * x**2).sum() / w.sum()).sqrt())


@pytest.mark.parametrize("n", [48, 49])
def test_blur_3_to_6_angstrom_width(n):
    """A point "at 3 Å" (the convention's Gaussian) blurred to 6 Å has the 6 Å width; a
    delta blurred from 0 to 6 Å too."""
    px = 0.5
    start = _gaussian((n, n), px, resolution_to_sigma(3.0))
    out = resolution_blur(start, px, 3.0, 6.0)
    assert _width(out, px) == pytest.approx(6.0 / (math.pi * math.sqrt(2)), rel=1e-4)
    assert out.sum() == pytest.approx(start.sum())
    delta = torch.zeros(n, n, n, dtype=torch.float64)
    delta[n // 2, n // 2, n // 2] = 1.0
    blurred = resolution_blur(delta, px, 0.0, 6.0)
    torch.testing.assert_close(
        blurred / blurred.max(),
        _gaussian((n, n, n), px, resolution_to_sigma(6.0)),
        atol=2e-4,
        rtol=0,
    )


def test_degrade_composition(gen):
    x = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    out = degrade(x, 2, 1.5)
    assert out.pixel_size == 3.0
    torch.testing.assert_close(out.data, fourier_downsample(x, 2))
    blurred = degrade(x, 2, 1.5, blur_to=8.0, blur_from=3.0)
    torch.testing.assert_close(
        blurred.data, fourier_downsample(resolution_blur(x, 1.5, 3.0, 8.0), 2)
    )
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noisy = degrade(x, 2, 1.5, noise_std=0.3, generator=g1).data
    torch.testing.assert_close(noisy, degrade(x, 2, 1.5, noise_std=0.3, generator=g2).data)
    resid = noisy - out.data
    assert float(resid.std()) == pytest.approx(0.3, rel=0.25)
