"""Native-grid prior-guided reconstruction benchmark (issue 16): on the data's own grid.

Proteins: 5 chains of the corpus's TEST split (split by sequence identity; never in the
prior's training split, checked), a range of sizes: 5pti_A (58 residues), 1fki_A (107),
3aqg_A (133), 2qdl_A (154), protein_A (297). Ground truth: the atoms_to_map potential at
64³ and 1.5 Å/px (uniform B = 16 px² = 36 Å², the prior's rendering convention), centred
on the atoms' centroid.

Particles, per protein and SNR ∈ {0.1, 0.03, 0.01}: one acquisition of 10,000 images at
64² and 1.5 Å/px (uniform random poses, CTF with defocus 1–2.5 µm, 300 kV, Cs 2.7 mm,
amplitude contrast 0.1), a **B-factor envelope of 60 Å² on the images that the STAR file
does not record** (the unknown high-resolution signal loss of real data), white noise at
the stated SNR (variance of the noiseless images over the whole box / noise variance).
N ∈ {100, 300, 1000, 3000, 10000} uses its first N images.

Methods, all at the known poses and CTFs, all on the same 64³ grid at 1.5 Å/px:
  wiener  direct Fourier inversion, per-shell SSNR from the half maps' FSC (RELION's
          regulariser; ``solvers.backprojection.reconstruct_source``);
  reg     smoothness-regularised least squares, weight by the discrepancy principle;
  pnp     the prior's network as a plain denoiser between data-consistency CG solves
          (half-quadratic splitting, DPIR/Blush-style; ``solvers.map_baselines``);
  prior   diffusion posterior sampling with the native prior (--guidance, default
          "pigdm_dc": Π-GDM plus a proximal data-consistency step; DDIM, --steps 20),
          the mean of --samples samples, drawn in antithetic pairs (the default;
          --independent-samples: independently), and their per-voxel spread.
The intensity scale for pnp and prior comes from the DC terms of the acquisition's images
and the mass from the sequence (never from the ground truth).

Metrics vs the ground truth on the native grid: FSC 0.143 and 0.5 (Å; first crossing;
96 Å = never above the threshold, 3 Å = Nyquist) and Pearson CC, all inside a soft
spherical mask of radius 0.4 box (25.6 px = 38.4 Å) with a 3 px cosine edge; seconds per
reconstruction (statistics included). Spread calibration: the fraction of voxels with
|truth_B − mean| ≤ 2·std inside that mask and inside a molecular mask (truth > 5 % of its
maximum, dilated by 2 px), and per Fourier shell, against truth_B = the truth with the
images' 60 Å² envelope applied (the map the data measure); a calibrated posterior of K
independent samples gives P(|t_{K−1}| ≤ 2/√(1 + 1/K)) (0.83 for K = 4), of K/2
antithetic pairs P(|t_{K/2}| ≤ 2√(K/(K − 1))) (0.85 for K = 4;
``cryoprior.metrics.calibration``).

Results are written after every cell, so a killed run resumes where it stopped (cells
already in the JSON are skipped); ``--proteins``/``--snr``/``--n`` select a subset.

    python benchmarks/native_reconstruction.py                # the full grid
    python benchmarks/native_reconstruction.py --quick        # smoke run, 1 protein
    python benchmarks/native_reconstruction.py --large        # + one 128³ run (time, memory)
    python benchmarks/native_reconstruction.py --redo-prior native_spectrum --name X ...
                                         # only the prior's entries of another result's cells
Writes benchmarks/results/native_reconstruction.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import git_commit, merge_rows, peak_rss_mb, truth_map, write_results  # noqa: E402

PROTEINS = ("5pti_A", "1fki_A", "3aqg_A", "2qdl_A", "protein_A")
SNRS = (0.1, 0.03, 0.01)
NS = (100, 300, 1000, 3000, 10000)
METHODS = ("wiener", "reg", "pnp", "prior")
LABELS = {"wiener": "Wiener", "reg": "reg. LS", "pnp": "denoiser only", "prior": "prior mean"}


def molecular_mask(truth: torch.Tensor, fraction: float = 0.05, dilate: int = 2) -> torch.Tensor:
    """Binary mask: truth > fraction · max, dilated by ``dilate`` voxels (a cube)."""
    m = (truth > fraction * truth.max()).double()[None, None]
    k = 2 * dilate + 1
    m = torch.nn.functional.max_pool3d(m, k, stride=1, padding=dilate)
    return m[0, 0]


def score(volume: torch.Tensor, truth: torch.Tensor, px: float, mask: torch.Tensor) -> dict:
    """FSC 0.143 / 0.5 (Å), masked CC and the FSC curve vs the truth."""
    from cryoprior.metrics import fsc, masked_correlation

    f = fsc(volume.double(), truth.double(), px, mask=mask)
    return {
        "fsc0143": float(f.resolution_0143),
        "fsc05": float(f.resolution_05),
        "cc": float(masked_correlation(volume.double(), truth.double(), mask)),
        "fsc_curve": [round(float(v), 4) for v in f.fsc],
    }


def load_result(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": [], "large": None}


def save_result(result: dict, out: Path, name: str) -> None:
    write_results(result, out, name, summarise, plot)


def simulate(rec, truth, px, snr, n, seed, envelope, folder, max_tilt=None):
    from cryoprior.core.containers import Volume
    from cryoprior.physics.simulator import SimulationConfig, simulate_particles
    from cryoprior.physics.source import ParticleSource

    config = SimulationConfig(
        n_particles=n,
        snr=snr,
        envelope_bfactor=envelope,
        max_tilt=max_tilt,
        seed=seed,
        chunk_size=500,
    )
    sim = simulate_particles(Volume(truth, px), config, folder, show_progress=False)
    return ParticleSource.from_star(sim.paths["star"]), sim.measured_snr


def pnp_entry(prior, data, plan, scale, truth, px, sphere, args, t_stats: float) -> dict:
    """The denoiser-only baseline's scores on calibrated sufficient statistics."""
    from cryoprior.solvers.map_baselines import denoiser_plug_and_play

    pnp = denoiser_plug_and_play(prior, data, scale, n_iter=args.pnp_iter)
    return score(plan.map_back(pnp.map), truth, px, sphere) | {
        "seconds": t_stats + pnp.seconds,
        "commit": git_commit(),
    }


def cell_statistics(prior, full, n) -> tuple:
    """(source, plan, data, seconds): the first ``n`` particles of ``full`` and their
    calibrated sufficient statistics on the prior's grid."""
    from cryoprior.physics.source import ParticleSource
    from cryoprior.solvers.prior_reconstruction import (
        accumulate_particles,
        calibrate_fourier_likelihood,
        prior_grid_plan,
    )

    source = ParticleSource(full.particles.subset(np.arange(n)))
    t = time.perf_counter()
    plan = prior_grid_plan(prior, source.box, source.pixel_size)
    data = accumulate_particles(source, plan.target_box, plan.target_pixel_size, plan=plan)
    calibrate_fourier_likelihood(data)
    return source, plan, data, time.perf_counter() - t


def redo_pnp(prior, full, n, truth, px, scale, sphere, args) -> dict:
    """Only the denoiser-only entry of a finished cell, recomputed (``--redo-pnp``)."""
    _, plan, data, t_stats = cell_statistics(prior, full, n)
    return pnp_entry(prior, data, plan, scale, truth, px, sphere, args, t_stats)


def run_cell(prior, full, n, truth, truth_b, px, scale, mass, masks, args) -> dict:
    """Every method on the first ``n`` particles of ``full``."""
    cell = cell_statistics(prior, full, n)
    row = baseline_entries(prior, cell, truth, px, scale, masks[0], args)
    source, _, data, t_stats = cell
    row["prior"] = prior_entry(prior, source, data, scale, mass, truth, truth_b, px, masks, args)
    row["prior"]["seconds"] += t_stats
    return row


def baseline_entries(prior, cell: tuple, truth, px, scale, sphere, args) -> dict:
    """Wiener, smoothness-regularised LS and denoiser-only on a cell's particles
    (``cell``: :func:`cell_statistics`)."""
    from cryoprior.solvers.backprojection import reconstruct_source
    from cryoprior.solvers.map_baselines import smoothness_regularized

    row: dict = {}
    source, plan, data, t_stats = cell
    t = time.perf_counter()
    wiener = reconstruct_source(source, ssnr="fsc", seed=0).full
    row["wiener"] = score(wiener, truth, px, sphere) | {"seconds": time.perf_counter() - t}
    t = time.perf_counter()
    reg = smoothness_regularized(data)
    row["reg"] = score(reg.map, truth, px, sphere) | {
        "seconds": t_stats + time.perf_counter() - t,
        "mu": reg.mu,
        "converged": reg.converged,
    }
    row["pnp"] = pnp_entry(prior, data, plan, scale, truth, px, sphere, args, t_stats)
    return row


def prior_entry(prior, source, data, scale, mass, truth, truth_b, px, masks, args) -> dict:
    """The posterior mean's scores, its sampling seconds and its spread calibration."""
    from cryoprior.metrics import spread_calibration
    from cryoprior.solvers.prior_reconstruction import reconstruct_with_prior

    sphere, molecule = masks
    post = reconstruct_with_prior(
        source,
        prior,
        mass_kda=mass,
        intensity=scale,
        n_steps=args.steps,
        n_samples=args.samples,
        n_inner=args.n_inner,
        guidance=args.guidance,
        spectrum=args.spectrum,
        antithetic=args.antithetic,
        data=data,
        seed=0,
    )
    mean, _, samples = post.on_particle_grid()
    entry = score(mean, truth, px, sphere) | {
        "seconds": post.seconds["sampling"],
        "spectrum": post.info["spectrum"],
        "antithetic": post.info["antithetic"],
        "commit": git_commit(),
    }
    if samples.shape[0] >= 2:
        pairs = post.info["antithetic"]
        cal = spread_calibration(truth_b, samples, sphere, px, antithetic=pairs)
        cal_m = spread_calibration(truth_b, samples, molecule, px, antithetic=pairs)
        entry["calibration"] = {
            "voxels_sphere": cal["voxels"],
            "voxels_molecule": cal_m["voxels"],
            "expected": cal["expected"],
            "shells": [round(v, 3) for v in cal["shells"]["coverage"]],
        }
    return entry


#: where ``--redo-prior`` keeps a cell's previous prior entry: by what the redo changes
PREVIOUS = {
    "prior_white": "white r_t², independent samples",
    "prior_independent": "protein spectrum, independent samples",
}


def previous_key(entry: dict) -> str:
    """The row key for a prior entry that a ``--redo-prior`` pass replaces: "prior_white"
    for the white r_t² (entries before the spectrum was recorded were white),
    "prior_independent" for the protein spectrum with independent samples."""
    if entry.get("spectrum", "white") == "white":
        return "prior_white"
    assert not entry.get("antithetic"), "a redo of antithetic entries has no key yet"
    return "prior_independent"


def redo_prior(prior, full, n, truth, truth_b, px, scale, mass, masks, args) -> dict:
    """Only the prior's entry of a cell (``--redo-prior``), on the same particles."""
    source, _, data, t_stats = cell_statistics(prior, full, n)
    entry = prior_entry(prior, source, data, scale, mass, truth, truth_b, px, masks, args)
    entry["seconds"] += t_stats
    return entry


def run(args: argparse.Namespace) -> dict:
    from cryoprior.data.corpus import load_corpus
    from cryoprior.metrics import spherical_mask
    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.priors import load_prior
    from cryoprior.solvers.prior_reconstruction import (
        accumulate_particles,
        intensity_scale,
        prior_grid_plan,
    )

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = load_result(out / f"{args.name}.json")
    prior = load_prior(args.prior)
    require_native = prior.metadata.fully_convolutional
    records = {r.name: r for r in load_corpus(Path(args.corpus), "test")}
    train_names = set(prior.metadata.data.get("split", {}).get("train", []))
    assert not train_names & set(args.proteins), "a test protein is in the prior's training"
    box, px = args.box, args.pixel_size
    sphere = spherical_mask((box,) * 3, 0.4 * box, soft_edge_px=3.0).double()
    sim_n = args.sim_n or max(args.n)
    assert sim_n >= max(args.n), "--sim-n must be at least the largest --n"
    done = {(r["protein"], r["snr"], r["n"]) for r in result["rows"]}
    own = {(r["protein"], r["snr"], r["n"]): r for r in result["rows"]}
    if args.redo_baselines:  # the other methods again, on this pass's particles
        result.setdefault("redo_baselines_commands", []).append(" ".join(sys.argv))
    if args.redo_pnp:  # only the finished cells' denoiser-only entries, from older code
        stale = {
            (r["protein"], r["snr"], r["n"]): r
            for r in result["rows"]
            if r["pnp"].get("commit") is None
        }
        done = set(done) - set(stale)
        result["pnp_redo_command"] = " ".join(sys.argv)
    base: dict = {}
    if args.redo_prior:  # the prior's entries again, every other method from FROM's rows
        base = {
            (r["protein"], r["snr"], r["n"]): r
            for r in load_result(out / f"{args.redo_prior}.json")["rows"]
        }
        result["redo_prior_from"] = args.redo_prior
    result.update(
        benchmark="native_reconstruction",
        prior=str(args.prior),
        prior_fully_convolutional=require_native,
        prior_training_steps=prior.metadata.training.get("steps"),
        box=box,
        pixel_size=px,
        envelope_bfactor=args.envelope,
        steps=args.steps,
        samples=args.samples,
        antithetic=args.antithetic,
        n_inner=args.n_inner,
        pnp_iter=args.pnp_iter,
        threads=args.threads,
        machine=platform.platform(),
        mask="soft sphere, radius 0.4 box, 3 px cosine edge",
    )
    if not args.redo_pnp:
        result["command"] = " ".join(sys.argv)
    from cryoprior.data.patches import bfactor_blur

    work = Path(tempfile.mkdtemp(prefix="cryoprior_native_"))
    try:
        for name in args.proteins:
            rec = records[name]
            truth = truth_map(rec, box, px).double()
            truth_b = bfactor_blur(truth, args.envelope, px)
            masks = (sphere, molecular_mask(truth))
            mass = protein_mass_kda(rec.sequence)
            for snr in args.snr:
                todo = [n for n in args.n if (name, snr, n) not in done]
                if args.redo_prior:
                    todo = [n for n in todo if (name, snr, n) in base]
                    sims = {base[(name, snr, n)].get("n_simulated", sim_n) for n in todo}
                    assert sims <= {sim_n}, (
                        f"{args.redo_prior}'s cells simulated {sorted(sims)} particles, this "
                        f"pass {sim_n}: give --sim-n so the particles are the same"
                    )
                if args.redo_baselines:
                    todo = [n for n in args.n if (name, snr, n) in own]
                if not todo:
                    continue
                seed = 1000 * PROTEINS.index(name) + SNRS.index(snr) if snr in SNRS else 7
                folder = work / f"{name}_{snr}"
                full, measured = simulate(rec, truth, px, snr, sim_n, seed, args.envelope, folder)
                plan = prior_grid_plan(prior, full.box, full.pixel_size)
                acq = accumulate_particles(full, plan.target_box, plan.target_pixel_size, plan=plan)
                scale = intensity_scale(acq, mass_kda=mass).value
                for n in todo:
                    if args.redo_baselines:
                        row = own[(name, snr, n)]
                        cell = cell_statistics(prior, full, n)
                        row |= baseline_entries(prior, cell, truth, px, scale, sphere, args)
                        row |= {
                            "n_simulated": sim_n,
                            "snr_measured": measured,
                            "intensity_scale": scale,
                            "baselines_redone": True,
                        }
                        save_result(result, out, args.name)
                        print(
                            f"{name} SNR {snr:g} N {n} (of {sim_n}): Wiener "
                            f"{row['wiener']['fsc0143']:.2f} Å, denoiser only "
                            f"{row['pnp']['fsc0143']:.2f} Å, prior {row['prior']['fsc0143']:.2f} Å",
                            flush=True,
                        )
                        continue
                    if args.redo_pnp:
                        row = stale[(name, snr, n)]
                        row["pnp"] = redo_pnp(prior, full, n, truth, px, scale, sphere, args)
                        save_result(result, out, args.name)
                        print(
                            f"{name} SNR {snr:g} N {n}: denoiser only "
                            f"{row['pnp']['fsc0143']:.2f} Å (was recomputed)",
                            flush=True,
                        )
                        continue
                    if args.redo_prior:
                        row = dict(base[(name, snr, n)])
                        before = previous_key(row["prior"])
                        row[before] = row["prior"]
                        row["n_simulated_prior"] = sim_n
                        row["prior"] = redo_prior(
                            prior, full, n, truth, truth_b, px, scale, mass, masks, args
                        )
                        result["rows"].append(row)
                        save_result(result, out, args.name)
                        print(
                            f"{name} SNR {snr:g} N {n}: Wiener {row['wiener']['fsc0143']:.2f} Å, "
                            f"prior {row['prior']['fsc0143']:.2f} Å ({before}: "
                            f"{row[before]['fsc0143']:.2f} Å), "
                            f"{row['prior']['seconds']:.0f} s",
                            flush=True,
                        )
                        continue
                    row = {
                        "protein": name,
                        "n_residues": rec.n_residues,
                        "snr": snr,
                        "n": n,
                        "snr_measured": measured,
                        "intensity_scale": scale,
                        "n_simulated": sim_n,
                    }
                    row |= run_cell(prior, full, n, truth, truth_b, px, scale, mass, masks, args)
                    result["rows"].append(row)
                    save_result(result, out, args.name)
                    print(
                        f"{name} SNR {snr:g} N {n}: "
                        + ", ".join(
                            f"{LABELS[m]} {row[m]['fsc0143']:.2f} Å ({row[m]['seconds']:.0f} s)"
                            for m in METHODS
                        ),
                        flush=True,
                    )
                shutil.rmtree(folder, ignore_errors=True)
        if args.large:
            result["large"] = run_large(prior, records[args.large_protein], args, work)
            save_result(result, out, args.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def run_large(prior, rec, args, work: Path) -> dict:
    """One run at ``--large-box``³ (1.5 Å/px): time and peak memory, FSC vs truth."""
    from cryoprior.metrics import spherical_mask
    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.solvers.backprojection import reconstruct_source
    from cryoprior.solvers.prior_reconstruction import (
        accumulate_particles,
        calibrate_fourier_likelihood,
        intensity_scale,
        prior_grid_plan,
        reconstruct_with_prior,
    )

    box, px, n, snr = args.large_box, args.pixel_size, args.large_n, 0.03
    truth = truth_map(rec, box, px).double()
    full, measured = simulate(rec, truth, px, snr, n, 99, args.envelope, work / "large")
    mask = spherical_mask((box,) * 3, 0.4 * box, soft_edge_px=3.0).double()
    t = time.perf_counter()
    wiener = reconstruct_source(full, ssnr="fsc", seed=0).full
    t_w = time.perf_counter() - t
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    plan = prior_grid_plan(prior, full.box, full.pixel_size)
    data = accumulate_particles(full, plan.target_box, plan.target_pixel_size, plan=plan)
    calibrate_fourier_likelihood(data)
    mass = protein_mass_kda(rec.sequence)
    scale = intensity_scale(data, mass_kda=mass).value
    post = reconstruct_with_prior(
        full,
        prior,
        mass_kda=mass,
        intensity=scale,
        spectrum=args.spectrum,
        antithetic=None if args.antithetic else False,  # pairs when the samples are even
        n_steps=args.steps,
        n_samples=args.large_samples,
        n_inner=args.n_inner,
        guidance=args.guidance,
        data=data,
        seed=0,
    )
    seconds = time.perf_counter() - t
    mean, _, _ = post.on_particle_grid()
    return {
        "protein": rec.name,
        "n_residues": rec.n_residues,
        "box": box,
        "pixel_size": px,
        "n": n,
        "snr": snr,
        "snr_measured": measured,
        "samples": args.large_samples,
        "steps": args.steps,
        "wiener": score(wiener, truth, px, mask) | {"seconds": t_w},
        "prior": score(mean, truth, px, mask)
        | {
            "seconds": seconds,
            "sampling_seconds": post.seconds["sampling"],
            "spectrum": post.info["spectrum"],
            "antithetic": post.info["antithetic"],
        },
        "peak_rss_mb_before": rss0,
        "peak_rss_mb": peak_rss_mb(),
    }


def _cells(rows: list) -> list[tuple[float, int, list]]:
    keys = sorted({(r["snr"], r["n"]) for r in rows}, key=lambda v: (-v[0], v[1]))
    return [(s, n, [r for r in rows if r["snr"] == s and r["n"] == n]) for s, n in keys]


def _redone_note(rows: list, commands: list[str]) -> str:
    """The header's sentence on cells whose baselines were recomputed (``--redo-baselines``)."""
    redone = sorted({(r["snr"], r["n"]) for r in rows if r.get("baselines_redone")})
    if not redone:
        return ""
    cells = ", ".join(f"SNR {s:g} N {n}" for s, n in redone)
    return (
        f" In {cells}, Wiener, reg. LS and denoiser-only were recomputed on the particles "
        "of the prior's pass (its simulation had another size than the first pass's, and "
        "the CTF draws depend on it): " + "; ".join(f"`{c}`" for c in commands) + "."
    )


def summarise(result: dict) -> str:
    rows = result["rows"]
    pnp_commits = sorted({r["pnp"]["commit"] for r in rows if r["pnp"].get("commit")})
    lines = [
        "# Native-grid prior-guided reconstruction (issue 16)",
        "",
        f"Held-out proteins (corpus test split): "
        f"{', '.join(sorted({r['protein'] for r in rows}, key=PROTEINS.index))}. "
        f"{result.get('box')}³ at {result.get('pixel_size')} Å/px (Nyquist "
        f"{2 * result.get('pixel_size', 1.5):g} Å), CTF + an unrecorded B = "
        f"{result.get('envelope_bfactor')} Å² envelope on the images; every method on that "
        f"grid, same particles, same mask ({result.get('mask')}). "
        f"Prior `{Path(str(result.get('prior'))).name}`"
        f" ({result.get('prior_training_steps')} training steps), Π-GDM, "
        f"{result.get('steps')} DDIM steps, mean of {result.get('samples')} samples"
        + (" (antithetic pairs)" if result.get("antithetic") else "")
        + "; "
        f"denoiser-only: {result.get('pnp_iter')} HQS iterations. "
        + "Commands: "
        + "; ".join(f"`{c}`" for c in result.get("commands") or [result.get("command")])
        + "."
        + (
            f" The other methods' entries (and the earlier prior entries) come from "
            f"`{result['redo_prior_from']}`: "
            + "; ".join(f"`{c}`" for c in result["base_commands"])
            + "."
            if result.get("base_commands")
            else ""
        )
        + (
            " Denoiser-only entries recomputed with the preconditioned data-consistency "
            f"solves (commit {', '.join(pnp_commits)}): `{result['pnp_redo_command']}`."
            if pnp_commits and result.get("pnp_redo_command")
            else ""
        )
        + _redone_note(rows, result.get("redo_baselines_commands") or [])
        + (f" {result['note']}" if result.get("note") else ""),
        "",
        "FSC 0.143 vs truth, Å, mean ± std over proteins (lower is finer):",
        "",
        "| SNR | N | proteins | Wiener | reg. LS | denoiser only | prior mean "
        "| Wiener ÷ prior (means) | prior s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells = _cells(rows)

    def ms(sel: list, m: str, f: str) -> tuple[float, float]:
        v = np.array([r[m][f] for r in sel], dtype=float)
        return float(v.mean()), float(v.std())

    for snr, n, sel in cells:
        vals = {m: ms(sel, m, "fsc0143") for m in METHODS}
        ratio = vals["wiener"][0] / vals["prior"][0]  # of the means, as the goals use it
        lines.append(
            f"| {snr:g} | {n} | {len(sel)} | "
            + " | ".join(f"{vals[m][0]:.2f} ± {vals[m][1]:.2f}" for m in METHODS)
            + f" | {ratio:.2f} | {ms(sel, 'prior', 'seconds')[0]:.0f} |"
        )
    for key, label in PREVIOUS.items():
        if not (rows and all(key in r for r in rows)):
            continue
        now = (
            "antithetic pairs, protein spectrum"
            if result.get("antithetic")
            else "protein spectrum, independent samples"
        )
        lines += [
            "",
            f"The prior's entries above ({now}) against the same cells' entries with "
            f"{label}, the same seeds and grid"
            + (
                " (in the cells whose baselines were recomputed, another draw of the "
                "particles — a simulation of another size):"
                if key == "prior_white"
                else ", the same particles:"
            ),
            "",
            f"| SNR | N | prior mean, {label} | prior mean, {now} |",
            "|---|---|---|---|",
        ]
        for snr, n, sel in cells:
            w, p = ms(sel, key, "fsc0143"), ms(sel, "prior", "fsc0143")
            lines.append(f"| {snr:g} | {n} | {w[0]:.2f} ± {w[1]:.2f} | {p[0]:.2f} ± {p[1]:.2f} |")
    lines += [
        "",
        "FSC 0.5 vs truth (Å) and masked CC, means:",
        "",
        "| SNR | N | "
        + " | ".join(f"{LABELS[m]} FSC0.5" for m in METHODS)
        + " | "
        + " | ".join(f"CC {LABELS[m]}" for m in METHODS)
        + " |",
        "|---|---|" + "---|" * 8,
    ]
    for snr, n, sel in cells:
        lines.append(
            f"| {snr:g} | {n} | "
            + " | ".join(f"{ms(sel, m, 'fsc05')[0]:.2f}" for m in METHODS)
            + " | "
            + " | ".join(f"{ms(sel, m, 'cc')[0]:.3f}" for m in METHODS)
            + " |"
        )
    cal_rows = [r for r in rows if "calibration" in r["prior"]]
    if cal_rows:
        lines += [
            "",
            "Spread calibration of the prior's samples: fraction of voxels with |truth_B − "
            "mean| ≤ 2·std (truth_B: the truth under the images' envelope), and per Fourier "
            "shell (low → high frequency, every 8th shell); calibrated value "
            f"{cal_rows[0]['prior']['calibration']['expected']:.2f}:",
            "",
            "| SNR | N | sphere | molecule | shells |",
            "|---|---|---|---|---|",
        ]
        for snr, n, sel in cells:
            sel = [r for r in sel if "calibration" in r["prior"]]
            if not sel:
                continue
            c = [r["prior"]["calibration"] for r in sel]
            shells = np.mean([x["shells"] for x in c], axis=0)[::8]
            lines.append(
                f"| {snr:g} | {n} | {np.mean([x['voxels_sphere'] for x in c]):.2f} | "
                f"{np.mean([x['voxels_molecule'] for x in c]):.2f} | "
                + " ".join(f"{v:.2f}" for v in shells)
                + " |"
            )
    lines += ["", *goals(cells, result.get("timing"))]
    large = result.get("large")
    if large:
        lines += [
            "",
            f"Large box: {large['protein']} ({large['n_residues']} residues), "
            f"{large['box']}³ at {large['pixel_size']} Å/px, {large['n']} particles at SNR "
            f"{large['snr']}: FSC₀.₁₄₃ (FSC₀.₅) vs truth Wiener "
            f"{large['wiener']['fsc0143']:.2f} Å ({large['wiener']['fsc05']:.2f} Å; "
            f"{large['wiener']['seconds']:.0f} s), prior mean of {large['samples']} "
            f"({large['prior'].get('spectrum', 'white')} r_t²) "
            f"{large['prior']['fsc0143']:.2f} Å ({large['prior']['fsc05']:.2f} Å; "
            f"{large['prior']['seconds']:.0f} s, sampling "
            f"{large['prior']['sampling_seconds']:.0f} s); peak memory "
            f"{large['peak_rss_mb']:.0f} MB (before the prior: "
            f"{large['peak_rss_mb_before']:.0f} MB).",
        ]
    return "\n".join(lines) + "\n"


def goals(cells: list, timing: dict | None = None) -> list[str]:
    """The issue's goals, each MET / NOT MET on the cells present; the time goal on the
    dedicated ``timing`` run where there is one (the grid's cells share the machine)."""
    if not cells:
        return []

    def mean(sel: list, m: str, key: str = "fsc0143") -> float:
        return float(np.mean([r[m][key] for r in sel]))

    finer = [(s, n) for s, n, sel in cells if mean(sel, "prior") < mean(sel, "wiener")]
    low = [(s, n, sel) for s, n, sel in cells if n <= 1000 and s <= 0.03]
    low_ok = [(s, n) for s, n, sel in low if mean(sel, "wiener") / mean(sel, "prior") >= 1.3]
    high = [(s, n, sel) for s, n, sel in cells if n == 10000]
    high_ok = [(s, n) for s, n, sel in high if mean(sel, "prior") <= mean(sel, "wiener")]
    pnp = [(s, n) for s, n, sel in cells if mean(sel, "prior") < mean(sel, "pnp")]
    pnp05 = [
        (s, n) for s, n, sel in cells if mean(sel, "prior", "fsc05") < mean(sel, "pnp", "fsc05")
    ]
    secs = [float(np.mean([r["prior"]["seconds"] for r in sel])) for _, _, sel in cells]

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    return [
        "Goals (on the cells above):",
        "",
        f"- prior mean finer than Wiener in every (SNR, N) mean cell: {len(finer)}/"
        f"{len(cells)} — {verdict(len(finer) == len(cells))}",
        f"- ≥ 1.3× finer at N ≤ 1000, SNR ≤ 0.03: {len(low_ok)}/{len(low)} — "
        f"{verdict(bool(low) and len(low_ok) == len(low))}",
        f"- never worse at N = 10000: {len(high_ok)}/{len(high)} — "
        f"{verdict(bool(high) and len(high_ok) == len(high))}",
        f"- finer than the denoiser-only baseline in most cells: {len(pnp)}/{len(cells)} — "
        f"{verdict(2 * len(pnp) > len(cells))} (at FSC₀.₅, for information: "
        f"{len(pnp05)}/{len(cells)})",
        time_goal(secs, timing),
    ]


def time_goal(secs: list[float], timing: dict | None) -> str:
    """The ≤ 3 min goal: on the dedicated run if any, else on the grid's slowest cell."""
    if timing is None:
        return f"- ≤ 3 min per reconstruction: max mean {max(secs):.0f} s — " + (
            "MET" if max(secs) <= 180 else "NOT MET"
        )
    return (
        f"- ≤ 3 min per reconstruction: {timing['seconds']:.0f} s — "
        + ("MET" if timing["seconds"] <= 180 else "NOT MET")
        + f" (dedicated run, {timing['protein']} SNR {timing['snr']:g} N {timing['n']}, "
        f"{timing['threads']} threads, nothing else on the machine, commit {timing['commit']}: "
        f"`{timing['command']}`; the grid's cells, up to {max(secs):.0f} s, ran as two "
        "1-thread jobs side by side with other work)"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    snrs = sorted({r["snr"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(snrs), figsize=(4.2 * len(snrs), 3.6), squeeze=False)
    for ax, snr in zip(axes[0], snrs, strict=True):
        ns = sorted({r["n"] for r in rows if r["snr"] == snr})
        for m in METHODS:
            means = [
                np.mean([r[m]["fsc0143"] for r in rows if r["snr"] == snr and r["n"] == n])
                for n in ns
            ]
            ax.plot(ns, means, "o-", label=LABELS[m])
        ax.set_xscale("log")
        ax.set_xlabel("number of particles N")
        ax.set_ylabel("FSC 0.143 vs truth (Å)")
        ax.set_title(f"SNR {snr:g}, {result['box']}³ at {result['pixel_size']} Å/px")
        ax.axhline(2 * result["pixel_size"], color="gray", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(args: argparse.Namespace) -> dict:
    """Cells of side-by-side passes (``--merge NAME ...``) added to ``--name``'s results,
    replacing cells of the same (protein, SNR, N); a pass's large-box run replaces
    ``--name``'s."""
    out = Path(args.out)
    result = load_result(out / f"{args.name}.json")
    others = [load_result(out / f"{other}.json") for other in args.merge]

    def key(r: dict) -> tuple:
        return (r["protein"], r["snr"], r["n"])

    def sort_key(r: dict) -> tuple:
        return (PROTEINS.index(r["protein"]), -r["snr"], r["n"])

    merged = merge_rows(result, others, key, sort_key)
    for other in others:  # a pass's large-box run replaces the result's
        if other.get("large"):
            merged["large"] = other["large"]
        _add_new(merged, "redo_baselines_commands", other.get("redo_baselines_commands", []))
    merged["commands"] = [c for c in merged["commands"] if "--redo-baselines" not in c]
    source = merged.get("redo_prior_from")
    if source and source != args.name and (out / f"{source}.json").is_file():
        # the redone prior entries sit beside the other methods' entries of FROM's passes
        base = load_result(out / f"{source}.json")
        merged["base_commands"] = base.get("commands") or [base.get("command")]
        _add_new(merged, "redo_baselines_commands", base.get("redo_baselines_commands", []))
    if args.timing:
        merged["timing"] = timing_entry(load_result(out / f"{args.timing}.json"), args.timing)
    save_result(merged, out, args.name)
    return merged


def _add_new(result: dict, key: str, commands: list[str]) -> None:
    """Append to ``result[key]`` (created if missing) the ``commands`` it does not hold."""
    held = result.setdefault(key, [])
    held.extend(c for c in commands if c not in held)


def timing_entry(timed: dict, name: str) -> dict:
    """The prior's seconds of a dedicated run (one cell, nothing else on the machine)."""
    if len(timed["rows"]) != 1:
        raise SystemExit(f"{name}: a timing run holds one cell, not {len(timed['rows'])}")
    row = timed["rows"][0]
    return {
        "protein": row["protein"],
        "snr": row["snr"],
        "n": row["n"],
        "seconds": row["prior"]["seconds"],
        "threads": timed["threads"],
        "commit": row["pnp"].get("commit", ""),
        "command": timed.get("command", ""),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default=str(ROOT / "src/cryoprior/assets/priors/volume_native"))
    ap.add_argument("--corpus", default=str(ROOT / "corpus"))
    ap.add_argument("--proteins", nargs="+", default=list(PROTEINS))
    ap.add_argument("--snr", type=float, nargs="+", default=list(SNRS))
    ap.add_argument("--n", type=int, nargs="+", default=list(NS))
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=1.5)
    ap.add_argument("--envelope", type=float, default=60.0, help="image B envelope, Å²")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", default="pigdm_dc")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--n-inner", type=int, default=5)
    ap.add_argument("--pnp-iter", type=int, default=8)
    ap.add_argument("--large", action="store_true", help="also one run at --large-box³")
    ap.add_argument("--large-only", action="store_true", help="only the large-box run")
    ap.add_argument("--large-box", type=int, default=128)
    ap.add_argument("--large-n", type=int, default=3000)
    ap.add_argument("--large-samples", type=int, default=1)
    ap.add_argument("--large-protein", default="protein_A")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="native_reconstruction")
    ap.add_argument("--quick", action="store_true", help="1 protein, SNR 0.1, N 100, 5 steps")
    ap.add_argument(
        "--redo-pnp",
        action="store_true",
        help="recompute only the denoiser-only entries of finished cells made before its "
        "CG was preconditioned (rows without a pnp commit)",
    )
    ap.add_argument(
        "--spectrum",
        default=None,
        help="prior variance of the guidance: protein (the default) or white",
    )
    ap.add_argument(
        "--antithetic",
        action="store_true",
        default=True,
        help="draw the posterior samples in antithetic pairs, an even --samples (the "
        "default, as reconstruct_with_prior's)",
    )
    ap.add_argument(
        "--independent-samples",
        dest="antithetic",
        action="store_false",
        help="draw the posterior samples independently (the grids before antithetic pairs)",
    )
    ap.add_argument(
        "--redo-prior",
        metavar="FROM",
        help="recompute only the prior's entries of FROM's cells (the old ones kept as "
        "prior_white), the other methods copied: the same particles, seeds and grid",
    )
    ap.add_argument(
        "--sim-n",
        type=int,
        help="particles simulated per acquisition (default: the largest --n); cells use "
        "its first N. The simulation's CTFs depend on this number, so a pass that redoes "
        "some methods of another's cells must simulate as many as that pass did",
    )
    ap.add_argument(
        "--redo-baselines",
        action="store_true",
        help="recompute Wiener, reg. LS and denoiser-only of --name's own cells on this "
        "pass's particles (for cells whose prior entry came from a pass with another "
        "--sim-n)",
    )
    ap.add_argument("--merge", nargs="+", help="merge these results into --name and stop")
    ap.add_argument("--timing", help="with --merge: a dedicated one-cell run for the time goal")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.proteins, args.snr, args.n, args.steps, args.samples = ["5pti_A"], [0.1], [100], 5, 2
        args.name = "native_reconstruction_quick"
        args.out = tempfile.mkdtemp(prefix="cryoprior_quick_")
    if args.large_only:
        args.proteins, args.large = [], True
    if args.antithetic and args.samples % 2 and not args.merge:
        raise SystemExit("antithetic pairs need an even --samples: or --independent-samples")
    result = merge(args) if args.merge else run(args)
    print(summarise(result))
    print(f"wrote {Path(args.out) / args.name}.json / .md / .png")


if __name__ == "__main__":
    main()
