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

Preferred orientation (--cone; its own pass): per protein one acquisition of
--cone-n images at SNR --cone-snr whose view directions lie within --cone-tilt degrees of
the map's z axis (so the Fourier cone of half-angle 90° − tilt around k_z is never
measured), otherwise simulated as above. Methods: Wiener (``reconstruct_source``, the
cone left at 0), the prior from the particles (``reconstruct_with_prior``: the
particles' likelihood knows which Fourier regions it measured), and the prior from the
two Wiener half maps with the particles' angles (``denoise_half_maps(...,
view_rotations=...)``, as ``cryoprior denoise --angles``). Scored by the directional FSC
inside the missing cone (:func:`cryoprior.metrics.cone_fsc`, same mask), the whole-map
FSC and the masked CC.

Figure (--figure PROTEIN; its own pass): central slices of the truth, the half-map
average, the post-processed map, the prior mean and its spread for the N = --figure-n
cell (the same particles as the table), and, if the cone pass has run, xz slices of the
preferred-orientation maps: denoise_slices.png.

Results are written after every cell (resumable).

    python benchmarks/denoise.py                 # 5 proteins, N 1000/3000/10000
    python benchmarks/denoise.py --cone          # preferred orientation, 5 proteins
    python benchmarks/denoise.py --figure 1fki_A # the slices figure
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

from _common import git_commit, write_results  # noqa: E402
from native_reconstruction import (  # noqa: E402
    PROTEINS,
    SNRS,
    molecular_mask,
    score,
    simulate,
    truth_map,
)

METHODS = ("average", "lowpass", "postprocess", "pnp", "prior")
CONE_METHODS = ("wiener", "prior_particles", "prior_halves")
CONE_LABELS = {
    "wiener": "Wiener",
    "prior_particles": "prior (particles)",
    "prior_halves": "prior (half maps + angles)",
}
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


def pnp_entry(prior, h1, h2, truth, px, mass, sphere) -> dict:
    """The denoiser-only baseline (plug-and-play with the half-map likelihood), scored."""
    from cryoprior.solvers.denoise import map_intensity_scale
    from cryoprior.solvers.halfmap import HalfMapLikelihood, half_map_noise
    from cryoprior.solvers.map_baselines import plug_and_play

    t = time.perf_counter()
    noise = half_map_noise(h1, h2, px)
    average = (h1 + h2) / 2
    scale = map_intensity_scale(average, px, mass).value
    op = HalfMapLikelihood(average, noise)
    pnp = plug_and_play(prior, op, op.measurement(torch.float32), 1.0, scale, n_iter=8)
    return score(pnp.map, truth, px, sphere) | {
        "seconds": time.perf_counter() - t,
        "commit": git_commit(),
    }


def run_cell(prior, h1, h2, truth, truth_b, px, mass, masks, args) -> dict:
    """Every method on one pair of half maps."""
    from cryoprior.metrics import spread_calibration
    from cryoprior.solvers.denoise import denoise_half_maps
    from cryoprior.solvers.halfmap import half_map_noise
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
    row["pnp"] = pnp_entry(prior, h1, h2, truth, px, mass, sphere)
    post = denoise_half_maps(
        h1,
        h2,
        px,
        prior,
        mass_kda=mass,
        n_steps=args.steps,
        n_samples=args.samples,
        spectrum=args.spectrum,
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
    pnp_commits = sorted({r["pnp"]["commit"] for r in rows if r["pnp"].get("commit")})
    lines = [
        "# Half-map denoising (issue 17)",
        "",
        f"64³ at {result['pixel_size']} Å/px; half maps from N particles at SNR "
        f"{result['snr']} (CTF, {result['envelope_bfactor']:g} Å² image envelope); "
        f"prior: {result['guidance']} ({result.get('spectrum', 'white')} r_t²), "
        f"{result['steps']} DDIM steps, mean of "
        f"{result['samples']} samples; mask: {result['mask']}. FSC vs the truth (Å), "
        "mean ± std over proteins (n = proteins in the cell)."
        + (
            " Denoiser-only entries recomputed with the preconditioned data-consistency "
            f"solves (commit {', '.join(pnp_commits)}): `{result['pnp_redo_command']}`."
            if pnp_commits and result.get("pnp_redo_command")
            else ""
        ),
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
            lines.append(f"- {name}: {v['power_ratio']:.2g} ({v['seconds']:.0f} s)")
    cal = [r["prior"]["calibration"] for r in rows if "calibration" in r["prior"]]
    if cal:
        lines += [
            "",
            "Spread calibration of the prior's samples (fraction of voxels in the sphere with "
            "|truth_B − mean| ≤ 2·std, truth_B the truth under the images' envelope): "
            f"{np.mean([c['voxels_sphere'] for c in cal]):.2f} on average, "
            f"{np.mean([c['voxels_molecule'] for c in cal]):.2f} in the molecule; "
            f"calibrated: {cal[0]['expected']:.2f}.",
        ]
    if (RESULTS / "denoise_slices.png").is_file():
        lines += ["", "Slices of one protein's maps: `denoise_slices.png`."]
    lines += cone_summary(result.get("cone") or {})
    lines += ["", f"Command: `{result['command']}`", ""]
    for key in ("cone_command", "figure_command"):
        if result.get(key):
            lines += [f"{key.split('_')[0].capitalize()} pass: `{result[key]}`", ""]
    return "\n".join(lines)


def cone_summary(cone: dict) -> list[str]:
    """Markdown lines for the preferred-orientation pass."""
    rows = cone.get("rows") or []
    if not rows:
        return []
    lines = [
        "",
        f"Preferred orientation: {cone['n']} particles at SNR {cone['snr']}, views within "
        f"{cone['max_tilt']:g}° of z (a missing cone of half-angle {cone['cone_half_angle']:g}° "
        "around k_z); FSC₀.₁₄₃ inside that cone (directional FSC) and over the whole "
        "spectrum vs the truth, Å (96 = never above 0.143), masked CC:",
        "",
        "| protein | measured fraction | "
        + " | ".join(f"{CONE_LABELS[m]} cone / all / CC" for m in CONE_METHODS)
        + " | Wiener ÷ prior (cone) | prior s |",
        "|" + "---|" * (len(CONE_METHODS) + 4),
    ]
    for r in rows:
        cells = [
            f"{r[m]['cone_fsc0143']:.2f} / {r[m]['fsc0143']:.2f} / {r[m]['cc']:.3f}"
            for m in CONE_METHODS
        ]
        ratio = r["wiener"]["cone_fsc0143"] / r["prior_particles"]["cone_fsc0143"]
        lines.append(
            f"| {r['protein']} | {r['measured_fraction']:.3f} | "
            + " | ".join(cells)
            + f" | {ratio:.2f}× | {r['prior_particles']['seconds']:.0f} |"
        )
    if len(rows) > 1:
        mean = {m: np.mean([r[m]["cone_fsc0143"] for r in rows]) for m in CONE_METHODS}
        lines += [
            "",
            "Mean cone FSC₀.₁₄₃: "
            + ", ".join(f"{CONE_LABELS[m]} {v:.2f} Å" for m, v in mean.items())
            + f"; Wiener ÷ prior (particles) {mean['wiener'] / mean['prior_particles']:.2f}×"
            + f", ÷ prior (half maps) {mean['wiener'] / mean['prior_halves']:.2f}×.",
        ]
    return lines


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
    write_results(result, out, name, summarise, plot)


def run(args: argparse.Namespace) -> dict:
    from cryoprior.data.patches import bfactor_blur
    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.physics.source import ParticleSource
    from cryoprior.solvers.backprojection import reconstruct_source
    from cryoprior.solvers.denoise import map_intensity_scale
    from cryoprior.solvers.halfmap import half_map_noise

    out, result, prior, records, sphere = _load(args)
    box, px, snr = args.box, args.pixel_size, args.snr
    settings = describe(args)
    if args.redo_pnp:  # the main pass's command stays; the redo's is recorded beside it
        settings.pop("command")
    result.update(settings)
    done = {(r["protein"], r["n"]) for r in result["rows"]}
    stale = {}
    if args.redo_pnp:  # only the finished cells' denoiser-only entries, from older code
        stale = {(r["protein"], r["n"]): r for r in result["rows"] if not r["pnp"].get("commit")}
        done -= set(stale)
        result["pnp_redo_command"] = " ".join(sys.argv)
        args.noise_only = False
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
                if n in todo and args.redo_pnp:
                    row = stale[(name, n)]
                    row["pnp"] = pnp_entry(prior, h1, h2, truth, px, mass, sphere)
                    save(result, out, args.name)
                    print(f"{name} N {n}: denoiser only {row['pnp']['fsc0143']:.2f} Å", flush=True)
                elif n in todo:
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


def describe(args: argparse.Namespace) -> dict:
    """The main pass's settings, as recorded in the result."""
    return dict(
        benchmark="denoise",
        prior=str(args.prior),
        box=args.box,
        pixel_size=args.pixel_size,
        snr=args.snr,
        envelope_bfactor=args.envelope,
        guidance="pigdm_dc",
        spectrum=args.spectrum,
        steps=args.steps,
        samples=args.samples,
        threads=args.threads,
        machine=platform.platform(),
        mask="soft sphere, radius 0.4 box, 3 px cosine edge",
        command=" ".join(sys.argv),
    )


def _load(args: argparse.Namespace):
    """(out folder, result so far, prior, test records, soft sphere mask)."""
    from cryoprior.data.corpus import load_corpus
    from cryoprior.metrics import spherical_mask
    from cryoprior.priors import load_prior

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": [], "noise_only": {}}
    for key, value in describe(args).items():
        result.setdefault(key, value)
    prior = load_prior(args.prior)
    records = {r.name: r for r in load_corpus(Path(args.corpus), "test")}
    train = set(prior.metadata.data.get("split", {}).get("train", []))
    assert not train & set(args.proteins), "a test protein is in the prior's training"
    box = args.box
    sphere = spherical_mask((box,) * 3, 0.4 * box, soft_edge_px=3.0).double()
    return out, result, prior, records, sphere


def cone_scores(volume, truth, px, sphere, half_angle: float) -> dict:
    """:func:`score` plus the FSC inside the cone of ``half_angle`` (radians) around k_z."""
    from cryoprior.metrics import cone_fsc

    f = cone_fsc(volume.double(), truth.double(), px, half_angle, axis=0, mask=sphere)
    return score(volume, truth, px, sphere) | {
        "cone_fsc0143": float(f.resolution_0143),
        "cone_fsc05": float(f.resolution_05),
        "cone_fsc_curve": [round(float(v), 4) for v in f.fsc],
    }


def run_cone(args: argparse.Namespace) -> dict:
    """The preferred-orientation pass (see the module docstring)."""
    import math

    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.solvers.backprojection import reconstruct_source
    from cryoprior.solvers.denoise import denoise_half_maps
    from cryoprior.solvers.prior_reconstruction import (
        accumulate_particles,
        intensity_scale,
        prior_grid_plan,
        reconstruct_with_prior,
    )

    out, result, prior, records, sphere = _load(args)
    px, half_angle = args.pixel_size, math.radians(90.0 - args.cone_tilt)
    cone = result.get("cone") or {"rows": []}
    cone.update(
        n=args.cone_n,
        snr=args.cone_snr,
        max_tilt=args.cone_tilt,
        cone_half_angle=90.0 - args.cone_tilt,
        steps=args.steps,
        samples=args.samples,
        guidance="pigdm_dc",
    )
    result["cone"] = cone
    result["cone_command"] = " ".join(sys.argv)
    done = {r["protein"] for r in cone["rows"]}
    work = Path(tempfile.mkdtemp(prefix="cryoprior_cone_"))
    try:
        for name in args.proteins:
            if name in done:
                continue
            rec = records[name]
            truth = truth_map(rec, args.box, px).double()
            mass = protein_mass_kda(rec.sequence)
            seed = 1000 * PROTEINS.index(name) + 500
            source, measured_snr = simulate(
                rec,
                truth,
                px,
                args.cone_snr,
                args.cone_n,
                seed,
                args.envelope,
                work / name,
                max_tilt=args.cone_tilt,
            )
            row = {"protein": name, "n_residues": rec.n_residues, "snr_measured": measured_snr}
            t = time.perf_counter()
            wiener = reconstruct_source(source, ssnr="fsc", seed=0)
            row["wiener"] = cone_scores(wiener.full, truth, px, sphere, half_angle) | {
                "seconds": time.perf_counter() - t
            }
            t = time.perf_counter()
            plan = prior_grid_plan(prior, source.box, source.pixel_size)
            data = accumulate_particles(source, plan.target_box, plan.target_pixel_size, plan=plan)
            scale = intensity_scale(data, mass_kda=mass).value
            post = reconstruct_with_prior(
                source,
                prior,
                intensity=scale,
                n_steps=args.steps,
                n_samples=args.samples,
                guidance="pigdm_dc",
                data=data,
                seed=0,
            )
            mean, _, _ = post.on_particle_grid()
            row["prior_particles"] = cone_scores(mean, truth, px, sphere, half_angle) | {
                "seconds": time.perf_counter() - t
            }
            views = source.particles.rotation_matrices()
            den = denoise_half_maps(
                wiener.half1.double(),
                wiener.half2.double(),
                px,
                prior,
                mass_kda=mass,
                view_rotations=views,
                n_steps=args.steps,
                n_samples=args.samples,
            )
            row["prior_halves"] = cone_scores(den.mean, truth, px, sphere, half_angle) | {
                "seconds": den.seconds["total"]
            }
            row["measured_fraction"] = den.measured_fraction
            cone["rows"].append(row)
            save(result, out, args.name)
            if name == (args.figure or args.proteins[0]):  # central xz slices, for the figure
                c = args.box // 2
                np.savez_compressed(
                    out / "denoise_cone_slices.npz",
                    protein=name,
                    truth=truth[:, c].float().numpy(),
                    wiener=wiener.full[:, c].float().numpy(),
                    prior=mean[:, c].float().numpy(),
                )
            print(
                f"cone {name}: "
                + ", ".join(
                    f"{CONE_LABELS[m]} cone {row[m]['cone_fsc0143']:.2f} Å "
                    f"(all {row[m]['fsc0143']:.2f} Å)"
                    for m in CONE_METHODS
                ),
                flush=True,
            )
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def run_figure(args: argparse.Namespace) -> None:
    """Slices of one protein's maps (see the module docstring): denoise_slices.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.physics.source import ParticleSource
    from cryoprior.solvers.backprojection import reconstruct_source
    from cryoprior.solvers.denoise import denoise_half_maps
    from cryoprior.solvers.halfmap import half_map_noise
    from cryoprior.solvers.postprocess import fsc_weighted_sharpened

    out, result, prior, records, _ = _load(args)
    name, px, n = args.figure, args.pixel_size, args.figure_n
    rec = records[name]
    truth = truth_map(rec, args.box, px).double()
    seed = 1000 * PROTEINS.index(name) + (SNRS.index(args.snr) if args.snr in SNRS else 7)
    work = Path(tempfile.mkdtemp(prefix="cryoprior_fig_"))
    try:
        full, _ = simulate(rec, truth, px, args.snr, max(args.n), seed, args.envelope, work)
        first = ParticleSource(full.particles.subset(np.arange(n)))
        halves = reconstruct_source(first, ssnr="fsc", seed=0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    h1, h2 = halves.half1.double(), halves.half2.double()
    average = (h1 + h2) / 2
    sharp = fsc_weighted_sharpened(average, half_map_noise(h1, h2, px)).map
    post = denoise_half_maps(
        h1,
        h2,
        px,
        prior,
        mass_kda=protein_mass_kda(rec.sequence),
        n_steps=args.steps,
        n_samples=args.samples,
    )
    panels = [
        ("truth", truth),
        ("half-map average", average),
        ("postprocess (sharpened)", sharp),
        ("prior mean", post.mean),
        ("prior spread (std)", post.std),
    ]
    cone_file = out / "denoise_cone_slices.npz"
    cone = dict(np.load(cone_file)) if cone_file.is_file() else None
    rows = 3 if cone is None else 4
    fig, axes = plt.subplots(rows, 5, figsize=(12, 2.5 * rows))
    c = args.box // 2
    for j, (title, vol) in enumerate(panels):
        for i, (label, sl) in enumerate((("z", vol[c]), ("y", vol[:, c]), ("x", vol[:, :, c]))):
            ax = axes[i, j]
            ax.imshow(sl.float().numpy(), cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"central {label} slice", fontsize=8)
    if cone is not None:
        who = str(cone["protein"])
        cone_panels = [(f"{who} truth", "truth"), ("Wiener, cone missing", "wiener")]
        cone_panels.append(("prior mean, cone missing", "prior"))
        for j in range(5):
            axes[3, j].axis("off")
        for j, (title, key) in enumerate(cone_panels):
            ax = axes[3, j]
            ax.axis("on")
            ax.imshow(cone[key], cmap="gray", origin="lower")
            ax.set_title(title + " (xz)", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"{name}: half maps from {n} particles, SNR {args.snr} (64³, {px} Å/px)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out / "denoise_slices.png", dpi=110)
    plt.close(fig)
    result["figure_command"] = " ".join(sys.argv)
    save(result, out, args.name)


def render(args: argparse.Namespace) -> None:
    """Merge ``NAME_cone.json``'s cone pass into ``NAME.json`` and rewrite the outputs."""
    out = Path(args.out)
    result = json.loads((out / f"{args.name}.json").read_text())
    cone_path = out / f"{args.name}_cone.json"
    if cone_path.is_file():
        cone = json.loads(cone_path.read_text())
        result["cone"] = cone.get("cone")
        result["cone_command"] = cone.get("cone_command")
    fig_path = out / f"{args.name}_fig.json"
    if fig_path.is_file():
        result["figure_command"] = json.loads(fig_path.read_text()).get("figure_command")
    save(result, out, args.name)


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
    ap.add_argument(
        "--spectrum",
        default="white",
        choices=("white", "protein"),
        help="prior variance of the guidance (cryoprior denoise --prior-spectrum)",
    )
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--no-noise-only", dest="noise_only", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="denoise")
    ap.add_argument("--cone", action="store_true", help="the preferred-orientation pass")
    ap.add_argument("--cone-n", type=int, default=3000)
    ap.add_argument("--cone-snr", type=float, default=0.1)
    ap.add_argument("--cone-tilt", type=float, default=60.0, help="max view tilt, degrees")
    ap.add_argument("--figure", default=None, help="protein of the slices figure pass")
    ap.add_argument("--figure-n", type=int, default=3000)
    ap.add_argument(
        "--render",
        action="store_true",
        help="rewrite NAME.md/.png from NAME.json, with the cone pass of NAME_cone.json "
        "and the figure pass of NAME_fig.json (passes run beside the main pass under "
        "--name NAME_cone / NAME_fig)",
    )
    ap.add_argument("--quick", action="store_true", help="1 protein, N 1000, 5 steps")
    ap.add_argument(
        "--redo-pnp",
        action="store_true",
        help="recompute only the denoiser-only entries of finished cells made before its "
        "CG was preconditioned (rows without a pnp commit)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.proteins, args.n, args.steps, args.samples = ["1fki_A"], [1000], 5, 2
        args.name = args.name + "_quick"
    if args.render:
        render(args)
    elif args.cone:
        run_cone(args)
    elif args.figure:
        run_figure(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
