"""Pose refinement of the MFN fit against a fixed map: local exhaustive search, Adam steps.

Each visit of a batch refines its poses with the map fixed: first a local exhaustive
search (:func:`search_pose_steps`), then Adam steps on the axis-angle update δ and the
shift (:func:`adam_pose_steps`). Every step keeps a particle's pose unless the new one has
a lower loss under the fit's forward model (:func:`model_spectra`), so a visit never
increases its image's misfit for the current map. :func:`refine_poses` runs the same steps
over a particle set against a given map.

Local pose search (``pose_search="local"``; what RELION and cryoSPARC do in local
refinement). For each image, candidate rotations exp([δ]×) R_i with δ on a cubic lattice
of spacing Δ inside the ball |δ| ≤ ρ (δ = 0 included), and for each candidate every
shift s_i + t on a square lattice inside |t| ≤ ``search_max_shift``: the band loss
Σ_k |Y(k) − Ŷ_R(k) e^{2πik·(s+t)/L}|² = const + P_R − 2 Re Σ_k conj(Ŷ_R,s(k)) Y(k)
e^{-2πik·t/L}, so one model spectrum per rotation gives the loss at all shifts (a matrix
product with phase ramps). Then ``search_levels`` − 1 finer levels each try the 3³ cube
of spacing Δ/3^l around the estimate, and the 3² square of a third of the shift spacing
(:func:`cryoprior.solvers.poses.lattice_search`, shared with :mod:`~cryoprior.solvers.poses`).
The estimate of a level is the posterior mean of δ and t under white Gaussian noise
(weights exp(−L/2σ²), σ² the image's misfit per Fourier coefficient at its current pose:
noise plus what the map does not explain yet), or the best candidate
(``search_estimate="best"``); the posterior mean stays put where the band cannot
distinguish the candidates, where the best candidate would follow the noise. The
candidates' spectra come from :class:`BandSearchModel`: trilinear samples of the
projector's padded 3-D FT at the band's frequencies (half plane, Hermitian weights) times
the CTF with its point-spread function cropped to the box — :func:`model_spectra` without
per-candidate FFTs, 10-14× cheaper; the fit's own model decides whether a particle moves.
At the first searching stage ρ and Δ are ``search_radius_deg`` and ``search_step_deg``; at
a later one Δ is scaled by (first band / this band) and ρ = ``search_refine_steps`` · Δ.
The shift spacing is L/(4b) (a quarter period at the band edge b, box length L).

Cost of the search, per image and visit: C₀ + 27 (levels − 1) model spectra, C₀ ≈ 4.19
(ρ/Δ)³ (ρ = 45°, Δ = 10°: 382; a later stage's ball of 2 steps: 33), each n trilinear
samples (n ≈ π b²/2 half-band frequencies) plus n·S products for the S shifts. Measured
on one (shared) CPU thread, 64² data at 1.5 Å/px, batches of 128: ~3 ms per image at the
10 Å band (b = 9.6 cycles/box, D' = 22) with ρ = 45°, Δ = 10°, against ~10 ms for the
network step and 0.8 ms for 5 Adam pose steps there; ~5 ms per image at 3.75 Å (b = 25.6,
D' = 54) with ρ = 7.4°, Δ = 3.7°. Peak memory: chunks of 2²⁰ candidate × image ×
frequency values, about 80 MB whatever the batch or ball.
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.errors import require
from cryoprior.geometry.fft import fft2_c, ifft2_c
from cryoprior.geometry.rotations import axis_angle_to_matrix
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.projection import Projector, crop_centred, padded_size
from cryoprior.solvers.mfn_config import MFNFitConfig
from cryoprior.solvers.mfn_render import (
    WorkingGrid,
    data_spectra,
    fourier_crop,
    model_spectra,
    working_grid,
)
from cryoprior.solvers.pose_grids import SearchGrid, rotation_log
from cryoprior.solvers.pose_lattice import PosePrior, lattice_search
from cryoprior.solvers.pose_reference import BandModel, ReferenceProjector


class PoseState:
    """Per-particle pose parameters: δ (N, 3) radians, microscope frame; s (N, 2) Å."""

    def __init__(self, rotations: torch.Tensor, shifts: torch.Tensor) -> None:
        self.base = rotations.to(torch.float64)
        self.delta = torch.zeros(rotations.shape[0], 3, dtype=torch.float64)
        self.shifts = shifts.to(torch.float64).clone()

    def rotations(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base if idx is None else self.base[idx]
        delta = self.delta if idx is None else self.delta[idx]
        return axis_angle_to_matrix(delta) @ base


def adam_pose_steps(
    projector: Projector,
    poses: PoseState,
    idx: torch.Tensor,
    data: torch.Tensor,
    ctf: torch.Tensor | None,
    grid: WorkingGrid,
    config: MFNFitConfig,
    rotations: bool = True,
) -> None:
    """``pose_steps`` Adam steps on the batch's poses (fresh moments), map fixed.

    The step sizes are ``pose_lr_deg`` and ``pose_lr_angstrom`` divided by the stage's band
    as a fraction of Nyquist (coarse stages take proportionally larger steps). Each
    particle keeps the pose with the lowest loss met along the way, and only if it beats
    the starting loss L₀ by ``pose_accept`` · p · L₀ / m (p parameters, m masked Fourier
    coefficients; L₀/m estimates the noise power per coefficient, and fitting p parameters
    to pure noise removes about p times that), so a visit never increases its image's
    misfit for the current map and, with ``pose_accept`` > 0, ignores moves that noise
    alone would explain.
    """
    delta = poses.delta[idx].to(torch.float32).clone().requires_grad_(rotations)
    shifts = poses.shifts[idx].to(torch.float32).clone().requires_grad_(config.refine_shifts)
    base = poses.base[idx].to(torch.float32)
    params = [p for p in (delta, shifts) if p.requires_grad]
    scale = grid.full / (2 * grid.band)  # steps grow with the stage's resolution: 1/band
    lr = {
        id(delta): math.radians(config.pose_lr_deg) * scale,
        id(shifts): config.pose_lr_angstrom * scale,
    }
    b1, b2, eps = 0.9, 0.9, 1e-12  # betas as in the authors' pose optimiser
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    best_loss = torch.full((idx.shape[0],), math.inf)
    best_delta, best_shifts = delta.detach().clone(), shifts.detach().clone()
    start_loss = best_loss
    for t in range(config.pose_steps + 1):
        model = model_spectra(projector, axis_angle_to_matrix(delta) @ base, shifts, ctf, grid)
        per_image = ((model - data).abs() ** 2).sum(-1)
        with torch.no_grad():
            if t == 0:
                # a move must beat the misfit that fitting noise alone would remove:
                # about (loss / n_coefficients) per parameter (see the docstring)
                n_params = sum(p.shape[-1] for p in params)
                start_loss = per_image - config.pose_accept * n_params * per_image / data.shape[-1]
            else:
                better = per_image < best_loss
                best_loss = torch.where(better, per_image, best_loss)
                best_delta[better] = delta[better]
                best_shifts[better] = shifts[better]
        if t == config.pose_steps:
            break
        grads = torch.autograd.grad(per_image.sum(), params)
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                mi.mul_(b1).add_(g, alpha=1 - b1)
                vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = (mi / (1 - b1 ** (t + 1))) / ((vi / (1 - b2 ** (t + 1))).sqrt() + eps)
                p.sub_(lr[id(p)] * step)
    accept = best_loss < start_loss
    poses.delta[idx[accept]] = best_delta[accept].to(torch.float64)
    poses.shifts[idx[accept]] = best_shifts[accept].to(torch.float64)


# ---------------------------------------------------------------------------------------
# local exhaustive pose search


class BandSearchModel(BandModel):
    """Model spectra of many candidate poses on a working grid's band, for the pose search.

    A :class:`~cryoprior.solvers.pose_reference.BandModel` on the working grid: the projector's
    padded 3-D FT (its ``"linear"`` kernel's gridding correction matches the trilinear
    sampling) sliced at the half-band frequencies of D' (a
    :class:`~cryoprior.solvers.pose_reference.ReferenceProjector` with scale (D/D')³), times the
    effective CTF, times the phase of the shift. The effective CTF is the FT of the CTF's
    point-spread function cropped to the D' box (the padded-grid CTF, inverse transformed,
    cropped, transformed): :func:`model_spectra` crops the CTF-modulated projection to the
    box after the shift, which for a particle at the centre is this. It is
    :func:`model_spectra` up to the part of the CTF's delocalisation that an off-centre
    particle moves across the box edge, at a fraction of its cost (no per-candidate FFTs,
    only the band's frequencies). Relative error against :func:`model_spectra` (1fki,
    64² at 1.5 Å/px, defocus 1-2.5 µm): 3% at band 0.18 × Nyquist, 6% at 0.3, 21% at 0.6,
    27% at 1 (correlations 0.9995, 0.998, 0.978, 0.965); it ranks candidates, and the
    fit's own model decides whether a particle moves (:func:`search_pose_steps`).
    """

    def __init__(self, projector: Projector, grid: WorkingGrid, ctf: torch.Tensor | None) -> None:
        require(projector.kernel == "linear", "the pose search needs a trilinear projector")
        length = grid.box * grid.pixel_size  # Å
        reference = ReferenceProjector(
            projector.volume_ft, grid.box, grid.band, length, grid.spectral_scale
        )
        effective = None  # (B, n): the effective CTFs of the batch on the half band
        if ctf is not None:
            psf = crop_centred(ifft2_c(ctf.to(torch.complex64)), grid.box, 2)
            effective = fft2_c(psf)[:, reference.plane]
        super().__init__(reference, effective)
        self.select = reference.half_of_band  # entries of data_spectra on the half plane

    def half(self, data: torch.Tensor) -> torch.Tensor:
        """The half-plane entries (B, n) of band spectra (B, n_mask) (:func:`data_spectra`)."""
        return data[:, self.select]


def search_grid(
    config: MFNFitConfig,
    grid: WorkingGrid,
    scale: float = 1.0,
    rotations: bool = True,
    refine: bool = False,
) -> SearchGrid:
    """The :class:`SearchGrid` of ``config`` on a working grid: radius and step (degrees in
    the config, radians here) times ``scale``; the shift lattice spacing L/(4 b) Å (L the
    box length in Å, b the band in cycles per box: a quarter period at the band edge);
    max shift ``search_max_shift`` Å (None: 3 pixels of the data; 0 without
    ``refine_shifts``). ``rotations`` False searches shifts only."""
    length = grid.box * grid.pixel_size
    max_shift = (
        3 * length / grid.full if config.search_max_shift is None else config.search_max_shift
    )
    step = math.radians(config.search_step_deg) * scale
    radius = config.search_refine_steps * step if refine else math.radians(config.search_radius_deg)
    return SearchGrid(
        radius=radius if rotations else 0.0,
        step=step,
        levels=config.search_levels,
        max_shift=max_shift if config.refine_shifts else 0.0,
        shift_step=length / (4 * grid.band),
    )


def search_pose_steps(
    projector: Projector,
    volume: torch.Tensor,
    poses: PoseState,
    idx: torch.Tensor,
    data: torch.Tensor,
    ctf: torch.Tensor | None,
    grid: WorkingGrid,
    search: SearchGrid,
    estimate: str = "mean",
    prior_deg: float | None = None,
) -> None:
    """Local exhaustive search (:func:`~cryoprior.solvers.poses.lattice_search`) for the
    batch's poses, map fixed.

    ``projector`` holds ``volume`` (the map on the working grid); ``data`` are the batch's
    band spectra (:func:`data_spectra`) and ``ctf`` its CTFs on the padded working grid (or
    None). ``estimate`` ``"mean"`` takes the posterior mean with the noise power σ² of
    each image estimated as its misfit per Fourier coefficient at the current pose (noise
    plus what the map does not yet explain, so an imperfect map gives a broader
    posterior), ``"best"`` the lowest-misfit candidate. A particle moves to the pose
    the search found only if its loss under the fit's forward model
    (:func:`model_spectra`, which the search approximates) is lower there, so a visit never
    increases its image's misfit for the current map. With ``prior_deg`` (the rms rotation
    error of the starting poses ``poses.base``) the search weighs candidates by a Gaussian
    prior on the rotation away from the start (:class:`PosePrior`, σ = prior_deg/√3 per
    axis) and a particle moves only if its posterior rises (misfit / 2σ²_noise + −log
    prior falls).
    """
    linear = projector
    if projector.kernel != "linear":  # the search samples trilinearly
        linear = Projector(volume, projector.padded_size / projector.size, "linear")
    model = BandSearchModel(linear, grid, ctf)
    rot = poses.rotations(idx)
    shifts = poses.shifts[idx]
    with torch.no_grad():
        before = model_spectra(projector, rot.float(), shifts.float(), ctf, grid)
    loss = ((before - data).abs() ** 2).sum(-1)
    noise, prior = None, None
    if estimate == "mean" or prior_deg is not None:
        noise = (loss / data.shape[-1]).clamp_min(1e-6 * float((data.abs() ** 2).mean()))
    if prior_deg is not None:
        prior = PosePrior(poses.base[idx], math.radians(prior_deg) / math.sqrt(3.0))
    new_rot, new_shifts, _ = lattice_search(
        model, model.half(data), rot, shifts, search, noise, prior, estimate
    )
    with torch.no_grad():
        after = model_spectra(projector, new_rot.float(), new_shifts.float(), ctf, grid)
    new_loss = ((after - data).abs() ** 2).sum(-1)
    if prior is None:
        accept = new_loss < loss
    else:  # compare −log posteriors, in units of loss
        scale = 2 * noise.to(torch.float64)
        accept = new_loss + scale * prior.penalty(new_rot) < loss + scale * prior.penalty(rot)
    moved = idx[accept]
    poses.delta[moved] = rotation_log(new_rot[accept] @ poses.base[moved].transpose(-1, -2))
    poses.shifts[moved] = new_shifts[accept]


def refine_poses(
    volume: torch.Tensor,
    pixel_size: float,
    images: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    ctf: CTFParams | None = None,
    band: float = 1.0,
    visits: int = 1,
    config: MFNFitConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine poses of ``images`` against a fixed map, as the fit's pose steps do.

    ``volume`` (D, D, D) and ``images`` (N, D, D) share the pixel size (Å/px); rotations
    (N, 3, 3) and shifts (N, 2) (RELION origins, Å) are the starting poses; ``band`` the
    low-pass as a fraction of Nyquist. Each of ``visits`` passes runs, per batch of
    ``config.batch_size``, the local search of ``config`` (when ``pose_search`` is
    ``"local"``; radius and step as in the config, :func:`search_grid`), then
    ``config.pose_steps`` Adam steps (see :func:`~cryoprior.solvers.mfn_fit.fit_mfn`).
    Returns the refined (N, 3, 3) rotations and (N, 2) shifts, float64.
    """
    config = config or MFNFitConfig()
    config.validate()
    d = volume.shape[-1]
    require(
        images.ndim == 3 and images.shape[-2:] == (d, d),
        f"images must be (N, {d}, {d}) like the map, got {tuple(images.shape)}",
    )
    require(0 < band <= 1, f"band must be a fraction of Nyquist in (0, 1], got {band}")
    grid = working_grid(d, pixel_size, band * d / 2, band * d / 2)
    cropped = fourier_crop(volume.to(torch.float32), grid.box)
    projector = Projector(cropped, config.pad, config.kernel)
    poses = PoseState(torch.as_tensor(rotations), torch.as_tensor(shifts))
    dp = padded_size(grid.box, config.pad)
    for _ in range(visits):
        for start in range(0, images.shape[0], config.batch_size):
            idx = torch.arange(start, min(images.shape[0], start + config.batch_size))
            data = data_spectra(images[idx].to(torch.float32), grid)
            batch_ctf = None
            if ctf is not None:
                batch_ctf = compute_ctf(ctf.index(idx), (dp, dp), grid.pixel_size)
            if config.pose_search == "local":
                search = search_grid(config, grid)
                search_pose_steps(
                    projector,
                    cropped,
                    poses,
                    idx,
                    data,
                    batch_ctf,
                    grid,
                    search,
                    config.search_estimate,
                    config.pose_prior_deg,
                )
            if config.pose_steps > 0:
                adam_pose_steps(projector, poses, idx, data, batch_ctf, grid, config)
    return poses.rotations(), poses.shifts.clone()


__all__ = [
    "BandSearchModel",
    "PoseState",
    "adam_pose_steps",
    "refine_poses",
    "search_grid",
    "search_pose_steps",
]
