"""Coordinate-network (MFN) reconstruction benchmark: staged fitting with pose refinement.

For each protein (a shipped name or a structure file; default FKBP12 1fki_A, 107
residues, and corpus/protein_A.pdb.gz, 297 residues, from ``cryoprior data corpus``)
particles are simulated with the physics core (Haar-uniform poses, uniform in-plane shifts
up to 3 Å, CTF with defocus 1.0-2.5 µm at 300 kV, white noise at SNR 0.1 = variance of the
noiseless CTF images over the box / noise variance). For each initial pose error θ
(default 5°, 20°, 45°; every rotation moved by exactly θ about a random axis, every shift
by one pixel in a random direction) these reconstructions are compared:

  (a) Wiener back-projection with the true poses (the reference; once per protein),
  (b) Wiener back-projection with the perturbed poses,
  (c) BACON, staged, with pose refinement (only with ``--networks ... bacon``),
  (d) residual MFN with the marching ("new") initialisation, staged, with pose refinement.

Pose refinement: on every batch a local exhaustive search around each particle's pose
(rotations within 45° on a 10° lattice, then a 3.3° cube; shifts within 3 px; posterior
mean under white noise and, with ``--pose-prior theta`` (default), a Gaussian prior of rms
θ on the rotation away from the starting pose; see cryoprior.solvers.mfn_fit), then 5
Adam steps. The first stage (network output 1, 12.4 Å) refines shifts only; the search
runs at 10 Å (output 2, 1.5 epochs) and at 3.75 Å (3 epochs, radius 2 lattice steps of
3.75°).

Cost on one CPU thread: about 15 min per MFN fit with 10,000 particles alone on the
machine (~30 min beside two other jobs on 2 cores), plus ~1.5 min per protein for
simulation and the Wiener maps; run one process per protein side by side and join them
with ``--merge``.

Reported: FSC 0.143 and 0.5 resolution against the ground-truth map (soft spherical mask
of radius 0.4 box), and mean / median pose errors (degrees, Å) before and after, with the
global frame removed (the fit leaves the map's rigid frame free; the MFN maps are rendered
exactly in the frame that best aligns their poses with the truth, the rotation and
translation removed are listed). Writes benchmarks/results/mfn.{json,md}, mfn_fsc.png
(FSC curves) and mfn_stages.png (resolution after each stage).

    python benchmarks/mfn.py                    # full run (see --help for sizes)
    python benchmarks/mfn.py --quick --out /tmp/mfn_quick   # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Stage schedules (BAND:EPOCHS:OUTPUTS[:POSES], see cryoprior.solvers.mfn_fit.parse_stages).
# Full: output 1 at its band (12.4 Å, shifts only: a one-layer MFN is too poor a map to orient
# particles by), then output 2 at 10 Å (1.5 epochs, the wide pose search) and at 3.75 Å
# (network band 0.8 × Nyquist = 3.75 Å at 1.5 Å/px; 3 epochs: against the TRUE map a local
# search from 20° needs three visits at this band to reach its limit, 11° -> 3.9° -> 3.2°).
# Quick (32², 3 Å/px): the first band is 33 Å, too coarse to orient a small protein at SNR
# 0.1, so only shifts are refined there.
FULL_STAGES = "auto:1:1:shifts,0.3:1.5:2,0.8:3:2"
QUICK_STAGES = "auto:2:1:shifts,0.6:3:2"


def simulate(work: Path, protein: str, n: int, box: int, px: float, seed: int) -> dict:
    """Simulate the particles of one protein; returns the truth map and the star path."""
    from cryoprior.data.corpus import shipped_records
    from cryoprior.io.mrc import write_map
    from cryoprior.physics.simulator import (
        SimulationConfig,
        simulate_particles,
        volume_from_file,
    )

    records = {r.name: r.path for r in shipped_records()}
    path = records.get(protein, Path(protein))
    if not path.is_file():
        raise SystemExit(
            f"unknown protein {protein!r}: give a structure file or one of {sorted(records)}"
        )
    truth = volume_from_file(path, box, px)
    write_map(work / "truth.mrc", truth)
    cfg = SimulationConfig(n_particles=n, snr=0.1, max_shift=3.0, seed=seed)
    res = simulate_particles(truth, cfg, work, show_progress=False)
    return {"truth": truth.data, "star": res.paths["star"], "measured_snr": res.measured_snr}


def score(volume: torch.Tensor, truth: torch.Tensor, px: float) -> dict:
    """FSC against the truth (soft spherical mask, radius 0.4 box)."""
    from cryoprior.metrics.fsc import fsc, spherical_mask

    box = truth.shape[-1]
    mask = spherical_mask(tuple(truth.shape), 0.4 * box, soft_edge_px=3.0)
    r = fsc(volume.float(), truth.float(), px, mask=mask)
    return {
        "fsc0143_angstrom": r.resolution_0143,
        "fsc05_angstrom": r.resolution_05,
        "curve": [float(v) for v in r.fsc],
        "frequency": [float(v) for v in r.frequency],
    }


def wiener(source, rotations: torch.Tensor | None, shifts: torch.Tensor | None, seed: int):
    """Wiener back-projection (FSC-based SSNR) with the given poses (None: the STAR's)."""
    from cryoprior.geometry.rotations import matrix_to_euler
    from cryoprior.physics.source import ParticleSource
    from cryoprior.solvers.backprojection import reconstruct_source

    if rotations is not None:
        particles = replace(
            source.particles,
            angles=matrix_to_euler(rotations).numpy(),
            shifts=shifts.numpy(),
        )
        source = ParticleSource(particles, check=False)
    return reconstruct_source(source, seed=seed).full


def fit_row(source, truth, config, start, true_poses, px) -> dict:
    """One MFN fit, scored per stage in the frame aligned to the true poses."""
    from cryoprior.solvers.mfn_fit import fit_mfn, render_aligned
    from cryoprior.solvers.poses import global_alignment, pose_errors

    t0 = time.perf_counter()
    result = fit_mfn(
        source,
        config,
        show_progress=False,
        initial_rotations=start[0],
        initial_shifts=start[1],
    )
    seconds = time.perf_counter() - t0
    stages = []
    net = result.network
    for stage in result.stages:
        a, c = global_alignment(stage.rotations, stage.shifts, *true_poses)
        net.load_state_dict(stage.network_state)
        net.set_stage(stage.outputs)
        aligned = render_aligned(net, truth.shape[-1], px, result.amplitude, a, c)
        stages.append(
            {
                "stage": stage.index + 1,
                "band_resolution_angstrom": 2 * px / stage.band,
                "outputs": stage.outputs,
                "seconds": stage.seconds,
                "pose_error": pose_errors(stage.rotations, stage.shifts, *true_poses),
                "unaligned": {
                    k: v for k, v in score(stage.map, truth, px).items() if "angstrom" in k
                },
                **score(aligned, truth, px),
            }
        )
    final = stages[-1]
    return {
        "seconds": seconds,
        "fsc0143_angstrom": final["fsc0143_angstrom"],
        "fsc05_angstrom": final["fsc05_angstrom"],
        "curve": final["curve"],
        "frequency": final["frequency"],
        "pose_error_after": final["pose_error"],
        "stages": stages,
    }


def run(args: argparse.Namespace) -> dict:
    from cryoprior.core.runtime import set_threads
    from cryoprior.physics.source import ParticleSource
    from cryoprior.solvers.mfn_fit import MFNFitConfig, parse_stages
    from cryoprior.solvers.poses import perturb_poses, pose_errors

    set_threads(args.threads)
    box, px = args.box, args.pixel_size
    stages = parse_stages(args.stages, px)
    common = {
        "hidden_features": args.hidden,
        "num_layers": 2,
        "max_band": args.max_band,
        "stages": stages,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pose_steps": args.pose_steps,
        "pose_lr_deg": args.pose_lr,
        "pose_lr_angstrom": args.shift_lr,
        "pose_search": args.pose_search,
        "search_radius_deg": args.search_radius,
        "search_step_deg": args.search_step,
        "search_refine_steps": args.search_refine_steps,
        "search_levels": args.search_levels,
        "search_max_shift": args.max_shift,
        "search_estimate": args.search_estimate,
        "seed": args.seed,
    }
    methods = {}
    if "bacon" in args.networks:
        methods["(c) BACON"] = MFNFitConfig(network="bacon", **common)
    if "residual_mfn" in args.networks:
        methods["(d) residual MFN"] = MFNFitConfig(
            network="residual_mfn", init="marching", **common
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for structure in args.proteins:
            protein = Path(structure).name.split(".")[0]  # a shipped name or a file's stem
            work = Path(tmp) / protein
            work.mkdir()
            t0 = time.perf_counter()
            sim = simulate(work, structure, args.n_particles, box, px, args.seed)
            print(
                f"{protein}: simulated {args.n_particles} particles in "
                f"{time.perf_counter() - t0:.0f} s (SNR {sim['measured_snr']:.3f})",
                flush=True,
            )
            source = ParticleSource.from_star(sim["star"])
            truth = sim["truth"]
            true_poses = (source.rotations, torch.as_tensor(source.particles.shifts))
            t0 = time.perf_counter()
            ref = score(wiener(source, None, None, args.seed), truth, px)
            rows.append(
                {
                    "protein": protein,
                    "perturb_deg": 0.0,
                    "method": "(a) Wiener, true poses",
                    "seconds": time.perf_counter() - t0,
                    **ref,
                }
            )
            print(
                json.dumps({k: v for k, v in rows[-1].items() if k not in ("curve", "frequency")}),
                flush=True,
            )
            for deg in args.perturb:
                shift = args.perturb_shift if args.perturb_shift is not None else px
                start = perturb_poses(*true_poses, deg, shift, seed=args.seed + 1)
                before = pose_errors(*start, *true_poses)
                t0 = time.perf_counter()
                rows.append(
                    {
                        "protein": protein,
                        "perturb_deg": deg,
                        "method": "(b) Wiener, perturbed poses",
                        "seconds": time.perf_counter() - t0,
                        "pose_error_before": before,
                        "pose_error_after": before,
                        **score(wiener(source, *start, args.seed), truth, px),
                    }
                )
                rows[-1]["seconds"] = time.perf_counter() - t0
                print(json.dumps(brief(rows[-1])), flush=True)
                for name, config in methods.items():
                    row = {"protein": protein, "perturb_deg": deg, "method": name}
                    row["pose_error_before"] = before
                    if args.pose_prior == "theta" and deg > 0:
                        config = replace(config, pose_prior_deg=deg)
                    row.update(fit_row(source, truth, config, start, true_poses, px))
                    rows.append(row)
                    print(json.dumps(brief(row)), flush=True)
    return {"rows": rows, "config": {k: repr(v) if k == "stages" else v for k, v in common.items()}}


def brief(row: dict) -> dict:
    """A row without curves and per-stage details, for progress lines."""
    out = {k: v for k, v in row.items() if k not in ("curve", "frequency", "stages")}
    for key in ("pose_error_before", "pose_error_after"):
        if key in out:
            e = out[key]
            out[key] = f"{e['mean_angle_deg']:.2f} deg, {e['mean_shift_angstrom']:.2f} A"
    return out


# ----------------------------------------------------------------------------- output


def plot_fsc(rows: list[dict], path: Path) -> None:
    """FSC curves vs truth, one panel per (protein, perturbation)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    proteins = list(dict.fromkeys(r["protein"] for r in rows))
    perturbs = sorted({r["perturb_deg"] for r in rows if r["perturb_deg"] > 0})
    fig = Figure(figsize=(4.0 * len(perturbs), 3.2 * len(proteins)), dpi=110)
    FigureCanvasAgg(fig)
    for i, protein in enumerate(proteins):
        ref = next(r for r in rows if r["protein"] == protein and r["perturb_deg"] == 0)
        for j, deg in enumerate(perturbs):
            ax = fig.add_subplot(len(proteins), len(perturbs), i * len(perturbs) + j + 1)
            chosen = [ref] + [
                r for r in rows if r["protein"] == protein and r["perturb_deg"] == deg
            ]
            for r in chosen:
                ax.plot(
                    r["frequency"][1:],
                    r["curve"][1:],
                    lw=1.2,
                    label=f"{r['method']}: {r['fsc0143_angstrom']:.2f} Å",
                )
            ax.axhline(0.143, color="0.4", ls="--", lw=0.8)
            ax.axhline(0.5, color="0.4", ls=":", lw=0.8)
            ax.set_ylim(-0.1, 1.05)
            ax.set_title(f"{protein}, initial error {deg:g}°", fontsize=9)
            ax.set_xlabel("spatial frequency (1/Å)", fontsize=8)
            ax.set_ylabel("FSC vs truth", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def plot_stages(rows: list[dict], path: Path) -> None:
    """FSC 0.143 resolution after each stage for the MFN fits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    proteins = list(dict.fromkeys(r["protein"] for r in rows))
    fig = Figure(figsize=(5.0 * len(proteins), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    perturbs = sorted({r["perturb_deg"] for r in rows if r["perturb_deg"] > 0})
    colours = {deg: f"C{j}" for j, deg in enumerate(perturbs)}
    for i, protein in enumerate(proteins):
        ax = fig.add_subplot(1, len(proteins), i + 1)
        for r in rows:
            if r["protein"] != protein:
                continue
            if "stages" in r:
                xs = [s["stage"] for s in r["stages"]]
                ys = [s["fsc0143_angstrom"] for s in r["stages"]]
                style = "-o" if "residual" in r["method"] else "--s"
                ax.plot(
                    xs,
                    ys,
                    style,
                    ms=4,
                    color=colours[r["perturb_deg"]],
                    label=f"{r['method'][:3]} {r['perturb_deg']:g}°",
                )
                ax.set_xticks(xs)
            elif r["perturb_deg"] == 0:
                ax.axhline(r["fsc0143_angstrom"], color="k", lw=0.8, label="(a) Wiener, true poses")
        ax.set_xlabel("stage (c: dashed, d: solid)")
        ax.set_ylabel("FSC 0.143 resolution vs truth (Å)")
        ax.set_title(protein)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def write_results(
    result: dict,
    args: argparse.Namespace,
    out: Path,
    seconds: float,
    command: str | None = None,
    remark: str | None = None,
) -> None:
    rows = result["rows"]
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "mfn",
        "box": args.box,
        "pixel_size": args.pixel_size,
        "n_particles": args.n_particles,
        "proteins": args.proteins,
        "perturb_deg": args.perturb,
        "perturb_shift_angstrom": args.perturb_shift
        if args.perturb_shift is not None
        else args.pixel_size,
        "snr": 0.1,
        "snr_definition": "variance of noiseless CTF images over the box / noise variance",
        "stages": args.stages,
        "pose_prior": args.pose_prior,
        "networks": args.networks,
        "fit_config": result["config"],
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "wall_time_s": round(seconds, 1),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "fsc": "vs ground truth, soft spherical mask r = 0.4 box, first crossing",
        "pose_error": "geodesic angle / shift distance after removing the best global rigid motion",
    }
    (out / "mfn.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot_fsc(rows, out / "mfn_fsc.png")
    plot_stages(rows, out / "mfn_stages.png")
    lines = [
        f"# MFN reconstruction with pose refinement ({args.box}² px, {args.pixel_size} Å/px, "
        f"{args.n_particles} particles, SNR 0.1, CTF)",
        "",
        f"{meta['machine']}, {args.threads} threads; {meta['time']}; "
        f"elapsed {seconds / 60:.1f} min. "
        f"Command: `{meta['command']}`.",
        f"Stages `{args.stages}` (BAND:EPOCHS:OUTPUTS[:POSES]), hidden width {args.hidden}, "
        f"2 layers, network band {args.max_band:g} × Nyquist. Pose refinement: "
        f"{args.pose_search} search (radius {args.search_radius:g}°, step "
        f"{args.search_step:g}°, {args.search_levels} levels, {args.search_estimate} "
        f"estimate; later stages {args.search_refine_steps:g} steps), then {args.pose_steps} "
        f"Adam steps. Pose prior: "
        + (
            "Gaussian on the rotation away from the starting pose, rms = θ₀ (RELION's "
            "sigma_ang; --pose-prior theta)"
            if args.pose_prior == "theta"
            else "none (uniform in the search ball)"
        )
        + f". FSC {meta['fsc']}. Pose errors: {meta['pose_error']}, mean (median).",
        "",
        "| protein | θ₀ | method | FSC0.143 (Å) | FSC0.5 (Å) | pose error before | "
        "pose error after | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = fmt_pose(r.get("pose_error_before"))
        after = fmt_pose(r.get("pose_error_after"))
        lines.append(
            f"| {r['protein']} | {r['perturb_deg']:g}° | {r['method']} | "
            f"{r['fsc0143_angstrom']:.2f} | {r['fsc05_angstrom']:.2f} | {before} | {after} | "
            f"{r['seconds']:.0f} |"
        )
    lines += ["", "Per stage (aligned FSC 0.143 / 0.5 in Å; mean pose error):", ""]
    for r in rows:
        if "stages" not in r:
            continue
        parts = [
            f"stage {s['stage']} ({s['band_resolution_angstrom']:.1f} Å band): "
            f"{s['fsc0143_angstrom']:.2f}/{s['fsc05_angstrom']:.2f}, "
            f"{s['pose_error']['mean_angle_deg']:.1f}°"
            for s in r["stages"]
        ]
        lines.append(f"- {r['protein']} {r['perturb_deg']:g}° {r['method']}: " + "; ".join(parts))
    if remark:
        lines += ["", remark.strip()]
    lines += ["", NOTES.strip()]
    (out / "mfn.md").write_text("\n".join(lines) + "\n")


def fmt_pose(e: dict | None) -> str:
    if e is None:
        return "true poses"
    return (
        f"{e['mean_angle_deg']:.2f}° ({e['median_angle_deg']:.2f}°), "
        f"{e['mean_shift_angstrom']:.2f} Å"
    )


NOTES = """
Notes. Both networks have the same bands per output (BACON's band fractions are matched
to the marching init's, continuous frequencies), width and schedule; the residual MFN adds
a head on its first filter (without it the marching init cannot represent the lowest
Fourier shells). Each fit starts from a Wiener back-projection with the perturbed poses,
which sets the output scale and a short regression of output 1 onto it, low-passed to the
first stage's band. Every batch takes one network Adam step, then the batch's poses are
refined against the map: a local exhaustive search (rotations on a lattice in axis-angle
space around the current pose, every shift within 3 px from phase ramps, a finer lattice
around the estimate; the estimate is the posterior mean under white noise whose power is
the image's misfit at its current pose), kept only where it lowers the image's misfit,
then Adam steps (rotation and shift, fresh moments per visit, the best pose met kept).
The first stage refines shifts only: a one-layer MFN is too poor a map to orient a small
protein by, and searching against it moved poses away from the truth. The map's rigid
frame is free in the fit; pose errors and MFN FSCs are measured after removing the best
global rotation and translation (listed per stage in mfn.json); the Wiener maps are in the
frame of their poses. With --pose-prior theta the search weighs candidates by a Gaussian
prior on the rotation away from the starting pose (rms θ₀, what a user states as RELION's
sigma_ang) and a particle moves only if its posterior rises. Information limit: a local
search from 20° against the TRUE map (1,000 particles, SNR 0.1, 3.75 Å band, three visits)
ends at a mean error of 3.2° for 1fki_A (107 residues, Rg 13 Å) and 2.1° for protein_A
(297 residues, Rg 19 Å): a longer lever arm makes the same SNR orient better, so a mean
error 5× below 20° (4°) needs an almost perfect map on the small protein.
"""


def merge(parts: list[str], out: Path, remark: str | None = None) -> int:
    """Write one table from the mfn.json of runs that differ only in their proteins or
    perturbations (rows sorted by protein, then perturbation)."""
    loaded = []
    for part in parts:
        path = Path(part) / "mfn.json"
        if not path.is_file():
            raise SystemExit(f"--merge: {path} does not exist; give directories of finished runs")
        loaded.append(json.loads(path.read_text()))
    meta = loaded[0]["meta"]
    for other in loaded[1:]:
        keys = ("box", "pixel_size", "n_particles", "stages", "fit_config")
        for key in (*keys, "pose_prior"):
            if other["meta"].get(key) != meta.get(key):
                raise SystemExit(f"--merge: the runs differ in {key}; merge only like runs")
    fit = meta["fit_config"]
    args = argparse.Namespace(
        box=meta["box"],
        pixel_size=meta["pixel_size"],
        n_particles=meta["n_particles"],
        proteins=[p for part in loaded for p in part["meta"]["proteins"]],
        perturb=sorted({d for part in loaded for d in part["meta"]["perturb_deg"]}),
        perturb_shift=meta["perturb_shift_angstrom"],
        stages=meta["stages"],
        networks=sorted({n for part in loaded for n in part["meta"]["networks"]}),
        threads=meta["threads"],
        hidden=fit["hidden_features"],
        max_band=fit["max_band"],
        pose_search=fit["pose_search"],
        search_radius=fit["search_radius_deg"],
        search_step=fit["search_step_deg"],
        search_levels=fit["search_levels"],
        search_estimate=fit["search_estimate"],
        search_refine_steps=fit["search_refine_steps"],
        pose_steps=fit["pose_steps"],
        pose_prior=meta.get("pose_prior", "none"),
    )
    rows = [row for part in loaded for row in part["rows"]]
    order = list(dict.fromkeys(row["protein"] for row in rows))
    seen, unique = set(), []
    for row in rows:  # the true-pose reference appears once per protein
        key = (row["protein"], row["perturb_deg"], row["method"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    rows = sorted(unique, key=lambda r: (order.index(r["protein"]), r["perturb_deg"]))
    commands = "; ".join(part["meta"]["command"] for part in loaded)
    command = f"{commands}; then mfn.py --merge {' '.join(parts)}"
    # the parts ran side by side: the elapsed time is the longest part's
    seconds = max(part["meta"]["wall_time_s"] for part in loaded)
    write_results({"rows": rows, "config": fit}, args, out, seconds, command, remark)
    print(f"wrote {out / 'mfn.md'} from {len(parts)} runs")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (32², few particles)")
    ap.add_argument("--n-particles", type=int, default=None, help="default 10000 (quick 1000)")
    ap.add_argument("--box", type=int, default=None, help="default 64 (quick 32)")
    ap.add_argument("--pixel-size", type=float, default=None, help="Å/px, default 1.5 (quick 3)")
    ap.add_argument(
        "--proteins",
        nargs="+",
        default=None,
        help="shipped names or structure files (default 1fki_A corpus/protein_A.pdb.gz)",
    )
    ap.add_argument("--perturb", nargs="+", type=float, default=None, help="default 5 20 45")
    ap.add_argument("--perturb-shift", type=float, default=None, help="Å (default one pixel)")
    ap.add_argument("--stages", default=None, help=f"default {FULL_STAGES}")
    ap.add_argument(
        "--hidden", type=int, default=None, help="network width, default 128 (quick 64)"
    )
    ap.add_argument(
        "--networks",
        nargs="+",
        choices=["residual_mfn", "bacon"],
        default=["residual_mfn"],
        help="which MFNs to fit (default residual_mfn; adding bacon doubles the time)",
    )
    ap.add_argument("--max-band", type=float, default=0.8, help="network band / Nyquist")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--pose-steps", type=int, default=5, help="Adam steps after the search")
    ap.add_argument("--pose-lr", type=float, default=0.3, help="degrees at the Nyquist band")
    ap.add_argument("--shift-lr", type=float, default=0.1, help="Å at the Nyquist band")
    ap.add_argument("--pose-search", choices=["local", "adam"], default="local")
    ap.add_argument(
        "--search-radius", type=float, default=45.0, help="degrees, first searching stage"
    )
    ap.add_argument("--search-step", type=float, default=10.0, help="degrees, lattice spacing")
    ap.add_argument(
        "--search-refine-steps",
        type=float,
        default=2.0,
        help="search radius at later stages, in lattice steps",
    )
    ap.add_argument("--search-levels", type=int, default=2)
    ap.add_argument("--search-estimate", choices=["mean", "best"], default="mean")
    ap.add_argument("--max-shift", type=float, default=None, help="Å (default 3 pixels)")
    ap.add_argument(
        "--pose-prior",
        choices=["none", "theta"],
        default="theta",
        help="theta (default): give the fit a Gaussian prior on the rotation away from the "
        "starting pose whose rms is the perturbation angle (what a user states as RELION's "
        "--sigma_ang); none: uniform in the search ball",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default benchmarks/results (quick: required)")
    ap.add_argument("--remark", default=None, help="a paragraph for the table (with --merge)")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="combine the mfn.json of partial runs (e.g. one protein each, run side by side) "
        "into one table in --out; nothing is recomputed",
    )
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out) if args.out else RESULTS, args.remark)
    quick = args.quick
    args.n_particles = args.n_particles or (1000 if quick else 10000)
    args.box = args.box or (32 if quick else 64)
    args.pixel_size = args.pixel_size or (3.0 if quick else 1.5)
    args.proteins = args.proteins or (
        ["1fki_A"] if quick else ["1fki_A", "corpus/protein_A.pdb.gz"]
    )
    args.perturb = args.perturb or ([20.0] if quick else [5.0, 20.0, 45.0])
    args.stages = args.stages or (QUICK_STAGES if quick else FULL_STAGES)
    args.hidden = args.hidden or (64 if quick else 128)
    if quick and args.out is None:
        raise SystemExit("--quick writes elsewhere than benchmarks/results: give --out")
    out = Path(args.out) if args.out else RESULTS
    t0 = time.perf_counter()
    result = run(args)
    write_results(result, args, out, time.perf_counter() - t0)
    print(f"wrote {out / 'mfn.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
