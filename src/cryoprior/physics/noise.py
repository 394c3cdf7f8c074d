"""Additive white Gaussian noise at a requested signal-to-noise ratio.

SNR convention (DESIGN.md): the variance of the noiseless (CTF-modulated) image over the
whole box divided by the noise variance. Over a stack the signal variance is the mean of
the per-image variances, so one sigma serves the whole stack.
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.errors import InputError, require
from cryoprior.core.tensors import expand_like


def _check_snr(snr: float) -> float:
    try:
        value = float(snr)
    except (TypeError, ValueError):
        raise InputError(f"SNR must be a number > 0, got {snr!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise InputError(f"SNR must be a finite number > 0 (variance ratio), got {snr!r}")
    return value


def signal_variance(clean_images: torch.Tensor, image_ndim: int = 2) -> float:
    """Mean over the stack of each image's variance over its whole box (population)."""
    require(
        clean_images.ndim >= image_ndim >= 1,
        f"need images with at least {image_ndim} dims, got shape {tuple(clean_images.shape)}",
    )
    flat = clean_images.reshape(*clean_images.shape[: clean_images.ndim - image_ndim], -1)
    return float(flat.to(torch.float64).var(dim=-1, unbiased=False).mean())


def noise_sigma_for_snr(clean_images: torch.Tensor, snr: float, image_ndim: int = 2) -> float:
    """Noise standard deviation giving ``snr`` = var(clean image) / sigma^2.

    ``clean_images`` (..., H, W) are the noiseless (CTF-modulated) images; the variance is
    taken over each whole box (the last ``image_ndim`` dims: 2 for images, 3 for volumes)
    and averaged over the stack.
    """
    snr = _check_snr(snr)
    var = signal_variance(clean_images, image_ndim)
    require(var > 0, "the clean images are constant (zero variance): an SNR is undefined")
    return math.sqrt(var / snr)


def add_noise(
    images: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``images`` plus i.i.d. N(0, sigma^2) noise drawn from ``generator``.

    ``sigma`` is a scalar or one value per image (shape (B,), batch first).
    """
    sig = torch.as_tensor(sigma, dtype=images.dtype)
    if not bool((sig >= 0).all()):
        raise InputError(f"noise sigma must be >= 0, got {sigma!r}")
    noise = torch.randn(
        images.shape,
        generator=generator,
        dtype=images.dtype,
        device="cpu" if generator is None else generator.device,
    )
    return images + expand_like(sig, images) * noise.to(images.device)


def add_noise_at_snr(
    images: torch.Tensor, snr: float, generator: torch.Generator | None = None, image_ndim: int = 2
) -> tuple[torch.Tensor, float]:
    """Noisy images at the requested SNR, and the sigma used (see the module docstring)."""
    sigma = noise_sigma_for_snr(images, snr, image_ndim)
    return add_noise(images, sigma, generator), sigma
