"""``cryoprior reconstruct --method mfn``: coordinate-network reconstruction with pose refinement.

Fits a band-limited multiplicative filter network (residual MFN or BACON) to the particles
in coarse-to-fine stages, refining every particle's rotation and in-plane shift, starting
from the STAR file's poses (optionally perturbed, for experiments). Poses are refined by a
local exhaustive search around the current pose (``--mfn-pose-search local``, the default:
rotations within ``--mfn-search-radius-deg`` on a lattice of ``--mfn-search-step-deg``,
shifts within ``--mfn-max-shift`` Å, refined on finer lattices), then Adam steps.

Writes map.mrc (final), stage{j}.mrc (the map after each stage), initial.mrc (the Wiener
back-projection from the initial poses), particles_refined.star (refined poses), loss.png
and mfn.json. The run checkpoints into the output folder; ``--resume`` continues a killed
run.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cryoprior.cli._common import run_record, write_json
from cryoprior.core.containers import Volume
from cryoprior.core.files import atomic_path
from cryoprior.geometry.rotations import matrix_to_euler
from cryoprior.io.mrc import write_map
from cryoprior.io.star import write_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.mfn_config import (
    INITS,
    NETWORKS,
    POSE_SEARCHES,
    SEARCH_ESTIMATES,
    MFNFitConfig,
    format_stages,
    parse_stages,
)
from cryoprior.solvers.mfn_fit import MFNFitResult, fit_mfn, network_summary
from cryoprior.solvers.pose_frames import perturb_poses, pose_errors

DEFAULTS = MFNFitConfig()


def add_mfn_args(p: argparse.ArgumentParser) -> None:
    """The options of ``--method mfn`` (all prefixed ``--mfn-``, plus the experiment flags)."""
    g = p.add_argument_group("MFN fitting (--method mfn)")
    g.add_argument(
        "--mfn-network",
        choices=NETWORKS,
        default=DEFAULTS.network,
        help="coordinate network (default: residual_mfn)",
    )
    g.add_argument(
        "--mfn-init",
        choices=INITS,
        default=DEFAULTS.init,
        help="frequency initialisation: marching (residual MFN paper), bacon, or default "
        "(marching for residual_mfn, bacon for bacon)",
    )
    g.add_argument("--mfn-hidden", type=int, default=DEFAULTS.hidden_features, help="width")
    g.add_argument("--mfn-layers", type=int, default=DEFAULTS.num_layers, help="layers = outputs")
    g.add_argument(
        "--mfn-max-band",
        type=float,
        default=DEFAULTS.max_band,
        help="band of the finest output as a fraction of Nyquist (default 1)",
    )
    g.add_argument(
        "--mfn-stages",
        default=None,
        help="schedule BAND:EPOCHS:OUTPUTS[:POSES],...; BAND a fraction of Nyquist, NN A "
        "(resolution in Å) or auto (the band of output OUTPUTS); POSES all (as "
        "--mfn-pose-search says), search, adam, shifts or fixed. Default: auto:1:k:shifts "
        "for the coarser outputs, then MAX/2:2:L and MAX:2:L with MAX = --mfn-max-band",
    )
    g.add_argument(
        "--mfn-batch-size", type=int, default=DEFAULTS.batch_size, help="images per step"
    )
    g.add_argument("--mfn-lr", type=float, default=DEFAULTS.lr, help="network Adam step")
    g.add_argument(
        "--mfn-net-steps", type=int, default=DEFAULTS.net_steps, help="network steps per batch"
    )
    g.add_argument(
        "--mfn-pose-steps",
        type=int,
        default=DEFAULTS.pose_steps,
        help="pose Adam steps per batch (0: no pose refinement)",
    )
    g.add_argument(
        "--mfn-pose-lr",
        type=float,
        default=DEFAULTS.pose_lr_deg,
        help="rotation step in degrees at the Nyquist band (larger at coarser bands)",
    )
    g.add_argument(
        "--mfn-shift-lr",
        type=float,
        default=DEFAULTS.pose_lr_angstrom,
        help="shift step in Å at the Nyquist band",
    )
    g.add_argument(
        "--mfn-fixed-shifts", action="store_true", help="refine rotations only, not shifts"
    )
    g.add_argument(
        "--mfn-pose-search",
        choices=POSE_SEARCHES,
        default=DEFAULTS.pose_search,
        help="local: exhaustive local search around each pose on every batch, then the Adam "
        "steps (default); adam: Adam steps only",
    )
    g.add_argument(
        "--mfn-search-radius-deg",
        type=float,
        default=DEFAULTS.search_radius_deg,
        help="rotation search radius in degrees at the first searching stage (cover the "
        f"expected pose error; default {DEFAULTS.search_radius_deg:g})",
    )
    g.add_argument(
        "--mfn-search-step-deg",
        type=float,
        default=DEFAULTS.search_step_deg,
        help="rotation lattice spacing in degrees at the first searching stage, scaled by "
        f"the band ratio at later stages (default {DEFAULTS.search_step_deg:g})",
    )
    g.add_argument(
        "--mfn-search-refine-steps",
        type=float,
        default=DEFAULTS.search_refine_steps,
        help="search radius at later searching stages, in lattice steps "
        f"(default {DEFAULTS.search_refine_steps:g})",
    )
    g.add_argument(
        "--mfn-search-levels",
        type=int,
        default=DEFAULTS.search_levels,
        help="lattice levels, each a third of the previous spacing "
        f"(default {DEFAULTS.search_levels})",
    )
    g.add_argument(
        "--mfn-max-shift",
        type=float,
        default=DEFAULTS.search_max_shift,
        help="largest shift move per search in Å (default: 3 pixels; 0: rotations only)",
    )
    g.add_argument(
        "--mfn-search-estimate",
        choices=SEARCH_ESTIMATES,
        default=DEFAULTS.search_estimate,
        help="mean: posterior mean pose over the candidates (default; robust at low SNR); "
        "best: the lowest-misfit candidate",
    )
    g.add_argument(
        "--mfn-pose-prior",
        type=float,
        default=DEFAULTS.pose_prior_deg,
        metavar="DEG",
        help="expected rms rotation error of the STAR's poses in degrees (RELION's "
        "--sigma_ang): a Gaussian prior on how far the search moves a particle from its "
        "starting pose (default: none, uniform in the search ball)",
    )
    g.add_argument(
        "--mfn-pose-accept",
        type=float,
        default=DEFAULTS.pose_accept,
        help="keep a new pose only if the misfit drops by this many times what fitting "
        "noise would (default 0: any decrease)",
    )
    g.add_argument(
        "--mfn-warm-start",
        type=int,
        default=DEFAULTS.warm_start_steps,
        help="regression steps onto the initial back-projection (0: none)",
    )
    g.add_argument(
        "--mfn-kernel",
        choices=["linear", "cubic"],
        default=DEFAULTS.kernel,
        help="Fourier interpolation of the projector (default linear: fast)",
    )
    g.add_argument(
        "--perturb-deg",
        type=float,
        default=0.0,
        help="experiment: rotate every initial pose by this angle (degrees, random axis) "
        "and report pose errors against the STAR poses",
    )
    g.add_argument(
        "--perturb-shift",
        type=float,
        default=0.0,
        help="experiment: move every initial shift by this many Å (random direction)",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue the MFN fit checkpointed in the folder"
    )


def config_from_args(args: argparse.Namespace, pixel_size: float) -> MFNFitConfig:
    """The :class:`MFNFitConfig` described by the command-line options."""
    stages = None if args.mfn_stages is None else parse_stages(args.mfn_stages, pixel_size)
    return MFNFitConfig(
        network=args.mfn_network,
        init=args.mfn_init,
        hidden_features=args.mfn_hidden,
        num_layers=args.mfn_layers,
        max_band=args.mfn_max_band,
        stages=stages,
        batch_size=args.mfn_batch_size,
        lr=args.mfn_lr,
        net_steps=args.mfn_net_steps,
        pose_steps=args.mfn_pose_steps,
        pose_lr_deg=args.mfn_pose_lr,
        pose_lr_angstrom=args.mfn_shift_lr,
        refine_shifts=not args.mfn_fixed_shifts,
        pose_accept=args.mfn_pose_accept,
        pose_search=args.mfn_pose_search,
        search_radius_deg=args.mfn_search_radius_deg,
        search_step_deg=args.mfn_search_step_deg,
        search_refine_steps=args.mfn_search_refine_steps,
        search_levels=args.mfn_search_levels,
        search_max_shift=args.mfn_max_shift,
        search_estimate=args.mfn_search_estimate,
        pose_prior_deg=args.mfn_pose_prior,
        warm_start_steps=args.mfn_warm_start,
        pad=getattr(args, "pad", DEFAULTS.pad),
        kernel=args.mfn_kernel,
        seed=getattr(args, "seed", 0),
    )


def plot_losses(result: MFNFitResult, path: Path) -> None:
    """Write a PNG of the loss of every batch, one colour per stage (atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    start = 0
    for stage in result.stages:
        x = range(start, start + len(stage.losses))
        res = 2 * result.pixel_size / stage.band
        ax.plot(x, stage.losses, lw=1.0, label=f"stage {stage.index + 1}: {res:.1f} Å band")
        start += len(stage.losses)
    ax.set_xlabel("batch")
    ax.set_ylabel("relative misfit in the band")
    ax.set_title("MFN fit: loss per batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)


def run_mfn(args: argparse.Namespace, source: ParticleSource, out: Path) -> dict[str, Any]:
    """Run the MFN fit for ``cryoprior reconstruct`` and write its outputs into ``out``.

    Returns the summary written to ``out/mfn.json`` (final-map path, resolution of each
    stage's band, timings and, when the poses were perturbed, the pose errors against the
    STAR poses before and after refinement, with the global frame removed).
    """
    source.require_poses("MFN fitting (the STAR poses are the initial poses)")
    out = Path(out)
    px = source.pixel_size
    config = config_from_args(args, px)
    rotations, shifts = source.rotations, torch.as_tensor(source.particles.shifts)
    perturbed = args.perturb_deg > 0 or args.perturb_shift > 0
    if perturbed:
        rotations, shifts = perturb_poses(
            source.rotations, shifts, args.perturb_deg, args.perturb_shift, seed=args.seed
        )
    result = fit_mfn(
        source,
        config,
        out_dir=out,
        resume=args.resume,
        show_progress=not getattr(args, "quiet", False),
        initial_rotations=rotations,
        initial_shifts=shifts,
    )
    write_map(out / "map.mrc", Volume(result.map.float(), px))
    write_map(out / "initial.mrc", Volume(result.initial_map.float(), px))
    refined = replace(
        source.particles,
        angles=matrix_to_euler(result.rotations).numpy(),
        shifts=result.shifts.numpy(),
        has_poses=True,
    )
    write_particles(out / "particles_refined.star", refined)
    plot_losses(result, out / "loss.png")
    summary: dict[str, Any] = {
        "map": str(out / "map.mrc"),
        "stage_maps": [str(out / f"stage{s.index + 1}.mrc") for s in result.stages],
        "refined_star": str(out / "particles_refined.star"),
        "stages": format_stages(config.resolved_stages()),
        "history": result.history,
        "seconds": result.seconds,
        "resumed": result.resumed,
    }
    if perturbed:
        truth = (source.rotations, torch.as_tensor(source.particles.shifts))
        summary["pose_error_before"] = pose_errors(rotations, shifts, *truth)
        summary["pose_error_after"] = pose_errors(result.rotations, result.shifts, *truth)
    write_json(
        out / "mfn.json",
        run_record(
            "reconstruct",
            args,
            method="mfn",
            n_particles=len(source),
            box=source.box,
            pixel_size=px,
            config=config.to_dict(),
            **network_summary(result),
            **summary,
        ),
    )
    return summary
