"""Prior-guided 3-D reconstruction: particles at known poses + a density-map diffusion prior.

Pipeline (:func:`reconstruct_with_prior`):

1. **Grid** (:func:`prior_grid_plan`, :mod:`cryoprior.solvers.grid_plan`). A fully
   convolutional prior works on the particles' own box at its pixel size (Fourier crop
   or pad within limits, a crop of a few pixels to a multiple of the network's
   downsampling factor); a fixed-box prior needs the same physical box (a finer pixel
   size is Fourier-cropped, a larger box cropped first). What does not fit is refused
   with an error that says what to do. Never a silent mis-scaling.
2. **Sufficient statistics** (:mod:`cryoprior.solvers.fourier_data`). One streamed pass
   over the particles (:func:`accumulate_particles`) inserts CTF·F̂ and CTF² into padded
   3-D Fourier grids, as the Wiener baseline does, and measures the noise σ and the
   images' DC terms. They define the Gaussian likelihood of the images at known poses
   (:class:`FourierLikelihoodOperator`, its weight κ calibrated against the exact
   projection ∘ CTF operator); one evaluation costs two FFTs of the padded grid,
   whatever the number of images.
3. **Scale.** The measurement's intensity unit is fixed from the measurement
   (:func:`~cryoprior.physics.measurement.estimate_map_integral`, the images' DC terms)
   and the molecule's mass (:mod:`cryoprior.physics.composition`), never from a ground
   truth; an explicit ``intensity_scale`` can be given instead.
4. **Posterior sampling.** :func:`cryoprior.solvers.dps.dps_sample` with the Fourier
   likelihood as its linear operator: ``"pigdm"`` (default; Π-GDM's Gaussian
   likelihood through the network's Jacobian, Jacobi-preconditioned CG in the
   measurement space, the correction's norm capped near t = 1 — see
   :mod:`cryoprior.solvers.dps`), ``"dps_x0"`` (a proximal data step on x̂0 by CG, no
   back-propagation; cheaper, but it lets the prior override the data at 10–100 images)
   or ``"dps"`` (Chung et al. 2023), DDIM or DDPM steps. Several samples give the
   posterior mean and the per-voxel standard deviation. The Gaussian approximation of
   x0 | x_t uses the expected power spectrum of a protein of the given mass
   (``spectrum="protein"``, :mod:`cryoprior.solvers.prior_spectrum`; default), not one
   variance for every frequency (``"white"``), which trusts the prior over the data at
   the low frequencies and loses to Wiener with few or very noisy particles.

Returned maps are in the measurement's units per voxel at the prior's pixel size, the
same units as the Wiener map of the same (resampled) particles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.data.volumes import auto_bfactor
from cryoprior.physics.composition import potential_integral_from_mass
from cryoprior.physics.measurement import estimate_map_integral
from cryoprior.physics.source import ParticleSource
from cryoprior.priors import Prior
from cryoprior.solvers.dps import GUIDANCES, DPSResult, dps_sample
from cryoprior.solvers.fourier_data import (
    FourierData,
    FourierLikelihoodOperator,
    accumulate_particles,
    calibrate_fourier_likelihood,
    fourier_smooth,
)
from cryoprior.solvers.grid_plan import GridPlan, grid_plan, native_plan
from cryoprior.solvers.map_baselines import smoothness_regularized
from cryoprior.solvers.prior_spectrum import protein_power

# ---------------------------------------------------------------------------------------
# the intensity scale


@dataclass(frozen=True)
class IntensityScale:
    """c in "measurement = c · A(map in the prior's physical units)", and how it was set."""

    value: float
    source: str
    integral: float | None = None
    integral_stderr: float | None = None
    reference_integral: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def intensity_scale(
    data: FourierData, mass_kda: float | None = None, value: float | None = None
) -> IntensityScale:
    """c from the images' DC terms and the molecule's mass, or the ``value`` given.

    ∫V d³r of the imaged map comes from the images alone
    (:func:`~cryoprior.physics.measurement.estimate_map_integral` on the pixel sums of all
    accumulated images); the prior's units give a protein of ``mass_kda`` kDa the
    integral :func:`~cryoprior.physics.composition.potential_integral_from_mass`.
    """
    if value is not None:
        return IntensityScale(require_positive(value, "intensity scale"), "given")
    if mass_kda is None:
        raise InputError(
            "the prior needs the measurement's intensity scale: give the molecule's mass "
            "(--mass-kda, or --sequence) so that it can be estimated from the images, or "
            "--intensity-scale"
        )
    sums = data.image_sums[:, None, None]
    est = estimate_map_integral(sums, data.ctf_at_zero, data.pixel_size)
    ref = potential_integral_from_mass(mass_kda)
    if not est.integral > 0:
        raise InputError(
            f"the images' DC terms give a non-positive map integral ({est.integral:.3g}); "
            "the images may be background-normalised or too few: give --intensity-scale"
        )
    return IntensityScale(
        est.integral / ref, "images' DC terms / mass", est.integral, est.stderr, ref
    )


# ---------------------------------------------------------------------------------------
# the reconstruction


@dataclass
class PriorReconstruction:
    """Posterior mean and spread maps (D, D, D) in measurement units per voxel at
    ``pixel_size``; ``samples`` (n, D, D, D); the DPS record and timings."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor
    pixel_size: float
    scale: IntensityScale
    dps: DPSResult
    seconds: dict[str, float]
    info: dict[str, Any]
    plan: GridPlan | None = None

    def on_particle_grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, samples) on the particles' box and pixel size (``plan.map_back``
        of every sample; the same tensors when the grids agree)."""
        if self.plan is None or self.plan.identity:
            return self.mean, self.std, self.samples
        samples = self.plan.map_back(self.samples)
        std = samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0])
        return samples.mean(dim=0), std, samples


def check_volume_prior(prior: Prior) -> None:
    """Raise InputError unless ``prior`` is a single-channel cubic density-map prior."""
    meta = prior.metadata
    if meta.representation != "volume":
        raise InputError(
            f"--prior must be a density-map (volume) prior, this one models {meta.representation}s"
        )
    spatial = meta.spatial_shape
    require(
        len(spatial) == 3 and len(set(spatial)) == 1 and meta.shape[0] == 1,
        f"the prior's maps must be single-channel cubes, got shape {meta.shape}",
    )
    require(meta.pixel_size is not None, "the prior file records no pixel size")


def prior_grid_plan(prior: Prior, box: int, pixel_size: float) -> GridPlan:
    """How particles of ``box`` px at ``pixel_size`` Å/px reach ``prior``'s grid: the
    particles' own box at the prior's pixel size for a fully convolutional prior
    (:func:`~cryoprior.solvers.grid_plan.native_plan`), the prior's box otherwise
    (:func:`~cryoprior.solvers.grid_plan.grid_plan`). InputError when neither fits."""
    check_volume_prior(prior)
    meta = prior.metadata
    px = float(meta.pixel_size)
    if meta.fully_convolutional:
        return native_plan(box, pixel_size, px, multiple=meta.size_multiple)
    return grid_plan(box, pixel_size, meta.spatial_shape[0], px)


#: guidance of a density-map reconstruction: Π-GDM with a proximal data-consistency
#: step (finer than plain Π-GDM at every N of benchmarks/native_reconstruction.py)
DEFAULT_GUIDANCE = "pigdm_dc"
#: CG iterations of each guidance solve (the preconditioned solve converges in fewer)
DEFAULT_N_INNER = 5
#: the prior variance of the Gaussian approximation: "protein" (the expected spectrum
#: of a protein of the given mass) or "white" (one variance, data_std², every frequency)
SPECTRA = ("protein", "white")


def prior_bfactor(prior: Prior) -> float:
    """The B-factor (Å²) of the maps a volume prior was trained on: the data set's
    recorded number, or its "auto" convention (:func:`~cryoprior.data.volumes.auto_bfactor`)."""
    summary = prior.metadata.data.get("summary")
    b = summary.get("bfactor", "auto") if isinstance(summary, dict) else "auto"
    if isinstance(b, int | float):
        return float(b)
    return auto_bfactor(prior.metadata.pixel_size)


def choose_spectrum(spectrum: str | None, mass_kda: float | None) -> str:
    """The prior variance to use: ``spectrum`` checked against :data:`SPECTRA`, or by
    default "protein" when the mass is known, else "white"."""
    if spectrum is None:
        spectrum = "white" if mass_kda is None else "protein"
    require(spectrum in SPECTRA, f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    require(
        spectrum == "white" or mass_kda is not None,
        'the "protein" prior spectrum needs the molecule\'s mass (--mass-kda or --sequence)',
    )
    return spectrum


def protein_prior_power(
    prior: Prior, size: int, pixel_size: float, mass_kda: float
) -> torch.Tensor:
    """The prior variance per Fourier coefficient (rfft grid of a ``size``³ box at
    ``pixel_size`` Å/px, the prior's network units) of a protein of ``mass_kda`` kDa,
    at the B-factor of the prior's training maps (:mod:`cryoprior.solvers.prior_spectrum`)."""
    scale = float(prior.metadata.normalisation["scale"])
    return protein_power(size, pixel_size, mass_kda, prior_bfactor(prior), scale).float()


def reconstruct_with_prior(
    source: ParticleSource,
    prior: Prior,
    *,
    mass_kda: float | None = None,
    intensity: float | None = None,
    indices: np.ndarray | None = None,
    guidance: str = DEFAULT_GUIDANCE,
    sampler: str = "ddim",
    n_steps: int = 50,
    n_samples: int = 1,
    eta: float = 0.5,
    zeta: float = 1.0,
    n_inner: int = DEFAULT_N_INNER,
    pad: float = 2.0,
    seed: int = 0,
    data: FourierData | None = None,
    spectrum: str | None = None,
    antithetic: bool | None = None,
    show_progress: bool = False,
) -> PriorReconstruction:
    """Posterior samples of the map given particles at known poses and a volume prior.

    The maps are on the prior's grid (:func:`prior_grid_plan`; ``data.plan.map_back``
    takes them to the particles' box and pixel size). A fully convolutional prior
    samples the particles' whole box at its own pixel size: the time and memory of a
    step grow about linearly with the number of voxels (network) and as D³ log D (the
    padded FFTs of the likelihood).

    ``mass_kda`` (or ``intensity``, the scale c itself) sets the measurement's units;
    ``guidance``/``sampler``/``n_steps``/``eta``/``zeta``/``n_inner`` are those of
    :func:`~cryoprior.solvers.dps.dps_sample`. ``data`` reuses statistics from
    :func:`accumulate_particles` (e.g. the same particles with several priors).
    ``spectrum``: the prior variance of the guidance's Gaussian approximation
    (:data:`SPECTRA`; "protein" needs ``mass_kda``; default "protein" when the mass is
    given, else "white"). ``antithetic``: the samples come in antithetic pairs
    (:func:`~cryoprior.solvers.dps.dps_sample`), whose mean is a far better estimate of the
    posterior mean than as many independent samples' (measured in
    ``benchmarks/results/native_antithetic.md``); default: pairs whenever ``n_samples``
    is even.
    """
    check_volume_prior(prior)
    require(guidance in GUIDANCES, f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    spectrum = choose_spectrum(spectrum, mass_kda)
    if antithetic is None:
        antithetic = n_samples % 2 == 0
    t0 = time.perf_counter()
    if data is None:
        plan = prior_grid_plan(prior, source.box, source.pixel_size)
        data = accumulate_particles(
            source,
            plan.target_box,
            plan.target_pixel_size,
            indices=indices,
            pad=pad,
            show_progress=show_progress,
            plan=plan,
        )
    if data.kappa == 1.0:
        calibrate_fourier_likelihood(data, seed=seed)
    scale = intensity_scale(data, mass_kda, intensity)
    power = None
    if spectrum == "protein":
        assert mass_kda is not None
        power = protein_prior_power(prior, data.size, data.pixel_size, mass_kda)
    t1 = time.perf_counter()
    op = FourierLikelihoodOperator(data)
    y = op.measurement(torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    result = dps_sample(
        prior,
        op,
        y,
        noise_sigma=data.noise_sigma,
        n_steps=n_steps,
        zeta=zeta,
        guidance=guidance,
        sampler=sampler,
        eta=eta,
        n_samples=n_samples,
        generator=gen,
        intensity_scale=scale.value,
        n_inner=n_inner,
        prior_power=power,
        antithetic=antithetic,
        shape=(1,) + (data.size,) * 3,
        show_progress=show_progress,
    )
    t2 = time.perf_counter()
    samples = result.samples[:, 0] * scale.value
    return PriorReconstruction(
        mean=samples.mean(dim=0),
        std=samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0]),
        samples=samples,
        pixel_size=data.pixel_size,
        scale=scale,
        dps=result,
        seconds={"statistics": t1 - t0, "sampling": t2 - t1, "total": t2 - t0},
        info={
            "grid": data.plan.describe(),
            "n_images": data.n_images,
            "noise_sigma": data.noise_sigma,
            "kappa": data.kappa,
            "kappa_spread": data.info.get("kappa_spread"),
            "spectrum": spectrum,
            "antithetic": bool(antithetic),
        },
        plan=data.plan,
    )


__all__ = [
    "FourierData",
    "FourierLikelihoodOperator",
    "GridPlan",
    "IntensityScale",
    "PriorReconstruction",
    "accumulate_particles",
    "calibrate_fourier_likelihood",
    "check_volume_prior",
    "choose_spectrum",
    "fourier_smooth",
    "grid_plan",
    "native_plan",
    "prior_grid_plan",
    "protein_prior_power",
    "intensity_scale",
    "reconstruct_with_prior",
    "smoothness_regularized",
]
