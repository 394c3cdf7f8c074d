"""Sub-pixel image translation by Fourier phase ramps.

A shift (dx, dy) in pixels moves the content toward +x and +y: a delta at index [c, c]
moves to [c + dy, c + dx]. In Fourier space (centred, frequency index k relative to N//2)
the spectrum is multiplied by exp(-2 pi i (kx dx / W + ky dy / H)). For an even size the
unpaired Nyquist term (k = -N/2) is multiplied by cos(pi d) instead, the average of the
ramp at +N/2 and -N/2, so a real image stays real; for integer shifts this is exactly
``torch.roll`` (cos(pi d) = exp(i pi d) = (-1)^d). For a non-integer shift of an even
size the Nyquist term is damped by |cos(pi d)|, so shift-then-unshift is exact only for
images without Nyquist content (and always for odd sizes).
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.errors import InputError
from cryoprior.core.tensors import complex_dtype
from cryoprior.geometry.fft import fft2_c, ifft2_c
from cryoprior.geometry.grids import centered_indices


def _axis_ramp(n: int, d: torch.Tensor) -> torch.Tensor:
    """Phase factors (..., n) for a shift ``d`` (...,) in pixels along an axis of length n."""
    k = centered_indices(n, d.dtype, d.device)
    arg = -2.0 * math.pi * d[..., None] * k / n
    ramp = torch.polar(torch.ones_like(arg), arg)
    if n % 2 == 0:
        nyquist = torch.cos(math.pi * d)[..., None].to(ramp.dtype)
        ramp = torch.cat([nyquist, ramp[..., 1:]], dim=-1)  # index 0 holds k = -n/2
    return ramp


def _phase_ramp(shape: tuple[int, int], shifts: torch.Tensor) -> torch.Tensor:
    if shifts.shape[-1] != 2:
        raise InputError(
            f"shifts must have shape (..., 2) as (dx, dy) in pixels, got {tuple(shifts.shape)}"
        )
    h, w = shape
    ry = _axis_ramp(h, shifts[..., 1])  # (..., H)
    rx = _axis_ramp(w, shifts[..., 0])  # (..., W)
    return ry[..., :, None] * rx[..., None, :]


def shift_spectra(spectra: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Centred spectra (..., H, W) of images shifted by ``shifts`` (..., 2) = (dx, dy) px.

    ``shifts`` broadcasts against the leading dims of ``spectra``.
    """
    if spectra.ndim < 2:
        raise InputError(f"spectra must be (..., H, W), got shape {tuple(spectra.shape)}")
    real = torch.float64 if spectra.dtype == torch.complex128 else torch.float32
    ramp = _phase_ramp(
        tuple(spectra.shape[-2:]), torch.as_tensor(shifts, dtype=real, device=spectra.device)
    )
    return spectra * ramp


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Real images (..., H, W) translated by ``shifts`` (..., 2) = (dx, dy) in pixels.

    Content moves toward +x for dx > 0 and +y (increasing row index) for dy > 0; sub-pixel
    shifts are band-limited (Fourier) interpolation with periodic wrap-around.
    """
    if images.ndim < 2 or images.is_complex():
        raise InputError(
            f"images must be real (..., H, W), got {images.dtype} {tuple(images.shape)}"
        )
    spectra = fft2_c(images.to(complex_dtype(images.dtype)))
    return ifft2_c(shift_spectra(spectra, shifts)).real.to(images.dtype)
