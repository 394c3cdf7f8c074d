"""A white Gaussian noise model and statistics measured from particle images alone.

:class:`GaussianNoiseModel` is the likelihood of solvers that compare images with a
forward model (:mod:`cryoprior.physics.operators`); :func:`estimate_noise_sigma` measures
its σ from the image background (RELION's particle normalisation), and
:func:`estimate_map_integral` the imaged map's integral from the images' DC terms, so that
a prior's units can be matched to a measurement without the ground truth.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.geometry.grids import centered_indices


def _per_sample_norm(r: torch.Tensor, event_ndim: int) -> torch.Tensor:
    return r.flatten(r.ndim - event_ndim).norm(dim=-1) if event_ndim else r.abs()


class GaussianNoiseModel:
    """White Gaussian noise n ~ N(0, σ² I) of standard deviation ``sigma`` (in y's units).

    Methods take the measurement ``y`` (*event) and model predictions ``y_model``
    (*batch, *event) and return per-sample values (*batch).
    """

    def __init__(self, sigma: float) -> None:
        self.sigma = require_positive(sigma, "noise sigma")

    @classmethod
    def from_images(cls, images: torch.Tensor, mask_radius: float) -> GaussianNoiseModel:
        """The noise model with σ from :func:`estimate_noise_sigma` (image background)."""
        return cls(estimate_noise_sigma(images, mask_radius))

    def residual_norm(self, y: torch.Tensor, y_model: torch.Tensor) -> torch.Tensor:
        """‖y − y_model‖ per sample."""
        return _per_sample_norm(y_model - y, y.ndim)

    def log_likelihood(self, y: torch.Tensor, y_model: torch.Tensor) -> torch.Tensor:
        """log N(y; y_model, σ² I) = −‖y − y_model‖²/(2σ²) − (M/2) log(2πσ²), per sample."""
        m = y.numel()
        r2 = self.residual_norm(y, y_model) ** 2
        return -r2 / (2 * self.sigma**2) - 0.5 * m * math.log(2 * math.pi * self.sigma**2)

    def expected_residual_norm(self, y: torch.Tensor) -> float:
        """σ √M: the residual norm of the true signal (discrepancy principle target)."""
        return self.sigma * math.sqrt(y.numel())

    def sample(
        self, y_model: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """y_model + n with n ~ N(0, σ² I) drawn from ``generator`` (on its device)."""
        dev = generator.device if generator is not None else y_model.device
        n = torch.randn(y_model.shape, generator=generator, dtype=y_model.dtype, device=dev)
        return y_model + self.sigma * n.to(y_model.device)


def background_mask(shape: tuple[int, int], mask_radius: float) -> torch.Tensor:
    """Boolean (H, W) mask of the pixels farther than ``mask_radius`` px from (H//2, W//2)."""
    h, w = shape
    yy = centered_indices(h, torch.float64)[:, None]
    xx = centered_indices(w, torch.float64)[None, :]
    return (yy**2 + xx**2) > float(mask_radius) ** 2


def estimate_noise_sigma(images: torch.Tensor, mask_radius: float) -> float:
    """Noise standard deviation from the background of particle images.

    The standard estimate (as in RELION's particle normalisation): the pixels outside a
    circle of radius ``mask_radius`` pixels around the image centre are taken to hold
    noise only. Each image's background mean is removed and the variances are pooled,
    σ² = Σ_i Σ_{p ∉ mask} (y_ip − ȳ_i)² / (K (P − 1)), over K images of P background
    pixels. Uses the measurement alone. Biased upwards where the particle's signal
    reaches beyond the circle (CTF delocalisation of ~λΔf/d Å at resolution d): pick the
    radius past the particle plus that spread.

    ``images`` (..., H, W); returns σ in the images' units.
    """
    require(
        isinstance(images, torch.Tensor) and images.ndim >= 2 and images.is_floating_point(),
        f"images must be a real (..., H, W) tensor, got {tuple(getattr(images, 'shape', ()))}",
    )
    require(mask_radius >= 0, f"mask radius must be >= 0 px, got {mask_radius}")
    bg = background_mask(tuple(images.shape[-2:]), mask_radius).to(images.device)
    n_bg = int(bg.sum())
    require(
        n_bg >= 16,
        f"only {n_bg} pixels lie outside a radius of {mask_radius} px in "
        f"{tuple(images.shape[-2:])} images: use a smaller mask radius",
    )
    pixels = images.reshape(-1, *images.shape[-2:])[:, bg].to(torch.float64)
    centred = pixels - pixels.mean(dim=-1, keepdim=True)
    var = float((centred**2).sum() / (pixels.shape[0] * (n_bg - 1)))
    return math.sqrt(var)


class MapIntegral(NamedTuple):
    """Estimate of ∫V d³r (map units × Å³) and its standard error."""

    integral: float
    stderr: float


def estimate_map_integral(
    images: torch.Tensor,
    ctf_at_zero: torch.Tensor | float | None = None,
    pixel_size: float = 1.0,
) -> MapIntegral:
    """The integral of the imaged map from the images' DC terms, from the measurement alone.

    In the convention of :class:`~cryoprior.physics.operators.ProjectionCTFOperator` (image
    = Σ_z V, voxel units) the sum of an image's pixels is its DC term, which the projection
    preserves and the CTF multiplies by CTF(0) (= sin(phase shift + atan(Q0/√(1−Q0²))), the
    amplitude contrast Q0 without a phase plate): Σ_p y_ip = c_i Σ_voxels V + noise. The
    least-squares fit over the K images is S = Σ_i c_i s_i / Σ_i c_i² (s_i the pixel sums),
    and ∫V d³r = pixel_size³ · S. The standard error comes from the scatter of the s_i about
    c_i S. Needs images whose DC term is intact (not background-normalised) and whose
    particle lies inside the box. Two limits, both measurable:

    - noise adds σ D / (|c| √K) to S (D² pixels per image): with amplitude contrast only
      (c ≈ 0.1) thousands of particles are needed for a few per cent, with a phase plate
      (c ≈ 1) about a hundred times fewer;
    - a CTF applied on a larger field than the box (real micrographs; the simulator's
      padded model) moves part of each particle's CTF fringes out of the box. Their net
      contribution averages out over defoci when the box is large compared with the
      delocalisation λ Δf / (2 · pixel size) (about 0.2 % bias measured for a 144 Å box at
      3 Å/px and 1–2.5 µm defocus), but not in small boxes (−48 % for a 48 Å box at
      2 Å/px, same defoci).

    ``images`` (K, H, W); ``ctf_at_zero`` (K,) or a scalar (None: no CTF, c = 1).
    """
    require(
        isinstance(images, torch.Tensor) and images.ndim == 3 and images.is_floating_point(),
        f"images must be a real (K, H, W) tensor, got {tuple(getattr(images, 'shape', ()))}",
    )
    px = require_positive(pixel_size, "pixel size (Å/px)")
    k = images.shape[0]
    require(k >= 1, "need at least one image")
    sums = images.to(torch.float64).sum(dim=(-2, -1)).cpu()
    c = (
        torch.ones(k, dtype=torch.float64)
        if ctf_at_zero is None
        else torch.as_tensor(ctf_at_zero, dtype=torch.float64).cpu().expand(k)
    )
    cc = float((c * c).sum())
    if not cc > 1e-12 * k:
        raise InputError(
            "the CTF is zero at zero frequency (no amplitude contrast and no phase shift): "
            "the images carry no information on the map's integral"
        )
    s_hat = float((c * sums).sum()) / cc
    if k > 1:
        resid = sums - c * s_hat
        stderr = math.sqrt(float((resid**2).sum()) / (k - 1) / cc)
    else:
        stderr = float("nan")
    return MapIntegral(s_hat * px**3, stderr * px**3)


def estimate_intensity_scale(
    images: torch.Tensor,
    reference_integral: float,
    ctf_at_zero: torch.Tensor | float | None = None,
    pixel_size: float = 1.0,
) -> float:
    """c such that the measurement is c · A(x_phys): measured ∫V d³r / ``reference_integral``.

    The numerator comes from the images alone (:func:`estimate_map_integral`: least-squares
    fit of the images' DC terms over CTF(0), times pixel_size³); ``reference_integral`` is
    the integral of the molecule in the prior's physical units
    (:func:`~cryoprior.physics.composition.potential_integral` of its composition, or the
    number of Cα times the blob amplitude). ``images`` (K, H, W) in the operator's
    (voxel-sum) units.
    """
    ref = require_positive(reference_integral, "reference integral")
    return estimate_map_integral(images, ctf_at_zero, pixel_size).integral / ref


__all__ = [
    "GaussianNoiseModel",
    "MapIntegral",
    "background_mask",
    "estimate_intensity_scale",
    "estimate_map_integral",
    "estimate_noise_sigma",
]
