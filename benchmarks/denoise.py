"""Half-map denoising benchmark (issue 17): the prior's posterior mean vs post-processing.

Proteins: the 5 corpus TEST chains of benchmarks/native_reconstruction.py (never in the
prior's training split, checked). Ground truth: the atoms_to_map potential at 64³ and
1.5 Å/px, centred on the atoms' centroid.

Half maps, per protein: one acquisition of max(--n) images at SNR 0.03 (the same
simulation and seed as the native reconstruction benchmark: CTF, defocus 1–2.5 µm, a
60 Å² B-factor envelope on the images that the STAR file does not record, white noise at
the stated SNR); for each N the first N images' two half maps from
``reconstruct_source`` (Wiener with per-shell SSNR from their FSC; what RELION's refine
writes). Every method sees only the two half maps (and the molecule's mass, for the
prior's intensity unit):

  average      (h₁ + h₂)/2, unfiltered;
  lowpass      the average low-passed at the half maps' FSC 0.143 (2-shell cosine edge);
  postprocess  RELION-postprocess style: √(2·FSC/(1+FSC)) weights, sharpened by the
               Guinier B fitted between 10 Å and the FSC 0.143 resolution, low-passed;
  pnp          the prior's network as a plain denoiser between data-consistency solves
               of the half-map likelihood (denoiser-only baseline);
  prior        ``denoise_half_maps``: diffusion posterior sampling with the half-map
               likelihood (pigdm_dc, 20 DDIM steps), the mean of --samples samples.

Metrics vs the ground truth on the 64³ grid: FSC 0.143 and 0.5 (Å) and masked CC inside
a soft sphere of radius 0.4 box (3 px cosine edge); seconds per map; for the prior the
spread calibration against the truth with the images' envelope. Noise only
(--noise-only, on by default): two halves of pure coloured noise with the noise
spectrum of the protein's N = max(--n) halves, denoised with that cell's intensity scale
(their integral is 0, so the mass cannot set it); reported: the output's power inside
the molecular mask relative to the true protein map's there.

Results are written after every cell (resumable). Not measured here yet: the missing-cone
(preferred orientation) part of issue 17.

    python benchmarks/denoise.py                 # 5 proteins, N 1000/3000/10000
    python benchmarks/denoise.py --quick         # 1 protein, N 1000, 5 steps
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

from native_reconstruction import (  # noqa: E402
    PROTEINS,
    SNRS,
    molecular_mask,
    score,
    simulate,
    truth_map,
)

METHODS = ("average", "lowpass", "postprocess", "pnp", "prior")
LABELS = {
    "average": "half-map average",
    "lowpass": "FSC low-pass",
    "postprocess": "postprocess (sharpened)",
    "pnp": "denoiser only",
    "prior": "prior mean",
}


def _coloured_noise(power: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A real Gaussian field whose orthonormal spectrum has E|N(k)|² = power[shell]."""
    k = torch.fft.fftfreq(size, dtype=torch.float64) * size
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shells = torch.round(r).long().clamp_max(power.numel() - 1)
    w = torch.randn(size, size, size, generator=gen, dtype=torch.float64)
    spec = torch.fft.fftn(w, norm="ortho") * torch.sqrt(power[shells])
    return torch.fft.ifftn(spec, norm="ortho").real


def run_cell(prior, h1, h2, truth, truth_b, px, mass, masks, args) -> dict:
    """Every method on one pair of half maps."""
    from cryoprior.metrics import spread_calibration
    from cryoprior.solvers.denoise import denoise_half_maps, map_intensity_scale
    from cryoprior.solvers.halfmap import HalfMapLikelihood, half_map_noise
    from cryoprior.solvers.map_baselines import plug_and_play
    from cryoprior.solvers.postprocess import fsc_lowpass, fsc_weighted_sharpened

    sphere, molecule = masks
    row: dict = {}
    t = time.perf_counter()
    noise = half_map_noise(h1, h2, px)
    average = (h1 + h2) / 2
    row["halves_fsc0143"] = noise.resolution(0.143)
    row["average"] = score(average, truth, px, sphere) | {"seconds": 0.0}
    row["lowpass"] = score(fsc_lowpass(average, noise), truth, px, sphere) | {
        "seconds": time.perf_counter() - t
    }
    t = time.perf_counter()
    sharp = fsc_weighted_sharpened(average, noise)
    row["postprocess"] = score(sharp.map, truth, px, sphere) | {
        "seconds": time.perf_counter() - t,
        "bfactor": sharp.bfactor,
    }
    scale = map_intensity_scale(average, px, mass).value
    t = time.perf_counter()
    op = HalfMapLikelihood(average, noise)
    pnp = plug_and_play(prior, op, op.measurement(torch.float32), 1.0, scale, n_iter=8)
    row["pnp"] = score(pnp.map, truth, px, sphere) | {"seconds": time.perf_counter() - t}
    post = denoise_half_maps(
        h1, h2, px, prior, mass_kda=mass, n_steps=args.steps, n_samples=args.samples
    )
    row["prior"] = score(post.mean, truth, px, sphere) | {
        "seconds": post.seconds["total"],
        "intensity_scale": post.scale.value,
    }
    if args.samples > 1:
        cal = spread_calibration(truth_b, post.samples, sphere, px)
        cal_m = spread_calibration(truth_b, post.samples, molecule, px)
        row["prior"]["calibration"] = {
            "voxels_sphere": cal["voxels"],
            "voxels_molecule": cal_m["voxels"],
            "expected": cal["expected"],
        }
    return row


def noise_only(prior, noise, scale, truth, px, molecule, args, seed: int) -> dict:
    """Denoise two pure-noise halves with the spectrum of ``noise``; masked power ratio."""
    from cryoprior.solvers.denoise import denoise_half_maps

    gen = torch.Generator().manual_seed(seed)
    size = truth.shape[-1]
    n1 = _coloured_noise(2 * noise.noise_power, size, gen)
    n2 = _coloured_noise(2 * noise.noise_power, size, gen)
    post = denoise_half_maps(
        n1, n2, px, prior, intensity=scale, n_steps=args.steps, n_samples=args.samples
    )
    power = float((post.mean**2 * molecule).sum())
    ref = float((truth**2 * molecule).sum())
    return {"power_ratio": power / ref, "seconds": post.seconds["total"]}


def summarise(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Half-map denoising (issue 17)",
        "",
        f"64³ at {result['pixel_size']} Å/px; half maps from N particles at SNR "
        f"{result['snr']} (CTF, {result['envelope_bfactor']:g} Å² image envelope); "
        f"prior: {result['guidance']}, {result['steps']} DDIM steps, mean of "
        f"{result['samples']} samples; mask: {result['mask']}. FSC vs the truth (Å), "
        "mean ± std over proteins (n = proteins in the cell).",
        "",
        "| N | n | halves FSC₀.₁₄₃ | "
        + " | ".join(f"{LABELS[m]} FSC₀.₁₄₃ / FSC₀.₅ / CC" for m in METHODS)
        + " | prior ÷ postprocess | prior s |",
        "|" + "---|" * (len(METHODS) + 5),
    ]
    for n in sorted({r["n"] for r in rows}):
        sel = [r for r in rows if r["n"] == n]

        def ms(key: str, sub: str, rs=sel) -> str:
            v = np.array([r[key][sub] for r in rs])
            return f"{v.mean():.2f} ± {v.std():.2f}"

        halves = np.array([r["halves_fsc0143"] for r in sel])
        ratio = np.array([r["postprocess"]["fsc0143"] / r["prior"]["fsc0143"] for r in sel])
        secs = np.mean([r["prior"]["seconds"] for r in sel])
        cells = [f"{ms(m, 'fsc0143')} / {ms(m, 'fsc05')} / {ms(m, 'cc')}" for m in METHODS]
        lines.append(
            f"| {n} | {len(sel)} | {halves.mean():.2f} | "
            + " | ".join(cells)
            + f" | {ratio.mean():.2f}× (min {ratio.min():.2f}×) | {secs:.0f} |"
        )
    lines += ["", "Per protein (FSC₀.₁₄₃, Å):", ""]
    lines.append("| protein | N | " + " | ".join(LABELS[m] for m in METHODS) + " |")
    lines.append("|" + "---|" * (len(METHODS) + 2))
    for r in rows:
        lines.append(
            f"| {r['protein']} | {r['n']} | "
            + " | ".join(f"{r[m]['fsc0143']:.2f}" for m in METHODS)
            + " |"
        )
    if result.get("noise_only"):
        lines += [
            "",
            "Noise-only halves: output power inside the molecular mask ÷ the "
            "true protein map's (goal ≤ 0.10):",
            "",
        ]
        for name, v in result["noise_only"].items():
            lines.append(f"- {name}: {v['power_ratio']:.3f} ({v['seconds']:.0f} s)")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ns = sorted({r["n"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        ys = [np.mean([r[m]["fsc0143"] for r in rows if r["n"] == n]) for n in ns]
        ax.plot(ns, ys, marker="o", label=LABELS[m])
    ax.set_xscale("log")
    ax.set_xlabel("particles")
    ax.set_ylabel("FSC 0.143 vs truth (Å), mean over proteins")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(result: dict, out: Path, name: str) -> None:
    from cryoprior.core.files import write_text_atomic

    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=1))
    write_text_atomic(out / f"{name}.md", summarise(result))
    if result["rows"]:
        plot(result, out / f"{name}.png")


def run(args: argparse.Namespace) -> dict:
    from cryoprior.data.corpus import load_corpus
    from cryoprior.data.patches import bfactor_blur
    from cryoprior.metrics import spherical_mask
    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.physics.source import ParticleSource
    from cryoprior.priors import load_prior
    from cryoprior.solvers.backprojection import reconstruct_source
    from cryoprior.solvers.denoise import map_intensity_scale
    from cryoprior.solvers.halfmap import half_map_noise

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": [], "noise_only": {}}
    prior = load_prior(args.prior)
    records = {r.name: r for r in load_corpus(Path(args.corpus), "test")}
    train = set(prior.metadata.data.get("split", {}).get("train", []))
    assert not train & set(args.proteins), "a test protein is in the prior's training"
    box, px, snr = args.box, args.pixel_size, args.snr
    sphere = spherical_mask((box,) * 3, 0.4 * box, soft_edge_px=3.0).double()
    result.update(
        benchmark="denoise",
        prior=str(args.prior),
        box=box,
        pixel_size=px,
        snr=snr,
        envelope_bfactor=args.envelope,
        guidance="pigdm_dc",
        steps=args.steps,
        samples=args.samples,
        threads=args.threads,
        machine=platform.platform(),
        mask="soft sphere, radius 0.4 box, 3 px cosine edge",
        command=" ".join(sys.argv),
    )
    done = {(r["protein"], r["n"]) for r in result["rows"]}
    work = Path(tempfile.mkdtemp(prefix="cryoprior_denoise_"))
    try:
        for name in args.proteins:
            todo = [n for n in args.n if (name, n) not in done]
            want_noise = args.noise_only and name not in result["noise_only"]
            if not todo and not want_noise:
                continue
            rec = records[name]
            truth = truth_map(rec, box, px).double()
            truth_b = bfactor_blur(truth, args.envelope, px)
            molecule = molecular_mask(truth)
            mass = protein_mass_kda(rec.sequence)
            seed = 1000 * PROTEINS.index(name) + (SNRS.index(snr) if snr in SNRS else 7)
            full, _ = simulate(rec, truth, px, snr, max(args.n), seed, args.envelope, work / name)
            for n in sorted(set(todo) | ({max(args.n)} if want_noise else set())):
                source = ParticleSource(full.particles.subset(np.arange(n)))
                rec_n = reconstruct_source(source, ssnr="fsc", seed=0)
                h1, h2 = rec_n.half1.double(), rec_n.half2.double()
                if n in todo:
                    row = {"protein": name, "n_residues": rec.n_residues, "n": n}
                    row |= run_cell(
                        prior, h1, h2, truth, truth_b, px, mass, (sphere, molecule), args
                    )
                    result["rows"].append(row)
                    save(result, out, args.name)
                    print(
                        f"{name} N {n}: "
                        + ", ".join(f"{LABELS[m]} {row[m]['fsc0143']:.2f} Å" for m in METHODS),
                        flush=True,
                    )
                if want_noise and n == max(args.n):
                    noise = half_map_noise(h1, h2, px)
                    scale = map_intensity_scale((h1 + h2) / 2, px, mass).value
                    result["noise_only"][name] = noise_only(
                        prior, noise, scale, truth, px, molecule, args, seed + 17
                    )
                    save(result, out, args.name)
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default=str(ROOT / "src/cryoprior/assets/priors/volume_native"))
    ap.add_argument("--corpus", default=str(ROOT / "corpus"))
    ap.add_argument("--proteins", nargs="+", default=list(PROTEINS))
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--snr", type=float, default=0.03)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=1.5)
    ap.add_argument("--envelope", type=float, default=60.0, help="image B envelope, Å²")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--no-noise-only", dest="noise_only", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="denoise")
    ap.add_argument("--quick", action="store_true", help="1 protein, N 1000, 5 steps")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.proteins, args.n, args.steps, args.samples = ["1fki_A"], [1000], 5, 2
        args.name = args.name + "_quick"
    run(args)


if __name__ == "__main__":
    main()
