"""Half maps + a density-map prior -> posterior samples of the map (``cryoprior denoise``).

1. The halves go to the prior's grid (:func:`~cryoprior.solvers.prior_reconstruction.
   prior_grid_plan`: the user's box at the prior's pixel size, Fourier crop or pad within
   limits; refused with a message otherwise).
2. Their difference gives the average's noise power per shell and their FSC
   (:func:`~cryoprior.solvers.halfmap.half_map_noise`); the average is the measurement
   of a Fourier-diagonal Gaussian likelihood (:class:`~cryoprior.solvers.halfmap.
   HalfMapLikelihood`, noise σ = 1 in its whitened units).
3. The intensity unit: the average's integral over the box against the prior's integral
   for the molecule's mass (never a ground truth), or a given scale.
4. Diffusion posterior sampling (:func:`~cryoprior.solvers.dps.dps_sample`), the mean and
   per-voxel spread of the samples, mapped back to the user's box and pixel size. The
   guidance's Gaussian approximation of x0 | x_t uses one white prior variance by
   default (the setting ``benchmarks/denoise.py`` measured) or, with
   ``spectrum="protein"``, the expected spectrum of a protein of the given mass (as
   :func:`~cryoprior.solvers.prior_reconstruction.reconstruct_with_prior` does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from cryoprior.core.errors import InputError, require_positive
from cryoprior.physics.composition import potential_integral_from_mass
from cryoprior.physics.degrade import fourier_resize
from cryoprior.physics.projection import crop_centred
from cryoprior.priors import Prior
from cryoprior.solvers.dps import DPSResult, dps_sample
from cryoprior.solvers.grid_plan import GridPlan
from cryoprior.solvers.halfmap import (
    HalfMapLikelihood,
    HalfMapNoise,
    half_map_noise,
    measured_fourier_mask,
)
from cryoprior.solvers.prior_reconstruction import (
    DEFAULT_GUIDANCE,
    DEFAULT_N_INNER,
    IntensityScale,
    choose_spectrum,
    prior_grid_plan,
    protein_prior_power,
)


def to_prior_grid(volume: torch.Tensor, plan: GridPlan) -> torch.Tensor:
    """A map (..., box, box, box) at the user's pixel size -> the prior's grid (the inverse
    of :meth:`GridPlan.map_back`: centred crop, then Fourier resize)."""
    if plan.crop != plan.box:
        volume = crop_centred(volume, plan.crop, 3)
    if plan.crop != plan.target_box:
        volume = fourier_resize(volume, (plan.target_box,) * 3, ndim=3)
    return volume


def map_intensity_scale(
    average: torch.Tensor,
    pixel_size: float,
    mass_kda: float | None = None,
    value: float | None = None,
) -> IntensityScale:
    """c in "map = c · (map in the prior's units)": ∫average d³r over the box (Å³ ·
    units) / the prior's integral for ``mass_kda``, or the ``value`` given."""
    if value is not None:
        return IntensityScale(require_positive(value, "intensity scale"), "given")
    if mass_kda is None:
        raise InputError(
            "the prior needs the map's intensity scale: give the molecule's mass "
            "(--mass-kda or --sequence) or --intensity-scale"
        )
    integral = float(average.to(torch.float64).sum()) * pixel_size**3
    ref = potential_integral_from_mass(mass_kda)
    if not integral > 0:
        raise InputError(
            f"the half maps integrate to {integral:.3g} (not positive): they may be "
            "background-subtracted to zero mean; give --intensity-scale"
        )
    return IntensityScale(integral / ref, "map integral / mass", integral, None, ref)


@dataclass
class DenoisedMap:
    """Mean, spread and samples on the user's grid (measurement units per voxel), the
    half maps' noise spectra on the prior's grid, the scale, the DPS record, timings."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor
    average: torch.Tensor
    noise: HalfMapNoise
    scale: IntensityScale
    plan: GridPlan
    dps: DPSResult
    seconds: dict[str, float]
    measured_fraction: float = 1.0

    def info(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "grid": self.plan.describe(),
            "prior_grid_halves_fsc0143": self.noise.resolution(0.143),
            "prior_grid_halves_fsc05": self.noise.resolution(0.5),
            "measured_fraction": self.measured_fraction,
            "spectrum": "protein" if self.dps.config.get("prior_power") else "white",
            "intensity_scale": self.scale.to_dict(),
            "dps": self.dps.config,
            "seconds": self.seconds,
        }


def denoise_half_maps(
    half1: torch.Tensor,
    half2: torch.Tensor,
    pixel_size: float,
    prior: Prior,
    *,
    mass_kda: float | None = None,
    intensity: float | None = None,
    measured: torch.Tensor | None = None,
    view_rotations: torch.Tensor | None = None,
    guidance: str = DEFAULT_GUIDANCE,
    n_steps: int = 20,
    n_samples: int = 4,
    n_inner: int = DEFAULT_N_INNER,
    eta: float = 0.5,
    seed: int = 0,
    spectrum: str = "white",
    show_progress: bool = False,
) -> DenoisedMap:
    """Posterior samples of the map given two half maps (D, D, D) at ``pixel_size`` Å/px.

    ``measured`` (rfft layout of the prior's grid, in [0, 1]) down-weights unmeasured
    Fourier regions (a missing cone); or give ``view_rotations`` (n, 3, 3), the poses of
    the particles behind the half maps (e.g. from their STAR file), and the measured
    region is the union of their central planes (:func:`~cryoprior.solvers.halfmap.
    measured_fourier_mask`); the noise spectrum is then measured on that region only.
    ``guidance``/``n_steps``/``n_inner``/``eta`` are those of
    :func:`~cryoprior.solvers.dps.dps_sample`. ``spectrum``: the prior variance of the
    guidance ("white" or "protein", which needs ``mass_kda``)."""
    spectrum = choose_spectrum(spectrum, mass_kda)
    t0 = time.perf_counter()
    half_map_noise(half1, half2, pixel_size)  # validates the inputs on the user's grid
    plan = prior_grid_plan(prior, int(half1.shape[-1]), float(pixel_size))
    g1 = to_prior_grid(half1.to(torch.float64), plan)
    g2 = to_prior_grid(half2.to(torch.float64), plan)
    if view_rotations is not None:
        if measured is not None:
            raise InputError("give either measured or view_rotations, not both")
        measured = measured_fourier_mask(view_rotations, plan.target_box)
    noise = half_map_noise(g1, g2, plan.target_pixel_size, measured)
    average = (g1 + g2) / 2
    scale = map_intensity_scale(average, plan.target_pixel_size, mass_kda, intensity)
    op = HalfMapLikelihood(average, noise, measured)
    y = op.measurement(torch.float32)
    power = None
    if spectrum == "protein":
        assert mass_kda is not None
        power = protein_prior_power(prior, plan.target_box, plan.target_pixel_size, mass_kda)
    t1 = time.perf_counter()
    result = dps_sample(
        prior,
        op,
        y,
        noise_sigma=1.0,
        n_steps=n_steps,
        guidance=guidance,
        eta=eta,
        n_samples=n_samples,
        generator=torch.Generator().manual_seed(int(seed)),
        intensity_scale=scale.value,
        n_inner=n_inner,
        prior_power=power,
        shape=(1,) + (plan.target_box,) * 3,
        show_progress=show_progress,
    )
    t2 = time.perf_counter()
    samples = plan.map_back(result.samples[:, 0].to(torch.float64) * scale.value)
    std = samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0])
    return DenoisedMap(
        mean=samples.mean(dim=0),
        std=std,
        samples=samples,
        average=plan.map_back(average),
        noise=noise,
        scale=scale,
        plan=plan,
        dps=result,
        seconds={"preparation": t1 - t0, "sampling": t2 - t1, "total": t2 - t0},
        measured_fraction=1.0 if measured is None else float(measured.mean()),
    )


__all__ = ["DenoisedMap", "denoise_half_maps", "map_intensity_scale", "to_prior_grid"]
