"""Coordinate-network reconstruction: fit a band-limited MFN to particle images, refining poses.

The map is a multiplicative filter network V(x) = a · y_k(x) (:mod:`cryoprior.networks.mfn`:
BACON, or the residual MFN of Shekarforoush et al., NeurIPS 2022), whose output k is
band-limited to a known band b_k (cycles per box). Each image i is modelled as

    Ŷ_i = FT[ crop( shift_{-s_i} ( CTF_i · P(R_i) FT(V) ) ) ],    R_i = exp([δ_i]×) R⁰_i,

the physics core's forward model (:class:`cryoprior.physics.projection.Projector`, the CTF
of :mod:`cryoprior.physics.ctf` on the padded slice grid, then the crop; exactly what
:mod:`cryoprior.physics.simulator` renders), with R⁰_i the initial pose (from the STAR file),
δ_i a small axis-angle update in the microscope frame (radians) and s_i the RELION origin
in Å (the particle centre sits at -s_i). The loss of a batch is the squared distance
between model and observed image spectra over the frequencies |k| ≤ band of the current
stage (the images low-passed to the stage's band), divided by the observed power there:

    L = Σ_i Σ_{|k| ≤ band} |Y_i(k) - Ŷ_i(k)|² / Σ_i Σ_{|k| ≤ band} |Y_i(k)|².

Stages (coarse to fine; Shekarforoush et al. §3.3, "frequency marching"): stage j fits
with the network's outputs 1..k_j active and only their layers trainable
(``set_stage(k_j)``), compares images up to its band, and runs ``epochs`` passes over the
particles in random batches. On each batch the network takes ``net_steps`` Adam steps with
the poses fixed, then the batch's poses are refined with the map fixed (alternating
minimisation, as in the authors' code; the map is the one the last network step started
from, which saves rendering it again): first a local exhaustive search, then
``pose_steps`` Adam steps. Every step keeps a particle's pose unless the new one has a
lower loss under the forward model above, so a visit never increases its image's misfit
for the current map. The local search and the Adam pose steps, with the search's cost:
:mod:`cryoprior.solvers.mfn_poses`; the schedule and settings:
:mod:`cryoprior.solvers.mfn_config`; the forward model on the working grid:
:mod:`cryoprior.solvers.mfn_render`.

Working grid. Only frequencies below the stage's band b (cycles per box) enter the loss,
so a stage projects on a grid D' = 2⌈b⌉ + 2 (same physical box, pixel size p·D/D') and
compares with the Fourier-cropped images. The network (a continuous function) is
evaluated on the smallest grid whose Nyquist exceeds its active output's band (so the
samples do not alias) and Fourier-cropped to D'. Projections sum D' instead of D voxels
and spectra D'² instead of D² pixels, so model spectra are scaled by (D/D')³. Coarse
stages are many times cheaper; stages at the full band use the full grid.

Initialisation. A Wiener back-projection from the initial poses
(:func:`cryoprior.solvers.backprojection.reconstruct_source`) sets the network's output
scale a (its standard deviation) and, with ``warm_start_steps`` > 0, a target for a short
regression of output k_1 onto the map low-passed to the first stage's band (on the working
grid, no projections). Nothing else is taken from it.

Global frame. The data fix the map only up to a rigid motion: a map V(Aᵀ(r - c)) with
poses R_i Aᵀ and shifts s_i + (R_i Aᵀ c)_xy explains the images equally well. The fit does
not pin this gauge; it is anchored only by the initial poses (their errors average out).
:func:`~cryoprior.solvers.pose_frames.global_alignment` finds (A, c) against reference
poses, :func:`~cryoprior.solvers.pose_frames.pose_errors` reports errors before and after
removing it, and :func:`render_aligned` renders the network in the reference frame exactly
(the network is a function, so no interpolation is needed).

Checkpoints. With ``out_dir``, the network, optimiser, poses, stage results and history
are written atomically to ``out_dir/checkpoint.pt`` every ``checkpoint_every`` batches
and at the end of each stage, and each stage's map to ``out_dir/stage{j}.mrc``. Batch
order is a function of (seed, stage, epoch), so a killed run resumed with
``resume=True`` continues exactly where its last checkpoint was written.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError, require
from cryoprior.core.files import atomic_path
from cryoprior.core.runtime import progress, seed_everything
from cryoprior.geometry.fft import fft3_c
from cryoprior.geometry.grids import frequency_grid
from cryoprior.geometry.rotations import matrix_to_euler
from cryoprior.io.star import read_particle_images
from cryoprior.networks.mfn import MultiplicativeFilterNetwork, render_grid
from cryoprior.networks.registry import network_config
from cryoprior.physics.ctf import compute_ctf
from cryoprior.physics.projection import Projector, crop_centred, padded_size
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.mfn_config import (
    INITS,
    NETWORKS,
    POSE_MODES,
    POSE_SEARCHES,
    SEARCH_ESTIMATES,
    MFNFitConfig,
    Stage,
    format_stages,
    make_network,
    parse_stages,
)
from cryoprior.solvers.mfn_poses import (
    BandSearchModel,
    PoseState,
    adam_pose_steps,
    refine_poses,
    search_grid,
    search_pose_steps,
)
from cryoprior.solvers.mfn_render import (
    WorkingGrid,
    data_spectra,
    fourier_crop,
    model_spectra,
    render_aligned,
    render_volume,
    working_grid,
)
from cryoprior.solvers.pose_grids import SearchGrid

CHECKPOINT_FORMAT = "cryoprior-mfn-fit"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------
# results


@dataclass
class StageResult:
    """What one stage produced: its map (D, D, D), the poses after it, the network state.

    band: the loss band as a fraction of Nyquist; outputs: the network stage; losses: the
    mean relative loss of every batch (network steps); seconds: wall time of the stage.
    """

    index: int
    band: float
    outputs: int
    map: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor
    network_state: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float


@dataclass
class MFNFitResult:
    """The fit: final map (D, D, D) in the source's pixel size, poses, per-stage results.

    rotations (N, 3, 3) float64 and shifts (N, 2) float64 (RELION origins, Å) are the
    refined poses; initial_rotations / initial_shifts what the fit started from;
    initial_map the Wiener back-projection from the initial poses; network/amplitude give
    the map as a function (:func:`render_aligned`); resumed says whether a checkpoint was
    continued; finished is False when ``max_steps`` stopped the run early.
    """

    map: torch.Tensor
    pixel_size: float
    rotations: torch.Tensor
    shifts: torch.Tensor
    initial_rotations: torch.Tensor
    initial_shifts: torch.Tensor
    initial_map: torch.Tensor
    stages: list[StageResult]
    network: MultiplicativeFilterNetwork
    amplitude: float
    config: MFNFitConfig
    resumed: bool
    finished: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# the fit


def _batch_indices(seed: int, stage: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Positions [step·B, (step+1)·B) of the concatenated per-epoch permutations."""
    start = step * batch
    parts, have = [], 0
    epoch = start // n
    offset = start - epoch * n
    while have < batch:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + stage * 10_007 + epoch)
        perm = torch.randperm(n, generator=g)[offset:]
        parts.append(perm[: batch - have])
        have += parts[-1].shape[0]
        epoch, offset = epoch + 1, 0
    return torch.cat(parts)


def _stage_band(stage: Stage, net: MultiplicativeFilterNetwork, box: int) -> float:
    """The loss band of a stage in cycles per box."""
    nyquist = box / 2
    if stage.band is None:
        return min(float(net.bands[stage.outputs - 1]), nyquist)
    return float(stage.band) * nyquist


def _initial_map(
    source: ParticleSource, rotations: torch.Tensor, shifts: torch.Tensor, config: MFNFitConfig
) -> torch.Tensor:
    """Wiener back-projection (FSC-based SSNR) from the initial poses."""
    from cryoprior.solvers.backprojection import reconstruct_source

    particles = replace(
        source.particles,
        angles=matrix_to_euler(rotations).numpy(),
        shifts=shifts.numpy(),
        has_poses=True,
    )
    start = ParticleSource(particles, check=False)
    return reconstruct_source(
        start, pad=config.pad, seed=config.seed, batch_size=max(config.batch_size, 256)
    ).full.to(torch.float32)


def _warm_start(
    net: MultiplicativeFilterNetwork,
    target: torch.Tensor,
    amplitude: float,
    grid: WorkingGrid,
    k: int,
    steps: int,
    lr: float,
) -> None:
    """Fit output k to ``target`` low-passed to the grid's band, on the working grid."""
    if steps == 0:
        return
    f = frequency_grid((grid.box,) * 3, 1.0 / grid.box, torch.float64).norm(dim=-1)
    mask = f <= grid.band + 1e-9
    want = crop_centred(fft3_c(target.to(torch.float32)), grid.box, 3)[mask]
    want = want * (grid.box / grid.full) ** 3 / amplitude
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    norm = float((want.abs() ** 2).sum())
    for _ in range(steps):
        opt.zero_grad()
        got = fft3_c(render_volume(net, grid, 1.0, k))[mask]
        loss = ((got - want).abs() ** 2).sum() / norm
        loss.backward()
        opt.step()


class _Fit:
    """The state of one fit (network, optimiser, poses, stage results) and its steps."""

    def __init__(
        self,
        source: ParticleSource,
        config: MFNFitConfig,
        rotations: torch.Tensor,
        shifts: torch.Tensor,
        out_dir: Path | None,
    ) -> None:
        self.source, self.config, self.out_dir = source, config, out_dir
        self.n, self.box, self.px = len(source), source.box, source.pixel_size
        self.stages = config.resolved_stages()
        self.fingerprint = float(
            rotations.sum() + (rotations[:, 0, :] * torch.arange(1, 4)).sum() + shifts.sum()
        )
        seed_everything(config.seed)
        self.net = make_network(config, self.box)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.poses = PoseState(rotations, shifts)
        self.initial_shifts = shifts.to(torch.float64).clone()
        self.amplitude = 1.0
        self.initial_map = torch.zeros(0)
        self.stage_index, self.step_in_stage = 0, 0
        self.stages_done: list[StageResult] = []
        self.losses: list[float] = []
        self.history: list[dict[str, float]] = []
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.stage_started = self.started

    @property
    def checkpoint(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def n_steps(self, stage: Stage) -> int:
        return max(1, math.ceil(stage.epochs * self.n / self.config.batch_size))

    def grid(self, stage: Stage) -> WorkingGrid:
        self.net.set_stage(stage.outputs)
        band = _stage_band(stage, self.net, self.box)
        return working_grid(self.box, self.px, band, float(self.net.bands[stage.outputs - 1]))

    def pose_mode(self, stage: Stage) -> str:
        """What a stage does to the poses: search, adam, shifts (searched too when the
        config searches) or fixed."""
        if stage.poses == "all":
            return "search" if self.config.pose_search == "local" else "adam"
        return stage.poses

    def search(self, stage: Stage, grid: WorkingGrid) -> SearchGrid | None:
        """The stage's local search (None: none). Radius and step are the config's at the
        first searching stage, scaled by (its band / this stage's band) at later ones."""
        mode = self.pose_mode(stage)
        if mode == "shifts" and self.config.pose_search == "local" and self.config.refine_shifts:
            return search_grid(self.config, grid, rotations=False)
        if mode != "search":
            return None
        first = next(i for i, s in enumerate(self.stages) if self.pose_mode(s) == "search")
        scale = min(1.0, _stage_band(self.stages[first], self.net, self.box) / grid.band)
        return search_grid(self.config, grid, scale, refine=self.stage_index != first)

    # -- start: fresh or from a checkpoint

    def initialise(self) -> None:
        """Initial map from the initial poses, output scale, warm start of output k_1."""
        self.initial_map = _initial_map(
            self.source, self.poses.base, self.poses.shifts, self.config
        )
        self.amplitude = float(self.initial_map.std()) or 1.0
        first = self.stages[0]
        _warm_start(
            self.net,
            self.initial_map,
            self.amplitude,
            self.grid(first),
            first.outputs,
            self.config.warm_start_steps,
            self.config.lr,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "n_particles": self.n,
            "box": self.box,
            "fingerprint": self.fingerprint,
            "network": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "amplitude": self.amplitude,
            "initial_map": self.initial_map,
            "delta": self.poses.delta,
            "shifts": self.poses.shifts,
            "stage": self.stage_index,
            "step": self.step_in_stage,
            "stages_done": [asdict(s) for s in self.stages_done],
            "losses": list(self.losses),
            "history": list(self.history),
            "elapsed": self.elapsed(),
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def save(self) -> None:
        if self.checkpoint is None:
            return
        with atomic_path(self.checkpoint) as tmp:
            torch.save(self.state_dict(), tmp)

    def load(self) -> None:
        path = self.checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"checkpoint {path} cannot be read ({e}); delete it to restart") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not an MFN fit checkpoint")
        saved, now = state["config"], self.config.to_dict()
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise InputError(
                f"cannot resume {path}: it was written with different settings "
                f"({', '.join(diff)}); resume with the same options or use a new output folder"
            )
        same_poses = abs(state["fingerprint"] - self.fingerprint) <= 1e-6 * max(
            1.0, abs(self.fingerprint)
        )
        if state["n_particles"] != self.n or state["box"] != self.box or not same_poses:
            raise InputError(
                f"cannot resume {path}: it was written for a different particle set or "
                "initial poses; use a new output folder"
            )
        self.stage_index, self.step_in_stage = int(state["stage"]), int(state["step"])
        self.net.set_stage(self.stages[min(self.stage_index, len(self.stages) - 1)].outputs)
        self.net.load_state_dict(state["network"])
        self.opt.load_state_dict(state["optimizer"])
        self.amplitude = float(state["amplitude"])
        self.initial_map = state["initial_map"]
        self.poses.delta = state["delta"]
        self.poses.shifts = state["shifts"]
        self.stages_done = [StageResult(**s) for s in state["stages_done"]]
        self.losses = list(state["losses"])
        self.history = list(state["history"])
        self.elapsed_before = float(state["elapsed"])

    # -- one batch

    def step(self, stage: Stage, grid: WorkingGrid) -> float:
        """Network steps, then pose steps, on the next batch; returns the last loss."""
        config, k = self.config, stage.outputs
        idx = _batch_indices(
            config.seed, self.stage_index, self.step_in_stage, config.batch_size, self.n
        )
        data = data_spectra(read_particle_images(self.source.particles, idx.numpy()), grid)
        power = float((data.abs() ** 2).sum())
        dp = padded_size(grid.box, config.pad)
        ctf = None
        if self.source.ctf is not None:
            ctf = compute_ctf(self.source.ctf.index(idx), (dp, dp), grid.pixel_size)
        rotations = self.poses.rotations(idx).to(torch.float32)
        shifts = self.poses.shifts[idx].to(torch.float32)
        loss_value = float("nan")
        volume = None
        for _ in range(config.net_steps):
            self.opt.zero_grad()
            volume = render_volume(self.net, grid, self.amplitude, k)
            projector = Projector(volume, config.pad, config.kernel)
            model = model_spectra(projector, rotations, shifts, ctf, grid)
            loss = ((model - data).abs() ** 2).sum() / power
            loss.backward()
            self.opt.step()
            loss_value = float(loss.detach())
        mode = self.pose_mode(stage)
        search = self.search(stage, grid)
        if mode != "fixed" and (config.pose_steps > 0 or search is not None):
            # the map the last network step started from (rendering is the costliest part
            # of a step; with net_steps = 0 the current map)
            with torch.no_grad():
                if volume is None:
                    volume = render_volume(self.net, grid, self.amplitude, k)
                volume = volume.detach()
                projector = Projector(volume, config.pad, config.kernel)
            if search is not None:
                search_pose_steps(
                    projector,
                    volume,
                    self.poses,
                    idx,
                    data,
                    ctf,
                    grid,
                    search,
                    config.search_estimate,
                    config.pose_prior_deg,
                )
            if config.pose_steps > 0:
                adam_pose_steps(
                    projector, self.poses, idx, data, ctf, grid, config, mode != "shifts"
                )
        self.losses.append(loss_value)
        self.step_in_stage += 1
        return loss_value

    def finish_stage(self, stage: Stage, grid: WorkingGrid) -> None:
        """Record the stage's map, poses and network; write stage{j}.mrc."""
        with torch.no_grad():
            stage_map = self.amplitude * render_grid(self.net, self.box, scale=stage.outputs)
        band = grid.band / (self.box / 2)
        result = StageResult(
            index=self.stage_index,
            band=band,
            outputs=stage.outputs,
            map=stage_map,
            rotations=self.poses.rotations().clone(),
            shifts=self.poses.shifts.clone(),
            network_state={name: t.clone() for name, t in self.net.state_dict().items()},
            losses=list(self.losses),
            seconds=time.perf_counter() - self.stage_started,
        )
        self.stages_done.append(result)
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        self.history.append(
            {
                "stage": self.stage_index + 1,
                "band_fraction": band,
                "resolution_angstrom": 2 * self.px / band,
                "outputs": stage.outputs,
                "working_box": grid.box,
                "batches": len(self.losses),
                "final_loss": float(np.mean(tail)) if tail else float("nan"),
                "seconds": result.seconds,
            }
        )
        if self.out_dir is not None:
            from cryoprior.io.mrc import write_map

            write_map(self.out_dir / f"stage{self.stage_index + 1}.mrc", Volume(stage_map, self.px))
        self.losses = []
        self.stage_index += 1
        self.step_in_stage = 0
        self.stage_started = time.perf_counter()

    # -- the schedule

    def run(self, max_steps: int | None, show_progress: bool) -> bool:
        """Run the remaining schedule; returns False when stopped by ``max_steps``."""
        steps = [self.n_steps(s) for s in self.stages]
        done = sum(steps[: self.stage_index]) + self.step_in_stage
        bar = progress(
            range(sum(steps) - done), total=sum(steps) - done, desc="mfn", enabled=show_progress
        )
        budget = math.inf if max_steps is None else max_steps
        while self.stage_index < len(self.stages):
            stage = self.stages[self.stage_index]
            grid = self.grid(stage)
            while self.step_in_stage < steps[self.stage_index]:
                if budget <= 0:
                    self.save()
                    if hasattr(bar, "close"):
                        bar.close()
                    return False
                loss = self.step(stage, grid)
                budget -= 1
                if hasattr(bar, "update"):
                    bar.update(1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(stage=self.stage_index + 1, loss=f"{loss:.4f}")
                if self.step_in_stage % self.config.checkpoint_every == 0:
                    self.save()
            self.finish_stage(stage, grid)
            self.save()
        if hasattr(bar, "close"):
            bar.close()
        return True

    def result(self, finished: bool, resumed: bool) -> MFNFitResult:
        k = self.stages[max(0, min(self.stage_index, len(self.stages)) - 1)].outputs
        self.net.set_stage(k)
        with torch.no_grad():
            final = self.amplitude * render_grid(self.net, self.box)
        return MFNFitResult(
            map=final,
            pixel_size=self.px,
            rotations=self.poses.rotations(),
            shifts=self.poses.shifts.clone(),
            initial_rotations=self.poses.base,
            initial_shifts=self.initial_shifts,
            initial_map=self.initial_map,
            stages=self.stages_done,
            network=self.net,
            amplitude=self.amplitude,
            config=self.config,
            resumed=resumed,
            finished=finished,
            seconds=self.elapsed(),
            history=self.history,
        )


def fit_mfn(
    source: ParticleSource,
    config: MFNFitConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    initial_rotations: torch.Tensor | None = None,
    initial_shifts: torch.Tensor | np.ndarray | None = None,
    max_steps: int | None = None,
) -> MFNFitResult:
    """Fit an MFN map to a particle set with staged coarse-to-fine training and pose refinement.

    Args:
        source: the particles (images, CTFs; its poses are the initial poses unless given).
        config: network, schedule and optimiser settings (:class:`MFNFitConfig`).
        out_dir: folder for ``checkpoint.pt`` and ``stage{j}.mrc``; None writes nothing.
        resume: continue from ``out_dir/checkpoint.pt`` (the config, particle count and
            initial poses must match). Without it a folder holding a checkpoint is refused.
        show_progress: a progress bar over all batches.
        initial_rotations / initial_shifts: (N, 3, 3) poses and (N, 2) RELION origins (Å)
            to start from instead of the STAR file's (e.g. from
            :func:`cryoprior.solvers.pose_frames.perturb_poses`).
        max_steps: stop after this many batches in this call (a checkpoint is written);
            a later call with ``resume=True`` continues. None runs to the end.

    Returns:
        :class:`MFNFitResult` (maps in the source's pixel size, poses, per-stage results).
    """
    config.validate()
    n = len(source)
    rot0 = source.rotations if initial_rotations is None else torch.as_tensor(initial_rotations)
    rot0 = rot0.to(torch.float64)
    shifts = source.particles.shifts if initial_shifts is None else initial_shifts
    sh0 = torch.as_tensor(np.asarray(shifts), dtype=torch.float64)
    require(
        rot0.shape == (n, 3, 3), f"initial rotations must be ({n}, 3, 3), got {tuple(rot0.shape)}"
    )
    require(sh0.shape == (n, 2), f"initial shifts must be ({n}, 2) Å, got {tuple(sh0.shape)}")
    require(max_steps is None or max_steps >= 0, "max_steps must be >= 0")
    out = Path(out_dir) if out_dir is not None else None
    fit = _Fit(source, config, rot0, sh0, out)
    if fit.checkpoint is not None and fit.checkpoint.is_file() and not resume:
        raise InputError(
            f"{out} already holds an MFN fit; pass --resume to continue it or choose "
            "another output folder"
        )
    resumed = bool(resume and fit.checkpoint is not None and fit.checkpoint.is_file())
    if resumed:
        fit.load()
    else:
        fit.initialise()
    finished = fit.run(max_steps, show_progress)
    return fit.result(finished, resumed)


def network_summary(result: MFNFitResult) -> dict[str, Any]:
    """The network's config (JSON) and bands in cycles/Å, for reports."""
    box = result.map.shape[-1]
    return {
        "network": network_config(result.network),
        "bands_per_angstrom": [b / (box * result.pixel_size) for b in result.network.bands],
    }


# The configuration, forward model and pose steps live in mfn_config, mfn_render and
# mfn_poses; their public names are re-exported here for existing imports.
__all__ = [
    "BandSearchModel",
    "INITS",
    "MFNFitConfig",
    "MFNFitResult",
    "NETWORKS",
    "POSE_MODES",
    "POSE_SEARCHES",
    "SEARCH_ESTIMATES",
    "Stage",
    "StageResult",
    "WorkingGrid",
    "data_spectra",
    "fit_mfn",
    "format_stages",
    "fourier_crop",
    "make_network",
    "model_spectra",
    "network_summary",
    "parse_stages",
    "refine_poses",
    "render_aligned",
    "render_volume",
    "search_grid",
    "working_grid",
]
