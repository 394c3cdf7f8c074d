"""Benchmark: diffusion super-resolution (SR3) of particle images and density maps (issue 7).

On proteins never seen in training (the test chains recorded in the priors' prior.json;
corpus split by sequence identity), for factors 2 and 4 (--factors):

- 2-D: clean projections of each test protein's map (the training images' construction,
  ``cryoprior.train.config.render_projections``: 32² at 3 Å/px, random orientations drawn
  from a fixed evaluation seed); scored by PSNR (dB; peak = the true image's range) and
  SSIM (Wang et al. 2004, 11-px Gaussian window) against the true image;
- 3-D: each test protein's map in random orientations (``MapDataset``, 32³ at 3 Å/px);
  scored by the FSC₀.₁₄₃ resolution (Å; first crossing below 0.143; 6 Å is the Nyquist
  limit of the output) and the Pearson correlation inside a soft spherical mask (radius
  0.45 box, 3 px cosine edge; the mask uses no knowledge of the truth), both against the
  true map.

The low-resolution inputs are made from the truth exactly as in training
(``cryoprior.train.objectives.sr_degrade``: the SR3 prior's blur / Fourier cropping / noise
settings). Methods: Fourier zero-padding ("sinc") upsampling; bi/trilinear upsampling; the
regression U-Net (same network and pairs, L2) as is and with the data-consistency
projection; SR3: the mean of --samples DDIM samples (--steps steps, --consistency, default
"final": the output's low frequencies are the input's) and, for reference, one sample.
Mean ± standard error over items. Also for every method: the power of the estimate at
the frequencies the input lacks over the truth's there (``detail_power_ratio``; 1 = the
true amount of detail, < 1 over-smoothed), which FSC and correlation do not measure.
Goal of issue 7: SR3 better than Fourier upsampling on every figure (PSNR, SSIM, FSC,
correlation), and better than the regression U-Net on FSC at factor 4. --partial-means k
adds rows for the mean of the first k samples (the same draws), to show how the mean's
figures depend on the number of samples.

Writes superres.json, superres.md, superres_examples.png (low-res / Fourier / regression
/ SR3 / truth for one held-out protein, images and central map slices) and
superres_fsc.png (mean FSC curves) into --out (default benchmarks/results).

    python benchmarks/superres.py                         # full run, shipped priors
    python benchmarks/superres.py --quick --sr3-images runs/sr3_images/prior \\
        --regression-images runs/regression_images/prior --sr3-maps runs/sr3_maps/prior \\
        --regression-maps runs/regression_maps/prior --out /tmp/superres   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cryoprior
from cryoprior import __version__
from cryoprior.metrics.correlation import masked_correlation
from cryoprior.metrics.fsc import fsc, spherical_mask
from cryoprior.metrics.images import psnr, ssim
from cryoprior.physics.degrade import fourier_upsample, linear_upsample
from cryoprior.priors import load_prior
from cryoprior.train.objectives import sr_degrade, super_resolve

RESULTS = Path(__file__).resolve().parent / "results"
ASSETS = Path(cryoprior.__file__).resolve().parent / "assets" / "priors"
FACTORS = (2, 4)
EVAL_SEED = 777  # test orientations and the degradation noise (if any)
METHODS = ("fourier", "linear", "regression", "regression+dc", "sr3-1", "sr3")
LABELS = {
    "fourier": "Fourier (sinc) upsampling",
    "linear": "bi/trilinear",
    "regression": "regression U-Net",
    "regression+dc": "regression U-Net + DC",
    "sr3-1": "SR3, one sample",
    "sr3": "SR3, mean of samples",
}


def sr3_methods(args: argparse.Namespace) -> list[str]:
    """METHODS with a "mean of the first k samples" row for each --partial-means k."""
    extra = [f"sr3-{k}" for k in args.partial_means]
    return [*METHODS[:-1], *extra, METHODS[-1]]


def label(method: str) -> str:
    """Table label of a method key (``sr3-k``: the mean of the first k SR3 samples)."""
    if method in LABELS:
        return LABELS[method]
    return f"SR3, mean of {method.split('-')[1]} samples"


# ----------------------------------------------------------------------------- data


def test_records(prior: Any, corpus: str, max_proteins: int | None) -> list:
    from cryoprior.data.corpus import load_corpus, shipped_folder

    names = set(prior.metadata.data.get("split", {}).get("test", []))
    folder = Path(corpus) if corpus else shipped_folder()
    records = [r for r in load_corpus(folder) if r.name in names]
    if not records:
        raise SystemExit(f"none of the prior's test proteins are in the corpus {folder}")
    return records[:max_proteins]


def _bfactor(prior: Any) -> float | str:
    return prior.metadata.data.get("summary", {}).get("bfactor", "auto")


def test_images(prior: Any, records: list, per_protein: int) -> tuple[torch.Tensor, list[str]]:
    """True projections (n, box, box) in Å^-1 of the test proteins that fit the box."""
    from cryoprior.data.volumes import MapDataset
    from cryoprior.train.config import render_projections

    box = prior.metadata.spatial_shape[0]
    maps = MapDataset(
        records,
        box,
        prior.pixel_size,
        rotations="none",
        bfactor=_bfactor(prior),
        scale=1.0,
        on_oversize="skip",
    )
    images = render_projections(maps, per_protein, EVAL_SEED)[:, 0]
    names = [f"{n}#{k}" for n in maps.names for k in range(per_protein)]
    return images.double(), names


def test_maps(prior: Any, records: list, per_protein: int) -> tuple[list[torch.Tensor], list[str]]:
    """True maps (box³, Å^-2) of the test proteins in random orientations."""
    from cryoprior.data.volumes import MapDataset

    box = prior.metadata.spatial_shape[0]
    ds = MapDataset(
        records,
        box,
        prior.pixel_size,
        rotations="random",
        n_per_structure=per_protein,
        seed=EVAL_SEED,
        bfactor=_bfactor(prior),
        scale=1.0,
        on_oversize="skip",
    )
    maps = [ds.render(i).double() for i in range(len(ds))]
    names = [f"{n}#{k}" for n in ds.names for k in range(per_protein)]
    return maps, names


# ----------------------------------------------------------------------------- methods


def upsampled(
    method: str,
    low: torch.Tensor,
    factor: int,
    px_low: float,
    priors: dict[str, Any],
    args: argparse.Namespace,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """{method: estimate} at the high-resolution grid; "sr3" also gives "sr3-1"/"sr3-std"."""
    ndim = low.ndim
    if method == "fourier":
        return {method: fourier_upsample(low, factor, ndim=ndim)}
    if method == "linear":
        return {method: linear_upsample(low, factor, ndim=ndim)}
    if method in ("regression", "regression+dc"):
        dc = "final" if method == "regression+dc" else "none"
        res = super_resolve(priors["regression"], low.float(), px_low, data_consistency=dc)
        return {method: res.mean.double()}
    res = super_resolve(
        priors["sr3"],
        low.float(),
        px_low,
        n_samples=args.samples,
        steps=args.steps,
        generator=generator,
        data_consistency=args.consistency,
        batch_size=args.batch_size,
    )
    out = {"sr3": res.mean.double(), "sr3-1": res.samples[0].double(), "sr3-std": res.std}
    for k in args.partial_means:
        # the mean of the first k samples: how the estimate sharpens with more samples
        out[f"sr3-{k}"] = res.samples[:k].double().mean(dim=0)
    return out


def evaluate(
    kind: str,
    truths: list[torch.Tensor],
    names: list[str],
    priors: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every method at every factor on every item; returns per-item scores and summaries."""
    ref = priors.get("sr3") or priors.get("regression")
    objective = ref.objective
    px = float(ref.pixel_size)
    scale = float(ref.metadata.normalisation["scale"])
    ndim = 2 if kind == "images" else 3
    box = truths[0].shape[-1]
    mask = spherical_mask((box,) * 3, 0.45 * box, 3.0, torch.float64) if ndim == 3 else None
    methods = [
        m
        for m in sr3_methods(args)
        if ("regression" not in m or "regression" in priors) and ("sr3" not in m or "sr3" in priors)
    ]
    out: dict[str, Any] = {"items": names, "factors": {}}
    examples: dict[int, dict[str, torch.Tensor]] = {}
    for factor in args.factors:
        g = torch.Generator().manual_seed(EVAL_SEED + factor)
        scores: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
        curves: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        seconds = {m: 0.0 for m in methods}
        for i, truth in enumerate(truths):
            low = sr_degrade(objective, truth, px, factor, ndim, g, noise_scale=scale).data
            estimates: dict[str, torch.Tensor] = {}
            for method in methods:
                if method.startswith("sr3-"):
                    continue
                t0 = time.perf_counter()
                estimates.update(upsampled(method, low, factor, px * factor, priors, args, g))
                seconds[method] += time.perf_counter() - t0
            for method in methods:
                est = estimates[method]
                row = scores[method]
                if ndim == 2:
                    row.setdefault("psnr_db", []).append(float(psnr(est, truth)))
                    row.setdefault("ssim", []).append(float(ssim(est, truth)))
                else:
                    res = fsc(est, truth, px, mask)
                    row.setdefault("fsc0143_angstrom", []).append(res.resolution_0143)
                    corr = masked_correlation(est, truth, mask)
                    row.setdefault("masked_correlation", []).append(float(corr))
                    curves[method].append(res.fsc)
                    frequency = res.frequency
                row.setdefault("detail_power", []).append(detail_power_ratio(est, truth, factor))
            if i == 0:
                examples[factor] = {"low": low, "truth": truth, **estimates}
        summary = {m: {metric: _stats(v) for metric, v in scores[m].items()} for m in methods}
        entry: dict[str, Any] = {
            "summary": summary,
            "per_item": scores,
            "seconds_per_item": {m: round(seconds[m] / len(truths), 3) for m in methods},
        }
        if ndim == 3:
            entry["fsc_frequency_per_angstrom"] = [float(f) for f in frequency]
            entry["mean_fsc"] = {m: np.mean(curves[m], axis=0).tolist() for m in methods}
        out["factors"][str(factor)] = entry
    out["_examples"] = examples
    out["methods"] = methods
    return out


def detail_power_ratio(estimate: torch.Tensor, truth: torch.Tensor, factor: int) -> float:
    """Power of ``estimate`` / power of ``truth`` at the frequencies the input lacks.

    The band is every Fourier coefficient with some axis index |k| > n / (2 · factor) (the
    low-resolution grid's Fourier cube, Nyquist excluded), so the ratio is 1 for an estimate
    with the true amount of detail, < 1 for an over-smoothed one (Fourier upsampling gives
    0). FSC, being a per-shell normalised correlation, cannot see this.
    """
    n = truth.shape[-1]
    k = torch.fft.fftfreq(n, d=1.0 / n).abs()
    grids = torch.meshgrid(*([k] * truth.ndim), indexing="ij")
    band = torch.stack(grids).amax(dim=0) > n / (2 * factor)
    e = torch.fft.fftn(estimate.double()).abs().pow(2)[band].sum()
    t = torch.fft.fftn(truth.double()).abs().pow(2)[band].sum()
    return float(e / t)


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "sem": sem, "n": int(v.size)}


# ----------------------------------------------------------------------------- goals, outputs

#: metric -> True when larger is better
METRICS = {"psnr_db": True, "ssim": True, "fsc0143_angstrom": False, "masked_correlation": True}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's goals: SR3 beats Fourier on every figure; beats regression on FSC at 4."""
    out = []
    for kind, res in results.items():
        for factor, entry in res["factors"].items():
            s = entry["summary"]
            if "sr3" not in s:
                continue
            for metric, larger in METRICS.items():
                if metric not in s["sr3"]:
                    continue
                rivals = ["fourier"]
                if metric == "fsc0143_angstrom" and factor == "4" and "regression" in s:
                    rivals.append("regression")
                for rival in rivals:
                    a, b = s["sr3"][metric]["mean"], s[rival][metric]["mean"]
                    out.append(
                        {
                            "data": kind,
                            "factor": int(factor),
                            "metric": metric,
                            "rival": rival,
                            "sr3": a,
                            "rival_value": b,
                            "met": bool(a > b if larger else a < b),
                        }
                    )
    return out


def plot_examples(path: Path, results: dict[str, Any], px: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["low", "fourier", "regression", "sr3", "truth"]
    titles = {"low": "low-res input", "truth": "truth", **LABELS}
    rows = [(k, f) for k, r in results.items() for f in r["_examples"]]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 2.6 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, (kind, factor) in enumerate(rows):
        ex = results[kind]["_examples"][factor]

        def view(x: torch.Tensor) -> np.ndarray:
            return (x[x.shape[0] // 2] if x.ndim == 3 else x).numpy()

        truth = view(ex["truth"])
        lo, hi = float(truth.min()), float(truth.max())
        half = truth.shape[0] * px[kind] / 2
        for c, col in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if col not in ex:
                ax.set_visible(False)
                continue
            ax.imshow(
                view(ex[col]), cmap="gray", vmin=lo, vmax=hi, extent=(-half, half, -half, half)
            )
            if r == 0 or c == 0:
                ax.set_title(titles[col], fontsize=9)
        what = "projection" if kind == "images" else "central slice"
        axes[r, 0].set_ylabel(f"{kind}: {what}\nfactor {factor}", fontsize=9)
    fig.suptitle(f"held-out protein {results[rows[0][0]]['items'][0].split('#')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fsc(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(res["factors"])
    fig, axes = plt.subplots(1, len(factors), figsize=(5 * len(factors), 3.8), squeeze=False)
    for ax, f in zip(axes[0], factors):
        entry = res["factors"][f]
        freq = np.asarray(entry["fsc_frequency_per_angstrom"])
        for m in res["methods"]:
            ax.plot(freq, entry["mean_fsc"][m], label=label(m))
        ax.axhline(0.143, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC with the true map")
        ax.set_title(f"maps, factor {f} (mean over {len(res['items'])} maps)")
        ax.set_ylim(-0.1, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Diffusion super-resolution (SR3) of particle images and density maps (issue 7)",
        "",
        f"Created {report['created']}, cryoprior {report['cryoprior_version']}, "
        f"{report['machine']}{' — QUICK smoke run, not a result' if report['quick'] else ''}.",
        "",
        f"SR3: mean of {report['settings']['samples']} DDIM samples, "
        f"{report['settings']['steps']} steps, data consistency "
        f"'{report['settings']['consistency']}'. Mean ± s.e.m. over held-out items.",
        "",
    ]
    names = {
        "psnr_db": "PSNR (dB) ↑",
        "ssim": "SSIM ↑",
        "fsc0143_angstrom": "FSC₀.₁₄₃ resolution (Å) ↓",
        "masked_correlation": "masked correlation ↑",
        "detail_power": "detail power (1 = true)",
    }
    for kind, res in report["data"].items():
        lines += [f"## {kind}: {len(res['items'])} held-out items", ""]
        for p, info in res["priors"].items():
            lines.append(f"- {p} prior `{info['path']}` ({info['training_steps']} training steps)")
        lines.append("")
        for factor, entry in res["factors"].items():
            metrics = list(next(iter(entry["summary"].values())))
            lines += [
                f"Factor {factor}:",
                "",
                "| method | " + " | ".join(names[m] for m in metrics) + " | s / item |",
                "|---|" + "---|" * (len(metrics) + 1),
            ]
            for m, s in entry["summary"].items():
                cells = [f"{s[k]['mean']:.3f} ± {s[k]['sem']:.3f}" for k in metrics]
                t = entry["seconds_per_item"].get(m, 0.0)
                took = "(in SR3's)" if m.startswith("sr3-") else f"{t:.2f}"
                lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {took} |")
            lines.append("")
    if report["goals"]:
        lines += ["## Goals (issue 7)", "", "| data | factor | metric | SR3 | vs | met |"]
        lines.append("|---|---|---|---|---|---|")
        for g in report["goals"]:
            lines.append(
                f"| {g['data']} | {g['factor']} | {names[g['metric']]} | {g['sr3']:.3f} | "
                f"{LABELS[g['rival']]} {g['rival_value']:.3f} | {'yes' if g['met'] else 'NO'} |"
            )
        lines.append("")
    lines += [
        "Figures: superres_examples.png, superres_fsc.png.",
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _public(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sr3-images", type=Path, default=ASSETS / "sr3_images")
    p.add_argument("--regression-images", type=Path, default=ASSETS / "regression_images")
    p.add_argument("--sr3-maps", type=Path, default=ASSETS / "sr3_maps_residual")
    p.add_argument("--regression-maps", type=Path, default=ASSETS / "regression_maps")
    p.add_argument("--corpus", default="corpus", help="corpus folder with the test proteins")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--max-proteins", type=int, default=None, help="test proteins (default all)")
    p.add_argument("--images-per-protein", type=int, default=8)
    p.add_argument("--maps-per-protein", type=int, default=2)
    p.add_argument("--samples", type=int, default=8, help="SR3 samples averaged")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--consistency", choices=("none", "final", "every_step"), default="final")
    p.add_argument("--batch-size", type=int, default=None, help="SR3 samples drawn at once")
    p.add_argument(
        "--partial-means",
        type=int,
        nargs="*",
        default=[],
        help="also score the mean of the first k SR3 samples for each k (< --samples)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--factors", type=int, nargs="+", default=list(FACTORS), help="upsampling factors"
    )
    p.add_argument("--skip", choices=("images", "maps"), nargs="*", default=[])
    args = p.parse_args(argv)
    if args.quick:
        args.max_proteins, args.images_per_protein, args.maps_per_protein = 2, 2, 1
        args.samples, args.steps, args.partial_means = 3, 4, [2]
    bad = [k for k in args.partial_means if not 1 < k < args.samples]
    if bad:
        p.error(f"--partial-means {bad}: each k must lie between 2 and --samples - 1")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "cryoprior_version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {},
    }
    results: dict[str, Any] = {}
    pixel = {}
    for kind, paths in (
        ("images", {"sr3": args.sr3_images, "regression": args.regression_images}),
        ("maps", {"sr3": args.sr3_maps, "regression": args.regression_maps}),
    ):
        if kind in args.skip:
            continue
        priors = {k: load_prior(v) for k, v in paths.items() if Path(v).exists()}
        if not priors:
            print(
                f"no {kind} priors at {', '.join(map(str, paths.values()))}: skipping",
                file=sys.stderr,
            )
            continue
        ref = priors.get("sr3") or priors["regression"]
        records = test_records(ref, args.corpus, args.max_proteins)
        t0 = time.perf_counter()
        if kind == "images":
            images, names = test_images(ref, records, args.images_per_protein)
            truths = list(images)
        else:
            truths, names = test_maps(ref, records, args.maps_per_protein)
        res = evaluate(kind, truths, names, priors, args)
        res["priors"] = {
            k: {
                "path": str(paths[k]),
                "training_steps": v.metadata.training.get("steps"),
                "objective": v.objective,
            }
            for k, v in priors.items()
        }
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[kind] = res
        pixel[kind] = float(ref.pixel_size)
        report["data"][kind] = _public(res)
        print(f"{kind}: {len(truths)} items in {res['seconds']} s", file=sys.stderr)
    if not results:
        print("no prior found; nothing to do", file=sys.stderr)
        return 1
    report["goals"] = goals(results)
    plot_examples(args.out / "superres_examples.png", results, pixel)
    if "maps" in results:
        plot_fsc(args.out / "superres_fsc.png", results["maps"])
    (args.out / "superres.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "superres.md").write_text(markdown(report))
    print((args.out / "superres.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
