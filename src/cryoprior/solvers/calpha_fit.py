"""Cα clouds from particle images at known poses: likelihood fitting without a prior and
posterior sampling with the Cα EGNN diffusion prior (issue 4).

The measurement model (blobs, CTF, noise, the amplitude choices) is in
:mod:`cryoprior.solvers.calpha_measurement`; matching unlabelled clouds in
:mod:`cryoprior.geometry.cloud_matching`.

Fitting without a prior (:func:`fit_calpha_no_prior`): maximum likelihood over the N × 3
coordinates (N known from the sequence), from ``n_starts`` random clouds (Gaussian about the
box centre with the radius of gyration of a compact chain of N residues, see
:func:`radius_of_gyration_guess`), by Adam with a cosine-decaying step (Å). The model blob
width is annealed from ``anneal`` · σ down to σ over the first 60 % of the iterations
(a continuation method: the wide blobs' likelihood has fewer local optima; the final
iterations and the selection use the true σ). Coordinates are kept inside the box. The
start with the best final likelihood is returned. Nothing ties neighbouring residues
together, so this is the fit a prior has to beat.

Fitting with the prior (:func:`fit_calpha_with_prior`): posterior samples by
:func:`cryoprior.solvers.dps.dps_sample` with the prior's zero-centre-of-mass EGNN diffusion
(Hoogeboom et al. 2022), nodes beyond N masked out. Coordinates are in the prior's network
units x_net = r / scale (``scale`` from the prior's metadata: the training set's mean Cα
radius of gyration; never from the truth), so the operator seen by the sampler is
x_net ↦ a · A(scale · x_net). The default guidance is ``"dps_x0"``: each step's x̂0 is
moved to argmin ‖y − A(x)‖²/(2s²) + ‖x − x̂0‖²/(2 r_t²) by ``n_inner`` L-BFGS iterations
(the likelihood's proximal step; no back-propagation through the network), with r_t² the
posterior variance of a Gaussian prior of per-coordinate standard deviation ``data_std``
(default: a compact chain of N residues, ``radius_of_gyration_guess(N) / (√3 · scale)``).
``"dps"`` (Chung et al. 2023, Alg. 1) takes the step ζ ∇_{x_t}‖y − A(x̂0(x_t))‖ instead;
ζ (network units) must be tuned: of order 1/‖∂A/∂x_net‖. The noise s comes from the
images' background (:func:`~cryoprior.physics.measurement.estimate_noise_sigma`) unless
given. The zero centre of mass of the prior fixes the segment's centre at the box centre:
the particles must be centred on the segment (the known shifts do that).

The samples are summarised by their mean after matching them to each other: neither the
likelihood (all residues have the same blob) nor the prior (an EGNN without residue-index
features is permutation-equivariant) says which point is which residue, so each sample's
points are assigned to the reference's by the Hungarian algorithm and the sample is
superposed on it (Kabsch); the data fix the absolute frame, so the superposition only
removes the small rigid differences before averaging (:func:`average_clouds`). For the
same reason a reconstruction is compared with the truth by :func:`matched_kabsch_rmsd`
(optimal assignment, then Kabsch RMSD).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion import DenoiserOutput, remove_mean
from cryoprior.geometry.cloud_matching import average_clouds, match_cloud, matched_kabsch_rmsd
from cryoprior.physics.measurement import estimate_noise_sigma
from cryoprior.priors import Prior, load_prior
from cryoprior.solvers.calpha_measurement import (
    AMPLITUDES,
    DEFAULT_SIGMA,
    CalphaMeasurement,
    ProfiledAmplitudeOperator,
    SimulatedCalpha,
    amplitude_of,
    calpha_log_likelihood,
    check_n_residues,
    estimate_amplitude,
    flat_dot,
    model_operator,
    profile_amplitude,
    radius_of_gyration_guess,
    resolve_amplitude,
    simulate_calpha_images,
)
from cryoprior.solvers.dps import dps_sample

# ---------------------------------------------------------------------------------------
# results


@dataclass
class CalphaFit:
    """A reconstructed Cα cloud, coordinates in Å in the box frame.

    ``coords`` (N, 3): the answer (no prior: the best start; prior: the matched mean of the
    samples). ``samples`` (S, N, 3): every start's fit (no prior) or the posterior samples
    matched to ``coords`` (prior). ``spread`` (N,): per-residue RMS distance of the samples
    from the mean (prior), None without prior. ``amplitude``: the per-residue amplitude of
    ``coords`` (estimated). ``log_likelihood`` of ``coords`` (with ``noise_sigma``, None when
    no σ is known). ``seconds``: wall time of the whole reconstruction; ``config`` the
    settings and diagnostics.
    """

    coords: torch.Tensor
    samples: torch.Tensor
    spread: torch.Tensor | None
    amplitude: float
    noise_sigma: float | None
    log_likelihood: float | None
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


def _noise_sigma(
    measurement: CalphaMeasurement, noise_sigma: float | None, mask_radius: float | None
) -> float:
    if noise_sigma is not None:
        return require_positive(noise_sigma, "noise sigma")
    radius = 0.4 * measurement.box if mask_radius is None else float(mask_radius)
    return estimate_noise_sigma(measurement.images, radius)


# ---------------------------------------------------------------------------------------
# fitting without a prior


def fit_calpha_no_prior(
    measurement: CalphaMeasurement,
    n_residues: int,
    *,
    n_starts: int = 4,
    n_iter: int = 300,
    lr: float = 1.0,
    anneal: float = 2.0,
    amplitude: float | str = "profile",
    noise_sigma: float | None = None,
    mask_radius: float | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> CalphaFit:
    """Maximum-likelihood Cα coordinates (N, 3) Å from ``measurement``, no prior.

    Args:
        measurement: images, poses, CTFs, shifts and blob σ (:class:`CalphaMeasurement`).
        n_residues: N, from the sequence.
        n_starts: random starts (fitted together as one batch); the best likelihood wins.
        n_iter: Adam iterations; ``lr`` the initial step (Å), cosine-decayed to lr/50.
        anneal: model blob width starts at ``anneal`` · σ and reaches σ at 60 % of the
            iterations (1: no annealing).
        amplitude: "profile" (default), "dc" or a number (module docstring).
        noise_sigma: s for the reported log-likelihood (default: from the background
            outside ``mask_radius`` px, default 0.4 · D); the fit itself does not need it.
        seed: seeds the random starts.
    """
    t0 = time.perf_counter()
    n = check_n_residues(n_residues)
    require(int(n_starts) >= 1, f"n_starts must be >= 1, got {n_starts}")
    require(int(n_iter) >= 1, f"n_iter must be >= 1, got {n_iter}")
    lr = require_positive(lr, "learning rate (Å)")
    require(float(anneal) >= 1.0, f"anneal must be >= 1 (blob width factor), got {anneal}")
    amp = resolve_amplitude(measurement, n, amplitude)
    sigma_n = _noise_sigma(measurement, noise_sigma, mask_radius)
    y = measurement.images
    dtype = y.dtype
    g = torch.Generator().manual_seed(int(seed))
    half = (measurement.box // 2 - 1) * measurement.pixel_size
    s0 = radius_of_gyration_guess(n) / math.sqrt(3.0)
    x0 = s0 * torch.randn(int(n_starts), n, 3, generator=g, dtype=torch.float64)
    x = x0.clamp(-half, half).to(dtype).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(n_iter), eta_min=lr / 50)
    y_norm2 = float((y.double() ** 2).sum())
    n_anneal = max(1, int(0.6 * int(n_iter)))
    for it in progress(range(int(n_iter)), int(n_iter), "Cα ML fit", show_progress):
        frac = min(1.0, it / n_anneal)
        sig = measurement.sigma * float(anneal) ** (1.0 - frac)
        op = model_operator(measurement, n, amp, y, sigma=sig)
        opt.zero_grad()
        r = op(x) - y
        loss = flat_dot(r, r, y.ndim).sum() / y_norm2
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-half, half)
    x = x.detach()
    op = model_operator(measurement, n, amp, y)
    with torch.no_grad():
        r = op(x) - y
        misfit = flat_dot(r, r, y.ndim)
    best = int(torch.argmin(misfit))
    with torch.no_grad():
        a_best = amplitude_of(op, amp, best)
        ll = float(calpha_log_likelihood(measurement, x[best], sigma_n, amp))
    return CalphaFit(
        coords=x[best].clone(),
        samples=x.clone(),
        spread=None,
        amplitude=a_best,
        noise_sigma=sigma_n,
        log_likelihood=ll,
        seconds=time.perf_counter() - t0,
        config={
            "method": "maximum likelihood, no prior",
            "n_residues": n,
            "n_starts": int(n_starts),
            "n_iter": int(n_iter),
            "lr": lr,
            "anneal": float(anneal),
            "amplitude": amplitude if isinstance(amplitude, str) else float(amplitude),
            "blob_sigma": measurement.sigma,
            "best_start": best,
            "relative_misfit": [float(v) / y_norm2 for v in misfit],
            "seed": int(seed),
        },
    )


# ---------------------------------------------------------------------------------------
# posterior sampling with the Cα prior


class ClippedDenoiser:
    """A point-cloud denoiser whose x̂0 is kept inside a ball: static thresholding.

    Each point of x̂0(x_t) farther than ``radius`` (network units) from the centre is moved
    radially onto the sphere, the centre of mass is removed again, and ε̂ and the score are
    recomputed from the clipped x̂0 (ε̂ = (x_t − α_t x̂0)/σ_t), as DDPM samplers clip x̂0 to
    the data range (Ho et al. 2020, their code's ``clip_denoised``; "static thresholding",
    Saharia et al. 2022, Sec. 2.3). Near t = 1 (α_t → 0; α(1) ≈ 3·10⁻³ for
    ``polynomial_2``) x̂0 = (x_t − σ_t ε̂)/α_t magnifies the network's error: without the
    clip, samples of an imperfect prior were measured to fly hundreds of Å apart. The
    radius is physical knowledge (the particle lies inside the box), not the structure.
    """

    def __init__(self, denoiser: Any, radius: float) -> None:
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.representation = getattr(denoiser, "representation", "points")
        self.radius = require_positive(radius, "clip radius")

    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> DenoiserOutput:
        out = self.denoiser(x_t, t, **cond)
        norm = out.x0.norm(dim=-1, keepdim=True)
        shrink = torch.clamp(self.radius / norm.clamp_min(1e-12), max=1.0)
        x0 = remove_mean(out.x0 * shrink, cond.get("mask"))
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = expand_like(alpha.to(x_t), x_t), expand_like(sigma.to(x_t), x_t)
        eps = (x_t - a * x0) / s
        return DenoiserOutput(x0=x0, eps=eps, score=-eps / s)


def fit_calpha_with_prior(
    measurement: CalphaMeasurement,
    n_residues: int,
    prior: Prior | str | os.PathLike,
    *,
    n_samples: int = 4,
    n_steps: int = 50,
    guidance: str = "dps_x0",
    sampler: str = "ddpm",
    zeta: float = 1.0,
    n_inner: int = 10,
    amplitude: float | str = "profile",
    noise_sigma: float | None = None,
    mask_radius: float | None = None,
    data_std: float | None = None,
    clip: bool = True,
    align: bool = True,
    seed: int = 0,
    show_progress: bool = False,
) -> CalphaFit:
    """Posterior samples of the Cα cloud under the EGNN prior, and their matched mean.

    Args:
        measurement: images, poses, CTFs, shifts and blob σ (:class:`CalphaMeasurement`).
        n_residues: N (from the sequence), at most the prior's ``max_nodes``.
        prior: a point-cloud :class:`~cryoprior.priors.Prior` or its folder / name.
        n_samples: posterior samples (one batch); their matched mean is ``coords``.
        n_steps, sampler: reverse steps ("ddpm" ancestral or "ddim").
        guidance: "dps_x0" (default; L-BFGS proximal step, ``n_inner`` iterations) or
            "dps" (step ``zeta`` in network units).
        amplitude: "profile" (default), "dc" or a number (module docstring).
        noise_sigma: s (default: from the background outside ``mask_radius`` px, 0.4 · D).
        data_std: the prior's per-coordinate std in network units for r_t² (default:
            ``radius_of_gyration_guess(N) / (√3 · scale)``).
        clip: keep the denoiser's x̂0 inside the box (:class:`ClippedDenoiser`, radius
            D/2 pixels in network units).
        align: Kabsch-superpose the matched samples before averaging.
        seed: seeds the sampler.
    """
    t0 = time.perf_counter()
    n = check_n_residues(n_residues)
    require(guidance in ("dps", "dps_x0"), f"guidance must be 'dps' or 'dps_x0', got {guidance!r}")
    require(int(n_samples) >= 1, f"n_samples must be >= 1, got {n_samples}")
    if not isinstance(prior, Prior):
        loaded = load_prior(prior)
        require(isinstance(loaded, Prior), f"{prior} is not a diffusion prior")
        prior = loaded
    require(
        prior.representation == "points" and prior.metadata.objective_kind == "denoising",
        f"fit_calpha_with_prior needs a point-cloud denoising prior, got a "
        f"{prior.metadata.objective_kind} {prior.representation} prior",
    )
    max_nodes = int(prior.shape[0])
    if n > max_nodes:
        raise InputError(
            f"the segment has {n} residues but the prior handles clouds of up to {max_nodes} "
            f"points; fit a segment of at most {max_nodes} residues"
        )
    amp = resolve_amplitude(measurement, n, amplitude)
    sigma_n = _noise_sigma(measurement, noise_sigma, mask_radius)
    scale = float(prior.metadata.normalisation["scale"])
    if data_std is None:
        data_std = radius_of_gyration_guess(n) / (math.sqrt(3.0) * scale)
    data_std = require_positive(data_std, "data_std")
    dtype = next(prior.denoiser.parameters()).dtype
    y = measurement.images.to(dtype)
    mask = torch.zeros(max_nodes, dtype=dtype)
    mask[:n] = 1.0
    op = model_operator(measurement, max_nodes, amp, y, mask=mask)
    prior.denoiser.eval()
    radius = (measurement.box // 2) * measurement.pixel_size / scale
    denoiser = ClippedDenoiser(prior.denoiser, radius) if clip else prior.denoiser
    g = torch.Generator().manual_seed(int(seed))
    t_sample = time.perf_counter()
    res = dps_sample(
        denoiser,
        op,
        y,
        sigma_n,
        int(n_steps),
        float(zeta),
        guidance=guidance,
        sampler=sampler,
        n_samples=int(n_samples),
        generator=g,
        shape=prior.shape,
        normalisation=prior.metadata.normalisation,
        mask=mask,
        data_std=data_std,
        n_inner=int(n_inner),
        show_progress=show_progress,
    )
    t_sample = time.perf_counter() - t_sample
    samples = res.samples[:, :n].detach()
    order = torch.argsort(res.residual_norm)
    samples = samples[order]
    mean, matched, spread = average_clouds(samples, reference=0, align=align)
    with torch.no_grad():
        op_mean = model_operator(measurement, n, amp, y)
        op_mean(mean.to(dtype))
        a_mean = amplitude_of(op_mean, amp, 0)
        ll = float(calpha_log_likelihood(measurement, mean.to(dtype), sigma_n, amp))
    return CalphaFit(
        coords=mean,
        samples=matched,
        spread=spread,
        amplitude=a_mean,
        noise_sigma=sigma_n,
        log_likelihood=ll,
        seconds=time.perf_counter() - t0,
        config={
            "method": f"posterior sampling ({guidance}) with the Cα prior",
            "n_residues": n,
            "max_nodes": max_nodes,
            "normalisation_scale": scale,
            "data_std": data_std,
            "clip_radius": radius if clip else None,
            "amplitude": amplitude if isinstance(amplitude, str) else float(amplitude),
            "blob_sigma": measurement.sigma,
            "sampling_seconds": t_sample,
            "residual_norm": [float(v) for v in res.residual_norm[order]],
            "target_residual_norm": res.target_residual_norm,
            "align": bool(align),
            "seed": int(seed),
            "dps": res.config,
        },
    )


__all__ = [
    "AMPLITUDES",
    "DEFAULT_SIGMA",
    "CalphaFit",
    "CalphaMeasurement",
    "ClippedDenoiser",
    "ProfiledAmplitudeOperator",
    "SimulatedCalpha",
    "average_clouds",
    "calpha_log_likelihood",
    "estimate_amplitude",
    "fit_calpha_no_prior",
    "fit_calpha_with_prior",
    "match_cloud",
    "matched_kabsch_rmsd",
    "profile_amplitude",
    "radius_of_gyration_guess",
    "simulate_calpha_images",
]
