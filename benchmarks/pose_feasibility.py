"""Can particles be aligned at all? Global pose search against the TRUE map (issue 18).

Refinement at SNR 0.01 ends with random poses (``refine.md``). This benchmark asks whether
that is the refinement's fault or the data's: the particles of ``refine.py`` (same
simulation: 64² at 1.5 Å/px, CTF + an unrecorded 60 Å² envelope, uniform random poses,
±3 Å origins) are searched globally (``global_search``: 7.5° SO(3) grid, shifts ≤ 6 Å,
normalised correlation, as refinement's global iterations) against references no
refinement could have — the ground truth itself, compared over bands of 8 Å and 15 Å —
and against the truth low-passed to 30 Å (refinement's start). Reported: the fraction of
particles whose best rotation is within 15° of the true one, and the median error. If
the true map cannot align the particles, no reference a refinement builds from them will
(a prior included).

With ``--local`` it also measures the floor of *local* refinement: each particle starts
from its true pose moved by ``--local-start`` degrees about a random axis (and its origin
by 1 Å) and ``refine_local`` (the likelihood score and the coarse-to-fine passes of
refinement's local iterations, here ``--local-steps``) searches around it against the
truth under the images' envelope (the exact noiseless signal of the images) over a
``--local-band`` Å band. Its median rotation error is what this search reaches
when the reference is perfect: a floor for refinement, which runs the same search
against maps built from the particles.

    python benchmarks/pose_feasibility.py                      # protein_A, SNR 0.1/0.03/0.01
    python benchmarks/pose_feasibility.py --proteins 5pti_A 2qdl_A --n 200
    python benchmarks/pose_feasibility.py --proteins protein_A 2qdl_A 3aqg_A --snr 0.1 \
        --no-global --local --n 500 --local-band 6 4 3 --local-estimate best mean \
        --name pose_floor

Writes ``results/pose_feasibility.{json,md}`` (``--name``: another name).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import git_commit, write_results  # noqa: E402

#: (label, band Å of the comparison, low-pass Å of the reference or None for the truth)
REFERENCES = (
    ("truth, 8 Å band", 8.0, None),
    ("truth, 15 Å band", 15.0, None),
    ("truth low-passed to 30 Å", 30.0, 30.0),
)


def run(args: argparse.Namespace) -> dict:
    """Search every (protein, SNR) stack against each reference; one row per search."""
    from native_reconstruction import truth_map
    from refine import simulate

    from cryoprior.data.corpus import load_corpus
    from cryoprior.data.patches import bfactor_blur
    from cryoprior.geometry.rotations import rotation_angle
    from cryoprior.physics.source import ParticleSource
    from cryoprior.solvers.poses import global_search, perturb_poses, refine_local
    from cryoprior.solvers.refine import lowpass, solvent_mask

    torch.set_num_threads(args.threads)
    records = {r.name: r for r in load_corpus(Path(args.corpus), "test")}
    px, box = args.pixel_size, args.box
    mask = solvent_mask(box, px, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryoprior_feas_") as work:
        for name in args.proteins:
            rec = records[name]
            truth = truth_map(rec, box, px).double()
            for snr in args.snr:
                folder = Path(work) / f"{name}_{snr}"
                particles, blind, measured = simulate(
                    rec, truth, px, snr, args.n, args.seed, args.envelope, folder
                )
                batch = next(ParticleSource.from_star(blind).batches(args.n, center=False))
                true_rot = particles.rotation_matrices()[batch.indices].double()
                true_sh = torch.from_numpy(particles.shifts[batch.indices]).double()
                for label, band, lp in REFERENCES if args.global_search else ():
                    ref = truth if lp is None else lowpass(truth, px, lp)
                    t = time.perf_counter()
                    found = global_search(
                        (ref * mask).float(),
                        batch.images,
                        batch.ctf,
                        px,
                        band=band,
                        step_deg=args.step,
                        max_shift=6.0,
                        score="correlation",
                    )
                    err = torch.rad2deg(rotation_angle(found.rotations.double(), true_rot))
                    row = {
                        "protein": name,
                        "n_residues": rec.n_residues,
                        "snr": snr,
                        "snr_measured": measured,
                        "reference": label,
                        "within_15_deg": float((err < 15).double().mean()),
                        "median_deg": float(err.median()),
                        "seconds": time.perf_counter() - t,
                    }
                    rows.append(row)
                    print(
                        f"{name} SNR {snr:g} {label}: {100 * row['within_15_deg']:.0f}% "
                        f"within 15°, median {row['median_deg']:.0f}°",
                        flush=True,
                    )
                local = [(b, e) for b in args.local_band for e in args.local_estimate]
                local = local if args.local else []
                if local:  # one reference and one set of starting poses for every row
                    signal = (bfactor_blur(truth, args.envelope, px) * mask).float()
                    start_rot, start_sh = perturb_poses(
                        true_rot, true_sh, args.local_start, 1.0, seed=args.seed
                    )
                for band, estimate in local:
                    t = time.perf_counter()
                    found = refine_local(
                        signal,
                        batch.images,
                        batch.ctf,
                        px,
                        start_rot,
                        start_sh,
                        band=band,
                        steps_deg=tuple(args.local_steps),
                        max_shift=2 * px,
                        estimate=estimate,
                    )
                    err = torch.rad2deg(rotation_angle(found.rotations.double(), true_rot))
                    moved = (found.shifts.double() - true_sh).norm(dim=-1)
                    label = (
                        f"truth × envelope, local from true poses moved {args.local_start:g}°, "
                        f"{band:g} Å band, steps {'/'.join(f'{s:g}' for s in args.local_steps)}°, "
                        + ("best pose" if estimate == "best" else "posterior-mean pose")
                    )
                    rows.append(
                        {
                            "protein": name,
                            "n_residues": rec.n_residues,
                            "snr": snr,
                            "snr_measured": measured,
                            "reference": label,
                            "search": "local",
                            "within_15_deg": float((err < 15).double().mean()),
                            "median_deg": float(err.median()),
                            "mean_deg": float(err.mean()),
                            "median_shift_angstrom": float(moved.median()),
                            "seconds": time.perf_counter() - t,
                        }
                    )
                    print(
                        f"{name} SNR {snr:g} {label}: median {float(err.median()):.2f}°",
                        flush=True,
                    )
    return {
        "benchmark": "pose_feasibility",
        "rows": rows,
        "n": args.n,
        "step_deg": args.step,
        "box": box,
        "pixel_size": px,
        "envelope_bfactor": args.envelope,
        "seed": args.seed,
        "commit": git_commit(),
        "command": " ".join(["benchmarks/pose_feasibility.py", *sys.argv[1:]]),
    }


def summarise(result: dict) -> str:
    """The Markdown table: one row per (protein, SNR, reference)."""
    has_global = any(r.get("search") != "local" for r in result["rows"])
    searched = (
        f"global search, {result['step_deg']}° SO(3) grid, shifts ≤ 6 Å, normalised "
        "correlation, against the ground truth (an upper bound on what any reference "
        "built from the particles can do) or its 30 Å low-pass (refinement's start). "
        if has_global
        else "local search only (see below). "
    )
    lines = [
        "# Pose search against the true map (issue 18)",
        "",
        f"{result['n']} particles per (protein, SNR), {result['box']}² at "
        f"{result['pixel_size']} Å/px, CTF + unrecorded {result['envelope_bfactor']:g} Å² "
        "envelope, uniform random poses and ±3 Å origins (the simulation of `refine.py`); "
        + searched
        + "s: wall-clock seconds of one search on one thread (as run, beside other jobs). "
        f"Commit {result['commit']}; command: `{result['command']}`.",
        "",
        "| protein | residues | SNR | reference | within 15° | median error (°) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        local = r.get("search") == "local"
        med = f"{r['median_deg']:.2f}" if local else f"{r['median_deg']:.0f}"
        lines.append(
            f"| {r['protein']} | {r['n_residues']} | {r['snr']:g} | {r['reference']} | "
            f"{100 * r['within_15_deg']:.0f}% | {med} | {r['seconds']:.0f} |"
        )
    if any(r.get("search") == "local" for r in result["rows"]):
        lines += [
            "",
            "Local rows: refinement's local search (likelihood, coarse-to-fine passes, "
            "origins ≤ 2 px) against the truth under the images' envelope (the images' "
            "exact noiseless signal) from the true poses moved by the stated "
            "angle about random axes and origins moved by 1 Å: the rotation error this search "
            "reaches with a perfect reference, a floor for refinement (which uses the same "
            "search against maps built from the particles).",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Fraction within 15° against SNR, one line per (protein, reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rows = [r for r in result["rows"] if r.get("search") != "local"]
    if not rows:
        plt.close(fig)
        return
    keys = sorted({(r["protein"], r["reference"]) for r in rows})
    for protein, ref in keys:
        sel = sorted(
            (r for r in rows if (r["protein"], r["reference"]) == (protein, ref)),
            key=lambda r: r["snr"],
        )
        ax.plot(
            [r["snr"] for r in sel],
            [r["within_15_deg"] for r in sel],
            "o-",
            label=f"{protein}: {ref}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("SNR")
    ax.set_ylabel("fraction within 15°")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(ROOT / "corpus"))
    ap.add_argument("--proteins", nargs="+", default=["protein_A"])
    ap.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.03, 0.01])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--step", type=float, default=7.5, help="SO(3) grid step, degrees")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=1.5)
    ap.add_argument("--envelope", type=float, default=60.0, help="image B envelope, Å²")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument(
        "--no-global", dest="global_search", action="store_false", help="skip the global rows"
    )
    ap.add_argument("--local", action="store_true", help="also the local-search floor rows")
    ap.add_argument("--local-band", type=float, nargs="+", default=[4.0], help="Å")
    ap.add_argument("--local-start", type=float, default=5.0, help="degrees from the truth")
    ap.add_argument("--local-steps", type=float, nargs="+", default=[2.0, 1.0, 0.5])
    ap.add_argument(
        "--local-estimate",
        nargs="+",
        default=["best"],
        choices=["best", "mean"],
        help="the local search's pose: best candidate (refinement's) or posterior mean",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="pose_feasibility")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    result = run(args)
    write_results(result, Path(args.out), args.name, summarise, plot)
    print(f"wrote {Path(args.out) / args.name}.json / .md / .png")


if __name__ == "__main__":
    main()
