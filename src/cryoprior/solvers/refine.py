"""Gold-standard refinement: pose estimation and reconstruction on two half sets.

The particles are split once into two half sets (:func:`~cryoprior.solvers.
distributed_recon.split_halves`, from the seed) and each half is refined against its own
reference only, so the two half maps stay independent and their FSC an honest resolution
estimate (RELION's auto-refine, Scheres & Chen 2012). One iteration:

1. **Pose assignment** of every particle of half h against reference h, over the band
   |k| ≤ L/b (b Å, the current resolution limit; :mod:`cryoprior.solvers.poses`):
   a global search over an SO(3) grid × shifts on the first ``global_iterations``
   iterations and for as long as the last one still moved the poses by more than
   ``global_until``° on average (normalised correlation: the initial model's scale is
   unknown), then a
   coarse-to-fine local search around the current poses (likelihood against the half
   maps, which are in the images' units; passes at θ and θ/2), θ set by the resolution:
   θ ≈ b / (4 r) for a particle of radius r, so that a step moves the density by at most
   a quarter of the resolution, never coarser than the previous step.
2. **Reconstruction** of both halves at the new poses (Wiener, per-shell SSNR from their
   FSC; :func:`~cryoprior.solvers.backprojection.reconstruct_source`, sharded over
   processes under ``torchrun``), or, with ``soft_k`` > 1 in global iterations, at each
   particle's ``soft_k`` best poses weighted by their likelihood (RELION's expectation,
   truncated; :func:`~cryoprior.solvers.soft_reconstruction.reconstruct_soft`);
   ``band_factor`` × the half maps' FSC 0.143 resolution is the next band.
3. **References**: the half maps themselves (already Wiener-filtered by the SSNR) under
   a soft spherical solvent mask (``mask_radius``, as RELION's particle-diameter mask), or,
   with a density-map prior, each half map denoised by the prior's network
   (:func:`~cryoprior.solvers.map_baselines.plug_and_play` with the half map's own noise
   spectrum, Blush-style), each half on its own — only the per-shell noise power, which
   RELION shares between the halves too, comes from both.

The resolution that sets the next band is the FSC 0.143 of the *masked* half maps,
corrected for the mask by phase randomisation beyond the shell where the unmasked FSC
falls below 0.8 (and no further out than the search band;
:func:`~cryoprior.metrics.fsc_corrected.corrected_fsc`, as RELION's post-processing),
the phases randomised on the reconstruction's padded grid before its crop, so that the
crop's own leak is measured too. The
plain FSC (recorded too) is not used: at low SNR, noise aligned to a common low-pass
reference builds a large common low-resolution blob, and its truncation by the box (or a
mask) leaks into every shell (measured at SNR 0.01: FSC 0.7-0.8 up to Nyquist, 85 % of it
beyond 0.47 box from the centre; masked but corrected only beyond the band, a flat 0.5
plateau inside it that walked the band to Nyquist), which would open the band to noise.

The loop stops after ``iterations`` or when the resolution has not improved for
``patience`` iterations. Every iteration writes its half maps, references, poses and FSC
(:class:`RefineRecorder`), so a killed run resumes from the last finished iteration.

Ab initio (no initial model): :mod:`cryoprior.solvers.abinitio`.

Units: Å, Å/px, degrees in configs and records, radians only inside the pose search.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.geometry.rotations import matrix_to_euler, rotation_angle
from cryoprior.io.star import Particles
from cryoprior.metrics import spherical_mask
from cryoprior.metrics.fsc_corrected import corrected_fsc
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import (
    SourceReconstruction,
    reconstruct_source,
)
from cryoprior.solvers.distributed_recon import (
    allreduce_accumulators,
    process_layout,
    shard_indices,
    split_halves,
)
from cryoprior.solvers.halfmap import shell_filter
from cryoprior.solvers.poses import global_search, refine_local
from cryoprior.solvers.refine_records import IterationRecord, RefineRecorder
from cryoprior.solvers.soft_reconstruction import SoftPoses, reconstruct_soft

Log = Callable[[str], None]


def lowpass(
    volume: torch.Tensor, pixel_size: float, resolution: float, edge: float = 2.0
) -> torch.Tensor:
    """``volume`` (D, D, D) low-passed at ``resolution`` Å: shell weights 1 up to
    c − edge/2, a raised cosine through 1/2 at the cut c = D·pixel size/resolution
    (cycles per box, not rounded), 0 from c + edge/2 on (RELION's soft low-pass)."""
    size = int(volume.shape[-1])
    cut = size * pixel_size / require_positive(resolution, "low-pass resolution (Å)")
    s = torch.arange(size, dtype=torch.float64)
    t = ((s - (cut - edge / 2)) / max(edge, 1e-9)).clamp(0.0, 1.0)
    return shell_filter(volume, 0.5 * (1 + torch.cos(math.pi * t)))


@dataclass
class RefineConfig:
    """Settings of :func:`refine` (lengths in Å, angles in degrees).

    ``initial_lowpass``: the initial model is low-passed to it, and the first pose search
    compares at that band. ``global_step``: the SO(3) grid step of the global search.
    ``max_shift``: the largest origin searched (default 4 px). ``particle_radius``: for the
    angular step (default 0.3 · box). ``mask_radius``: the soft spherical solvent mask of
    the references and of the FSC that sets the band (default 0.4 · box; 3 px soft edge).
    ``min_step``: the finest local step. ``patience``:
    iterations without a finer FSC before stopping. ``global_finest``: global searches
    compare no finer than this (Å): a 7.5° grid gains nothing from finer detail, and the
    cost grows with the band's area. ``band_factor``: the next search
    compares up to this fraction of the half maps' FSC 0.143 resolution (a few shells
    beyond it, as RELION; the Wiener-filtered references weigh those shells down).
    ``global_iterations``: global searches always run first; more follow, up to
    ``max_global_iterations``, while the last one still moved the poses by more than
    ``global_until`` degrees on average (RELION's auto-refine likewise keeps exhaustive
    searches until the orientations settle): a small particle's 30 Å start aligns few
    particles, and each global search against the improving half maps aligns more
    (3aqg_A at SNR 0.1: 2 → 10 → 27 → 54 % within 10°).
    ``prior_iterations``: network evaluations of the plug-and-play denoising of the
    references with a prior. ``soft_k``: the poses per particle that global iterations
    reconstruct from (its K best, weighted by their likelihood:
    :mod:`cryoprior.solvers.soft_reconstruction`); 1 is the hard assignment.
    """

    iterations: int = 12
    initial_lowpass: float = 30.0
    global_step: float = 7.5
    global_iterations: int = 2
    max_global_iterations: int = 6
    global_until: float = 10.0
    global_finest: float = 7.0
    band_factor: float = 0.85
    max_shift: float | None = None
    particle_radius: float | None = None
    mask_radius: float | None = None
    min_step: float = 0.5
    patience: int = 2
    image_batch: int = 2048
    seed: int = 0
    prior_iterations: int = 8
    soft_k: int = 1

    def validate(self) -> None:
        require(int(self.iterations) >= 1, f"iterations must be >= 1, got {self.iterations}")
        require_positive(self.initial_lowpass, "initial low-pass (Å)")
        require_positive(self.global_step, "global search step (degrees)")
        require(self.global_iterations >= 1, "global_iterations must be >= 1")
        require(
            self.max_global_iterations >= self.global_iterations,
            "max_global_iterations must be >= global_iterations",
        )
        require_positive(self.min_step, "finest angular step (degrees)")
        require(self.max_shift is None or self.max_shift >= 0, "max shift must be >= 0 Å")
        require(self.mask_radius is None or self.mask_radius > 0, "mask radius must be > 0 Å")
        require(int(self.image_batch) >= 1, "image batch must be >= 1")
        require(int(self.soft_k) >= 1, f"soft_k must be >= 1, got {self.soft_k}")


@dataclass
class RefineResult:
    """Final maps (D, D, D) on the particles' grid, the estimated poses (n, 3, 3) and
    origins (n, 2) Å, the gold-standard split, and the iteration records."""

    full: torch.Tensor
    half1: torch.Tensor
    half2: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor
    split: tuple[np.ndarray, np.ndarray]
    history: list[IterationRecord]
    particles: Particles
    resumed: bool = False

    @property
    def resolution(self) -> float:
        """The last iteration's half-map FSC 0.143 resolution (Å)."""
        return self.history[-1].fsc0143


def with_poses(particles: Particles, rotations: torch.Tensor, shifts: torch.Tensor) -> Particles:
    """A copy of ``particles`` carrying the given poses (RELION angles) and origins (Å)."""
    angles = matrix_to_euler(rotations.to(torch.float64)).numpy()
    return dataclasses.replace(
        particles, angles=angles, shifts=shifts.to(torch.float64).numpy(), has_poses=True
    )


MASK_EDGE_PX = 3.0


def solvent_mask(box: int, pixel_size: float, radius: float | None) -> torch.Tensor:
    """Soft spherical mask (box³, float64): 1 within ``radius`` Å of the centre (default
    0.4 · box; at most box/2 − 4 px), a raised cosine over 3 px to 0."""
    r_px = 0.4 * box if radius is None else float(radius) / pixel_size
    r_px = min(r_px, box / 2 - MASK_EDGE_PX - 1.0)
    return spherical_mask((box,) * 3, max(r_px, 1.0), MASK_EDGE_PX, dtype=torch.float64)


def angular_step(resolution: float, radius: float, min_step: float, max_step: float) -> float:
    """The local search step (degrees): θ = resolution / (4 · radius) rad, within
    [``min_step``, ``max_step``]."""
    theta = math.degrees(resolution / (4.0 * radius))
    return float(min(max(theta, min_step), max_step))


def assign_poses(
    source: ParticleSource,
    references: list[torch.Tensor],
    split: tuple[np.ndarray, np.ndarray],
    rotations: torch.Tensor | None,
    shifts: torch.Tensor | None,
    *,
    band: float,
    step: float,
    search: str,
    max_shift: float,
    image_batch: int,
    top_k: int = 1,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, SoftPoses | None]:
    """New poses (n, 3, 3) and origins (n, 2) Å of every particle against its half's
    reference: ``search`` = "global" (grid step ``step``°, normalised correlation) or
    "local" (passes at step and step/2 around ``rotations``/``shifts``, likelihood), and,
    for a global search with ``top_k`` > 1, each particle's ``top_k`` best poses and
    their weights (else None). Under ``torchrun`` each process searches its shard; the
    results are summed (each particle is filled by one process only)."""
    n = len(source)
    rank, world = process_layout()
    mine = shard_indices(n, rank, world)
    out_rot = torch.zeros(n, 3, 3, dtype=torch.float64)
    out_shift = torch.zeros(n, 2, dtype=torch.float64)
    k = int(top_k) if search == "global" else 1
    soft = [torch.zeros(n, k, *tail, dtype=torch.float64) for tail in ((3, 3), (2,), ())]
    px = source.pixel_size
    for h, part in enumerate(split):
        idx = np.intersect1d(part, mine, assume_unique=True)
        ref = references[h].to(torch.float32)
        for batch in source.batches(image_batch, indices=idx, center=False):
            if search == "global":
                a = global_search(
                    ref,
                    batch.images,
                    batch.ctf,
                    px,
                    band=band,
                    step_deg=step,
                    max_shift=max_shift,
                    top_k=k,
                    score="correlation",
                    show_progress=show_progress,
                )
                if k > 1:
                    at = torch.from_numpy(batch.indices)
                    soft[0][at], soft[1][at] = a.top_rotations, a.top_shifts
                    soft[2][at] = a.weights
            else:
                ids = torch.from_numpy(batch.indices)
                a = refine_local(
                    ref,
                    batch.images,
                    batch.ctf,
                    px,
                    rotations[ids],
                    shifts[ids],
                    band=band,
                    steps_deg=(step, step / 2),
                    max_shift=max(2 * px, 0.5 * max_shift),
                    show_progress=show_progress,
                )
            out_rot[torch.from_numpy(batch.indices)] = a.rotations.to(torch.float64)
            out_shift[torch.from_numpy(batch.indices)] = a.shifts.to(torch.float64)
    if k == 1:
        allreduce_accumulators([out_rot, out_shift])
        return out_rot, out_shift, None
    allreduce_accumulators([out_rot, out_shift, *soft])
    return out_rot, out_shift, SoftPoses(*soft)


def _denoise_halves(
    halves: tuple[torch.Tensor, torch.Tensor],
    pixel_size: float,
    prior: Any,
    mass_kda: float,
    n_iter: int,
) -> list[torch.Tensor]:
    """Each half map denoised on its own by the prior's network (plug-and-play with the
    half's noise spectrum: twice the average's, from the halves' difference)."""
    from cryoprior.solvers.denoise import map_intensity_scale, to_prior_grid
    from cryoprior.solvers.halfmap import HalfMapLikelihood, half_map_noise
    from cryoprior.solvers.map_baselines import plug_and_play
    from cryoprior.solvers.prior_reconstruction import prior_grid_plan

    plan = prior_grid_plan(prior, int(halves[0].shape[-1]), float(pixel_size))
    g = [to_prior_grid(h.to(torch.float64), plan) for h in halves]
    noise = half_map_noise(g[0], g[1], plan.target_pixel_size)
    one_half = dataclasses.replace(noise, noise_power=2.0 * noise.noise_power)
    out = []
    for gh in g:
        scale = map_intensity_scale(gh, plan.target_pixel_size, mass_kda).value
        op = HalfMapLikelihood(gh, one_half)
        pnp = plug_and_play(prior, op, op.measurement(torch.float32), 1.0, scale, n_iter=n_iter)
        out.append(plan.map_back(pnp.map.to(torch.float64)))
    return out


def _reconstruct(
    particles: Particles,
    seed: int,
    randomise_from: int | None = None,
    soft: SoftPoses | None = None,
) -> SourceReconstruction:
    """Both half maps at the particles' poses, or at their weighted ``soft`` poses
    (sharded under ``torchrun``), with their phase-randomised copies when
    ``randomise_from`` is given."""
    source = ParticleSource(particles, check=False)
    if soft is not None:
        return reconstruct_soft(
            source, soft, seed=seed, distributed=True, randomise_from=randomise_from
        )
    return reconstruct_source(
        source, ssnr="fsc", seed=seed, distributed=True, randomise_from=randomise_from
    )


def _search_kind(history: list[IterationRecord], config: RefineConfig) -> str:
    """ "global" for the first ``global_iterations``, and after a global search that moved
    the poses by more than ``global_until``° on average (at most
    ``max_global_iterations`` in all); "local" from then on."""
    it = len(history)
    if it < config.global_iterations:
        return "global"
    last = history[-1] if history else None
    if (
        last is not None
        and last.search == "global"
        and it < config.max_global_iterations
        and last.pose_change_deg is not None
        and last.pose_change_deg > config.global_until
    ):
        return "global"
    return "local"


def _stalled(history: list[IterationRecord], patience: int) -> bool:
    """Whether the last ``patience`` local iterations gave no finer FSC than the local
    iterations before them (global searches come first: :func:`_search_kind`).

    Global iterations are not compared. At iteration 0 both halves were aligned to the one
    initial model, so they are not yet independent: the same reference-driven assignments
    (a few aligned particles, the rest in consistent wrong orientations) make them agree
    far beyond their true resolution (measured: 3.2–5.1 Å at iteration 0 of low-SNR runs
    that ended at 9–19 Å). Compared with that, the local iterations would never count as
    finer and the loop would stop after ``patience`` of them however much they improved.
    """
    first_local = sum(r.search == "global" for r in history)
    if patience < 1 or len(history) < first_local + patience + 1:
        return False
    before = min(r.fsc0143 for r in history[first_local:-patience])
    return min(r.fsc0143 for r in history[-patience:]) >= before - 1e-3


def _randomise_limit(band: float, box: int, pixel_size: float) -> int:
    """The outermost shell where the mask correction may start randomising phases: one past
    the search band's shell (the alignment fitted the shells up to it), at most box/2 − 2."""
    return max(1, min(math.ceil(box * pixel_size / band) + 1, box // 2 - 2))


def _mean_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.rad2deg(rotation_angle(a, b)).mean())


def refine(
    source: ParticleSource,
    initial: torch.Tensor,
    out: str | Path,
    config: RefineConfig | None = None,
    *,
    prior: Any = None,
    mass_kda: float | None = None,
    log: Log | None = None,
    show_progress: bool = False,
) -> RefineResult:
    """Refine poses and half maps from ``initial`` (D, D, D, the particles' grid; any
    scale) — see the module docstring. Resumes from ``out`` when it holds finished
    iterations of the same particles and settings. ``prior`` (a density-map prior, with
    ``mass_kda``) denoises each half's reference before every pose assignment."""
    config = config or RefineConfig()
    config.validate()
    log = log or (lambda _msg: None)
    n, box, px = len(source), source.box, source.pixel_size
    require(
        tuple(initial.shape) == (box,) * 3,
        f"the initial model is {tuple(initial.shape)}, the particles need ({box}, {box}, {box}): "
        "resample it to the particles' box and pixel size",
    )
    if prior is not None and mass_kda is None:
        raise InputError(
            "refinement with a prior needs the molecule's mass (--mass-kda or --sequence)"
        )
    require(n >= 4, f"refinement needs at least 4 particles, got {n}")
    max_shift = 4 * px if config.max_shift is None else float(config.max_shift)
    radius = 0.3 * box * px if config.particle_radius is None else float(config.particle_radius)
    nyquist = 2.0 * px
    mask = solvent_mask(box, px, config.mask_radius)
    split = split_halves(n, config.seed)
    recorder = RefineRecorder(Path(out), source, config)
    loaded = recorder.load()
    resumed = loaded is not None
    if loaded is None:
        history: list[IterationRecord] = []
        start = lowpass(initial.to(torch.float64), px, config.initial_lowpass) * mask
        refs = [start, start.clone()]
        rotations = shifts = None
        band, step = float(config.initial_lowpass), float(config.global_step)
    else:
        history, refs, rotations, shifts = loaded
        last = history[-1]
        band, step = max(config.band_factor * last.fsc0143, nyquist), last.step
        log(f"resuming after iteration {last.iteration} (FSC 0.143 {last.fsc0143:.2f} Å)")
    particles = source.particles
    rec = None
    while len(history) < config.iterations:
        it = len(history)
        t0 = time.perf_counter()
        search = _search_kind(history, config)
        if search == "local":
            step = angular_step(band, radius, config.min_step, step)
        if search == "global":
            band = max(band, min(config.global_finest, config.initial_lowpass))
        new_rot, new_shift, soft = assign_poses(
            source,
            refs,
            split,
            rotations,
            shifts,
            band=band,
            step=step,
            search=search,
            max_shift=max_shift,
            image_batch=config.image_batch,
            top_k=config.soft_k,
            show_progress=show_progress,
        )
        change = _mean_change(new_rot, rotations) if rotations is not None else None
        moved = float((new_shift - shifts).norm(dim=-1).mean()) if shifts is not None else None
        rotations, shifts = new_rot, new_shift
        particles = with_poses(source.particles, rotations, shifts)
        rec = _reconstruct(particles, config.seed, _randomise_limit(band, box, px), soft)
        refs = [rec.half1.double() * mask, rec.half2.double() * mask]
        fsc_curve = corrected_fsc(
            rec.half1, rec.half2, px, mask, rec.randomised_from, randomised=rec.randomised
        )
        res = float(fsc_curve.resolution_0143)
        if prior is not None:
            refs = _denoise_halves((refs[0], refs[1]), px, prior, mass_kda, config.prior_iterations)
            refs = [r * mask for r in refs]
        record = IterationRecord(
            iteration=it,
            search=search,
            band=band,
            step=step,
            fsc0143=res,
            fsc05=float(fsc_curve.resolution_05),
            pose_change_deg=change,
            shift_change=moved,
            seconds=time.perf_counter() - t0,
            prior=prior is not None,
            fsc_curve=[round(float(v), 4) for v in fsc_curve.fsc],
            fsc0143_unmasked=float(rec.fsc_halves.resolution_0143),
        )
        history.append(record)
        recorder.save(record, history, rec, refs, particles, rotations)
        log(
            f"iteration {it}: {search} search (band {band:.1f} Å, step {step:.2f}°), "
            f"half-map FSC 0.143 {res:.2f} Å"
            + (" (both halves aligned to the one start: not yet independent)" if it == 0 else "")
            + ("" if change is None else f", mean pose change {change:.2f}°")
            + ", "
            f"{record.seconds:.0f} s"
        )
        band = max(config.band_factor * res, nyquist)
        if search == "local" and _stalled(history, config.patience):
            log(f"no finer FSC for {config.patience} iterations: stopping")
            break
    if rec is None:  # resumed a finished run: rebuild its maps from the saved poses
        particles = with_poses(source.particles, rotations, shifts)
        rec = _reconstruct(particles, config.seed)
    return RefineResult(
        full=rec.full,
        half1=rec.half1,
        half2=rec.half2,
        rotations=rotations,
        shifts=shifts,
        split=split,
        history=history,
        particles=particles,
        resumed=resumed,
    )


__all__ = [
    "IterationRecord",
    "RefineConfig",
    "RefineRecorder",
    "RefineResult",
    "angular_step",
    "assign_poses",
    "lowpass",
    "refine",
    "solvent_mask",
    "with_poses",
]
