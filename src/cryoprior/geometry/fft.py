"""Centred FFTs: the DC term and the real-space origin both sit at index N//2."""

from __future__ import annotations

import torch


def _dims(x: torch.Tensor, ndim: int) -> tuple[int, ...]:
    return tuple(range(x.ndim - ndim, x.ndim))


def fftn_c(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred forward FFT over the last ``ndim`` axes (unnormalised, like numpy)."""
    d = _dims(x, ndim)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=d), dim=d), dim=d)


def ifftn_c(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred inverse FFT over the last ``ndim`` axes (1/N normalisation, like numpy)."""
    d = _dims(x, ndim)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=d), dim=d), dim=d)


def fft2_c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT of images [..., y, x]."""
    return fftn_c(x, 2)


def ifft2_c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D inverse FFT of spectra [..., ky, kx]."""
    return ifftn_c(x, 2)


def fft3_c(x: torch.Tensor) -> torch.Tensor:
    """Centred 3D FFT of volumes [..., z, y, x]."""
    return fftn_c(x, 3)


def ifft3_c(x: torch.Tensor) -> torch.Tensor:
    """Centred 3D inverse FFT of spectra [..., kz, ky, kx]."""
    return ifftn_c(x, 3)
