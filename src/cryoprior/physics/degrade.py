"""Degradation operators for super-resolution: Fourier cropping, upsampling, resolution blur.

Every function acts on the last ``ndim`` axes of a tensor (images (..., H, W): ``ndim=2``;
maps (..., D, H, W): ``ndim=3``); with ``ndim=None`` the tensor must be one image or map
(2 or 3 axes, all spatial). Grids follow the project convention: the origin sits at index
N//2 and Fourier transforms are centred (:mod:`cryoprior.geometry.fft`), so the centre
voxel of an N grid maps to the centre voxel of the resampled grid, and low-resolution
sample m sits at high-resolution index ``factor · (m − M//2) + N//2``.

Fourier resampling between N and M = N / factor samples per axis (separable, one axis
at a time):

- :func:`fourier_downsample` (D) keeps the central M coefficients of the centred
  spectrum and scales by (M/N)^ndim so that means (and constant maps) are preserved; the
  pixel size grows by ``factor``. For even M the unpaired low-resolution Nyquist bin
  −M/2 receives the sum of the high-resolution coefficients at ±M/2 (what sampling a
  signal band-limited to |k| ≤ M/2 gives), which keeps the output real and exact.
- :func:`fourier_upsample` (U, the "sinc" baseline) zero-pads the centred spectrum and
  scales by (N/M)^ndim; for even M the Nyquist coefficient is split in halves between ±M/2,
  so U interpolates (its samples at the low-resolution positions equal the input) and
  D U = I exactly.
- :class:`DownsampleOperator` wraps D as a :class:`~cryoprior.physics.operators.
  LinearOperator` with its true adjoint Dᵀ = factor^(−ndim) Ũ, where Ũ is U except that
  for even M it copies the full Nyquist coefficient to both ±M/2 instead of halves. For
  odd M (and away from the Nyquist planes for even M) the adjoint is U / factor^ndim.

:func:`linear_upsample` is the (bi/tri)linear baseline on the same grid convention.

:func:`resolution_blur` converts a map "at R₁ Å" into one "at R₂ Å" with the Gaussian
convention of UCSF Chimera's ``molmap`` (σ = R / (π √2) ≈ 0.225 R, the Gaussian whose
Fourier transform falls to 1/e at spatial frequency 1/R), and :func:`degrade` composes
blur → Fourier downsampling → white noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.geometry.fft import fftn_c, ifftn_c
from cryoprior.geometry.grids import frequency_grid
from cryoprior.physics.operators import LinearOperator

#: σ / resolution of the molmap convention: 1 / (π √2) ≈ 0.2251
#: (UCSF Chimera ``molmap`` documentation, option ``sigmaFactor``).
SIGMA_PER_RESOLUTION = 1.0 / (math.pi * math.sqrt(2.0))


def _spatial_ndim(x: torch.Tensor, ndim: int | None) -> int:
    require(
        isinstance(x, torch.Tensor) and x.is_floating_point(),
        f"expected a real floating-point tensor, got {getattr(x, 'dtype', type(x))}",
    )
    if ndim is None:
        require(
            x.ndim in (2, 3),
            f"a tensor of shape {tuple(x.shape)} is not one image (H, W) or map (D, H, W): "
            "pass ndim=2 (images) or ndim=3 (maps) to say which trailing axes are spatial",
        )
        return x.ndim
    require(
        int(ndim) in (1, 2, 3) and x.ndim >= int(ndim),
        f"ndim must be 1, 2 or 3 and at most x.ndim = {x.ndim}, got {ndim}",
    )
    return int(ndim)


def resampled_shape(shape: Sequence[int], factor: float, up: bool = False) -> tuple[int, ...]:
    """The grid ``shape`` divided (or with ``up=True`` multiplied) by ``factor`` per axis.

    Raises :class:`~cryoprior.core.errors.InputError` unless every size divides exactly,
    so that the pixel size changes by exactly ``factor``.
    """
    f = require_positive(factor, "resampling factor")
    require(f >= 1.0, f"the resampling factor must be >= 1, got {factor}")
    out = []
    for n in shape:
        m = n * f if up else n / f
        r = round(m)
        require(
            abs(m - r) < 1e-6 and r >= 1,
            f"a size-{n} axis cannot be {'up' if up else 'down'}sampled by {factor}: "
            f"{n} {'*' if up else '/'} {factor} = {m:g} is not a whole number of pixels; "
            "crop or pad the box to a size that divides",
        )
        out.append(int(r))
    return tuple(out)


def _fft1(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(x, dim=dim), dim=dim), dim=dim)


def _ifft1(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(x, dim=dim), dim=dim), dim=dim)


def _crop_spectrum(spec: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """Central m of the n centred coefficients along ``dim``; for even m the bin −m/2
    takes the sum of the coefficients at ±m/2."""
    n = spec.shape[dim]
    start = n // 2 - m // 2
    if m % 2:
        return spec.narrow(dim, start, m)
    nyquist = spec.narrow(dim, start, 1) + spec.narrow(dim, n // 2 + m // 2, 1)
    return torch.cat([nyquist, spec.narrow(dim, start + 1, m - 1)], dim=dim)


def _pad_spectrum(spec: torch.Tensor, dim: int, n: int, nyquist_weight: float) -> torch.Tensor:
    """Zero-pad m centred coefficients to n along ``dim``; for even m the bin −m/2 goes to
    both ±m/2 times ``nyquist_weight`` (½: interpolation, 1: adjoint of the crop)."""
    m = spec.shape[dim]
    start = n // 2 - m // 2

    def zeros(k: int) -> torch.Tensor:
        shape = list(spec.shape)
        shape[dim] = k
        return spec.new_zeros(shape)

    if m % 2:
        parts = [zeros(start), spec, zeros(n - start - m)]
    else:
        nyq = nyquist_weight * spec.narrow(dim, 0, 1)
        parts = [zeros(start), nyq, spec.narrow(dim, 1, m - 1), nyq, zeros(n - start - m - 1)]
    return torch.cat(parts, dim=dim)


def _resample(x: torch.Tensor, out_shape: Sequence[int], mode: str) -> torch.Tensor:
    """Fourier resampling of the trailing ``len(out_shape)`` axes, one axis at a time.

    mode "down": D; "up": U; "adjoint": Dᵀ (see the module docstring).
    """
    nd = len(out_shape)
    for i, n_out in enumerate(out_shape):
        dim = x.ndim - nd + i
        n_in = x.shape[dim]
        if n_in == n_out:
            continue
        spec = _fft1(x, dim)
        if mode == "down":
            spec = _crop_spectrum(spec, dim, n_out) * (n_out / n_in)
        else:
            weight = 0.5 if mode == "up" else 1.0
            scale = n_out / n_in if mode == "up" else 1.0
            spec = _pad_spectrum(spec, dim, n_out, weight) * scale
        x = _ifft1(spec, dim).real
    return x


def fourier_downsample(x: torch.Tensor, factor: float, ndim: int | None = None) -> torch.Tensor:
    """Fourier cropping by ``factor``: keep the central 1/factor of the centred spectrum.

    Returns (..., *shape / factor), scaled by factor^(−ndim) in Fourier space so that
    pixel values and means are preserved (a constant stays the same constant); the
    pixel size becomes ``pixel_size · factor``. Every spatial size must divide by
    ``factor``. For even output sizes the Nyquist bin collects both ±Nyquist coefficients
    (module docstring), so ``fourier_downsample(fourier_upsample(y, f), f) == y``.
    """
    nd = _spatial_ndim(x, ndim)
    out = resampled_shape(x.shape[x.ndim - nd :], factor)
    return _resample(x, out, "down")


def fourier_upsample(y: torch.Tensor, factor: float, ndim: int | None = None) -> torch.Tensor:
    """Zero-padding of the centred spectrum by ``factor`` (band-limited "sinc" interpolation).

    Returns (..., *shape · factor) scaled so that values and means are preserved; the
    samples at the low-resolution positions equal ``y``. Equals factor^ndim times the
    adjoint of :func:`fourier_downsample`, except in the Nyquist planes of even input
    sizes, where the coefficient is split in halves between ±Nyquist (the adjoint copies
    it to both).
    """
    nd = _spatial_ndim(y, ndim)
    out = resampled_shape(y.shape[y.ndim - nd :], factor, up=True)
    return _resample(y, out, "up")


def fourier_resize(x: torch.Tensor, size: Sequence[int], ndim: int | None = None) -> torch.Tensor:
    """Fourier crop or zero-pad each trailing spatial axis to ``size`` (any sizes).

    Each axis's centred spectrum is cropped (size smaller: the pixel grows by n/size) or
    zero-padded (size larger: band-limited interpolation, the pixel shrinks by n/size),
    scaled so that pixel values and means are preserved. The physical box stays the same;
    ``fourier_resize(fourier_resize(x, m), n) == x`` when m >= n (crop after pad)."""
    nd = _spatial_ndim(x, ndim)
    size = tuple(int(n) for n in size)
    require(len(size) == nd and all(n >= 1 for n in size), f"size must be {nd} sizes >= 1")
    for i, n_out in enumerate(size):
        dim = x.ndim - nd + i
        n_in = x.shape[dim]
        if n_out == n_in:
            continue
        one = [n_out if j == i else x.shape[x.ndim - nd + j] for j in range(nd)]
        x = _resample(x, one, "down" if n_out < n_in else "up")
    return x


def _linear_axis(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    m = x.shape[dim]
    f = n_out / m
    pos = torch.arange(n_out, dtype=torch.float64, device=x.device)
    u = ((pos - n_out // 2) / f + m // 2).clamp(0, m - 1)
    lo = u.floor().long().clamp(max=m - 1)
    hi = (lo + 1).clamp(max=m - 1)
    w = (u - lo).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = n_out
    w = w.reshape(shape)
    return x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w


def linear_upsample(y: torch.Tensor, factor: float, ndim: int | None = None) -> torch.Tensor:
    """Separable linear (bilinear for images, trilinear for maps) upsampling by ``factor``.

    High-resolution index i samples the low-resolution coordinate
    (i − N//2) / factor + M//2 (the module's grid convention, the same as the Fourier
    resampling; ``torch.nn.functional.interpolate(align_corners=False)`` would instead
    put pixel centres at (i + ½)/factor − ½, shifted by up to (factor − 1)/2 high-res
    pixels from this convention). Outside the low-resolution samples the edge value is
    held.
    """
    nd = _spatial_ndim(y, ndim)
    out = resampled_shape(y.shape[y.ndim - nd :], factor, up=True)
    for i, n_out in enumerate(out):
        y = _linear_axis(y, y.ndim - nd + i, n_out)
    return y


class DownsampleOperator(LinearOperator):
    """Fourier cropping D (:func:`fourier_downsample`) of grids of ``shape`` by ``factor``,
    with its true adjoint (module docstring).

    ``shape`` is one sample's spatial shape ((H, W) or (D, H, W)); inputs are
    (*batch, *shape) and outputs (*batch, *shape / factor).
    """

    def __init__(self, shape: Sequence[int], factor: float) -> None:
        self.domain_shape = tuple(int(n) for n in shape)
        require(
            1 <= len(self.domain_shape) <= 3,
            f"shape must have 1 to 3 axes, got {tuple(shape)}",
        )
        self.factor = float(factor)
        self.range_shape = resampled_shape(self.domain_shape, self.factor)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _resample(x, self.range_shape, "down")

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return _resample(y, self.domain_shape, "adjoint")

    def right_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """U y (:func:`fourier_upsample`): D U y = y exactly."""
        return _resample(y, self.domain_shape, "up")

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + U (y − D x): x with its low-frequency Fourier coefficients replaced by those
        of the measurement y, so that D(result) = y; higher frequencies are untouched."""
        return x + self.right_inverse(y - self.apply(x))


def resolution_to_sigma(resolution: float) -> float:
    """Gaussian standard deviation in Å of a map "at ``resolution`` Å": σ = R / (π √2).

    Chimera ``molmap``'s default (sigmaFactor ≈ 0.225): the Gaussian's Fourier transform
    exp(−2π² σ² k²) falls to 1/e at k = 1/R. Equivalent B-factor B = 8π² σ² = 4 R² Å².
    """
    return float(resolution) * SIGMA_PER_RESOLUTION


def resolution_blur(
    x: torch.Tensor,
    pixel_size: float,
    from_resolution: float,
    to_resolution: float,
    ndim: int | None = None,
) -> torch.Tensor:
    """Blur a map "at ``from_resolution`` Å" into one "at ``to_resolution`` Å".

    Convolves with the Gaussian of σ = sqrt(σ_to² − σ_from²) Å (σ_R = R / (π √2), see
    :func:`resolution_to_sigma`; Gaussians add in quadrature), i.e. multiplies the centred
    spectrum by exp(−2π² σ² |k|²) (k in cycles/Å), the B-factor envelope exp(−B|k|²/4)
    with B = 8π² σ². The filter is applied on the periodic grid (wrap-around at the box
    edges). ``from_resolution = 0`` treats ``x`` as perfectly sharp; equal resolutions
    return ``x`` unchanged.
    """
    nd = _spatial_ndim(x, ndim)
    px = require_positive(pixel_size, "pixel size (Å/px)")
    r_to = require_positive(to_resolution, "target resolution (Å)")
    r_from = float(from_resolution)
    require(r_from >= 0, f"from_resolution must be >= 0 Å, got {from_resolution}")
    require(
        r_to >= r_from,
        f"cannot sharpen: to_resolution ({to_resolution} Å) must be >= from_resolution "
        f"({from_resolution} Å)",
    )
    var = resolution_to_sigma(r_to) ** 2 - resolution_to_sigma(r_from) ** 2
    if var <= 0:
        return x.clone()
    shape = tuple(x.shape[x.ndim - nd :])
    k2 = (frequency_grid(shape, px, torch.float64, x.device) ** 2).sum(dim=-1)
    envelope = torch.exp(-2.0 * math.pi**2 * var * k2).to(x.dtype)
    return ifftn_c(fftn_c(x, nd) * envelope, nd).real


class Degraded(NamedTuple):
    """A degraded tensor and its pixel size in Å/px."""

    data: torch.Tensor
    pixel_size: float


def degrade(
    x: torch.Tensor,
    factor: float,
    pixel_size: float,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    blur_to: float | None = None,
    blur_from: float = 0.0,
    ndim: int | None = None,
) -> Degraded:
    """Blur → Fourier downsample → white Gaussian noise: the SR3 forward model.

    ``blur_to`` (Å, optional): :func:`resolution_blur` from ``blur_from`` Å (the
    resolution of ``x``; 0 = perfectly sharp) to ``blur_to`` Å. Then
    :func:`fourier_downsample` by ``factor``, then noise of standard deviation
    ``noise_std`` (in ``x``'s units, per low-resolution pixel) drawn from ``generator``.
    Returns the low-resolution tensor and its pixel size ``pixel_size · factor``.
    """
    nd = _spatial_ndim(x, ndim)
    px = require_positive(pixel_size, "pixel size (Å/px)")
    require(noise_std >= 0, f"noise_std must be >= 0, got {noise_std}")
    if blur_to is not None:
        x = resolution_blur(x, px, blur_from, blur_to, nd)
    y = fourier_downsample(x, factor, nd)
    if noise_std > 0:
        dev = generator.device if generator is not None else y.device
        n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=dev)
        y = y + noise_std * n.to(y.device)
    return Degraded(y, px * float(factor))


__all__ = [
    "SIGMA_PER_RESOLUTION",
    "Degraded",
    "DownsampleOperator",
    "degrade",
    "fourier_downsample",
    "fourier_resize",
    "fourier_upsample",
    "linear_upsample",
    "resampled_shape",
    "resolution_blur",
    "resolution_to_sigma",
]
