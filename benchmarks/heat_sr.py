"""Benchmark: heat-kernel super-resolution of point clouds (issue 6).

Cold-diffusion restoration (Bansal et al. 2022) of heat-kernel-blurred clouds with the
shipped EGNN restoration priors, on data never seen in training:

- Molecules: the held-out (test) CCD components recorded in the molecule prior's
  prior.json (split by a hash of the component id), heavy atoms, ideal coordinates.
- Proteins: the test chains recorded in the Cα prior's prior.json (corpus split by
  sequence identity), cut into contiguous non-overlapping segments of the prior's size
  (the training items were segments of that size too; a shorter chain is one segment).

Each clean cloud X0 is blurred by the prior's own forward process (Gaussian heat kernel,
σ = t × max_radius Å; plus the prior's training noise, if any, from a fixed seed) at
t ∈ {0.25, 0.5, 1.0}, then restored by (b) one-step restoration x̂0 = R(x_t, t), (c) cold
diffusion Algorithm 1 (x_s = D(R(x_t, t), s)) and (d) Algorithm 2
(x_s = x_t − D(x̂0, t) + D(x̂0, s)), the latter two with ⌈K·t⌉ uniform steps from t to 0
(K = --steps). As a control, (e) runs Algorithm 2 with the identity in place of the
network (x̂0 = x_t): its step x_s = x_t + D(x_t, s) − D(x_t, t) is already a classical
iterative deblurring (unsharp masking), so (d) − (e) is what the learned restorer adds.
Reported:

- Kabsch RMSD (Å, proper rotations only) to X0 of (a) the blurred input and (b)-(e), mean
  ± standard error over clouds, per t (table, RMSD-vs-t plot);
- for molecules, the distribution of bond-length errors |d̂ − d| (Å) over the covalent
  bonds of X0 (pairs closer than the sum of covalent radii + 0.4 Å), per method and t
  (table: mean, median, 95th percentile; histogram);
- the equivariance error of the full pipeline (blur then restore) at t = 0.5: the RMS over
  atoms of f(R X0 + c) − (R f(X0) + c) for random proper rotations R and translations c,
  float32 network, in Å;
- the goal of issue 6: (d) at most half the RMSD of (a) at t = 0.5 on held-out molecules;
- a figure of one held-out molecule at t = 1: blurred / restored (Alg. 2) / true.

Writes heat_sr.json, heat_sr.md, heat_sr_rmsd.png, heat_sr_bonds.png and
heat_sr_molecule.png into --out (default benchmarks/results).

    python benchmarks/heat_sr.py                          # full run, shipped priors
    python benchmarks/heat_sr.py --quick --prior-molecules runs/heat_sr_molecules/prior \\
        --prior-calpha runs/heat_sr_calpha/prior --out /tmp/heat_sr         # smoke run
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
from cryoprior.geometry.rotations import kabsch, random_rotations
from cryoprior.metrics.structure import kabsch_rmsd
from cryoprior.priors import load_prior
from cryoprior.solvers.cold_diffusion import cold_sample_improved
from cryoprior.train.objectives import PointRestorer

RESULTS = Path(__file__).resolve().parent / "results"
ASSETS = Path(cryoprior.__file__).resolve().parent / "assets" / "priors"
T_VALUES = (0.25, 0.5, 1.0)
METHODS = ("blurred", "one-step", "alg1", "alg2", "alg2-identity")
LABELS = {
    "blurred": "(a) blurred input",
    "one-step": "(b) one-step R(x_t, t)",
    "alg1": "(c) cold diffusion Alg. 1",
    "alg2": "(d) cold diffusion Alg. 2",
    "alg2-identity": "(e) Alg. 2, R = identity",
}
SAMPLER = {"one-step": "one-step", "alg1": "naive", "alg2": "improved"}
EVAL_SEED = 20240  # the blur noise (if the prior has any) and the equivariance test


# ----------------------------------------------------------------------------- data


def molecule_test_set(restorer: PointRestorer, n: int) -> tuple[list[np.ndarray], list, list]:
    """Heavy-atom conformers (Å) of the prior's held-out components (first ``n`` ids)."""
    from cryoprior.data.molecules import load_ccd_conformers

    names = list(restorer.prior.metadata.data.get("split", {}).get("test", []))
    if not names:
        raise SystemExit("the molecule prior records no test split (data.split.test)")
    confs = load_ccd_conformers(names[:n], max_heavy_atoms=restorer.max_nodes, min_heavy_atoms=2)
    return [c.coords for c in confs], [list(c.elements) for c in confs], [c.name for c in confs]


def protein_test_set(
    restorer: PointRestorer, corpus: str, max_chains: int | None, max_segments: int | None
) -> tuple[list[np.ndarray], list, list]:
    """Non-overlapping segments (prior size) of the Cα traces of the prior's test chains."""
    from cryoprior.data.corpus import load_corpus, shipped_folder

    names = set(restorer.prior.metadata.data.get("split", {}).get("test", []))
    folder = Path(corpus) if corpus else shipped_folder()
    records = [r for r in load_corpus(folder) if r.name in names]
    if not records:
        raise SystemExit(f"none of the Cα prior's test chains are in the corpus {folder}")
    w = restorer.max_nodes
    clouds, labels = [], []
    for rec in records[:max_chains]:
        ca = np.asarray(rec.calpha(), dtype=np.float64)
        starts = range(0, max(1, len(ca) - w + 1), w)
        for s in list(starts)[:max_segments]:
            clouds.append(ca[s : s + w])
            labels.append(f"{rec.name}:{s + 1}-{min(s + w, len(ca))}")
    return clouds, [None] * len(clouds), labels


def pad(clouds: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3) float64 Å and the (B, N) node mask of a list of (M, 3) clouds."""
    n = max(len(c) for c in clouds)
    x = torch.zeros(len(clouds), n, 3, dtype=torch.float64)
    mask = torch.zeros(len(clouds), n, dtype=torch.float64)
    for i, c in enumerate(clouds):
        x[i, : len(c)] = torch.from_numpy(c - c.mean(0))
        mask[i, : len(c)] = 1.0
    return x, mask


# ----------------------------------------------------------------------------- evaluation


def blur(restorer: PointRestorer, x0: torch.Tensor, mask: torch.Tensor, t: float) -> torch.Tensor:
    """D(X0, t) with the prior's training noise (if any) from a fixed seed."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    noise = float(restorer.objective.get("noise_std", 0.0))
    return restorer.process.degrade(x0, t, mask, noise_std=noise, generator=g)


def run_methods(
    restorer: PointRestorer,
    x0: torch.Tensor,
    mask: torch.Tensor,
    elements: list | None,
    t: float,
    steps: int,
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Blurred input and the three restorations, (B, N, 3) Å each."""
    xt = blur(restorer, x0, mask, t)
    out = {"blurred": xt}
    k = max(1, math.ceil(steps * t))
    for method, sampler in SAMPLER.items():
        parts = []
        for s in range(0, x0.shape[0], chunk):
            els = None if elements is None else elements[s : s + chunk]
            m = mask[s : s + chunk]
            parts.append(restorer.restore(xt[s : s + chunk], t, m, els, sampler, k))
        out[method] = torch.cat(parts)
    com = (xt * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    alg2 = cold_sample_improved(_identity, restorer.process, xt, mask, t_start=t, steps=k)
    out["alg2-identity"] = (alg2 + com) * mask[..., None]
    return out


def _identity(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The control restorer x̂0 = x_t (no network)."""
    return x


def bond_errors(
    out: torch.Tensor, x0: torch.Tensor, clouds: list[np.ndarray], elements: list
) -> np.ndarray:
    """|d̂ − d| in Å over the covalent bonds of every true cloud."""
    from cryoprior.data.molecules import bonded_pairs

    errs = []
    for b, (c, els) in enumerate(zip(clouds, elements)):
        pairs = torch.from_numpy(bonded_pairs(c, els))
        if len(pairs) == 0:
            continue
        d_true = (x0[b, pairs[:, 0]] - x0[b, pairs[:, 1]]).norm(dim=-1)
        d_hat = (out[b, pairs[:, 0]] - out[b, pairs[:, 1]]).norm(dim=-1)
        errs.append((d_hat - d_true).abs().numpy())
    return np.concatenate(errs) if errs else np.zeros(0)


def stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "sem": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0,
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
    }


def equivariance(
    restorer: PointRestorer,
    x0: torch.Tensor,
    mask: torch.Tensor,
    elements: list | None,
    steps: int,
    t: float = 0.5,
) -> dict[str, float]:
    """Max over clouds of the RMS (Å) of f(R X0 + c) − (R f(X0) + c), f = blur ∘ restore."""
    g = torch.Generator().manual_seed(EVAL_SEED + 1)
    b = x0.shape[0]
    rot = random_rotations(b, g, torch.float64)
    shift = 10.0 * torch.randn(b, 1, 3, generator=g, dtype=torch.float64)
    moved = (x0 @ rot.transpose(1, 2) + shift) * mask[..., None]
    first = run_methods(restorer, x0, mask, elements, t, steps, chunk=b)
    second = run_methods(restorer, moved, mask, elements, t, steps, chunk=b)
    out = {}
    for method in METHODS:
        expected = (first[method] @ rot.transpose(1, 2) + shift) * mask[..., None]
        d2 = ((second[method] - expected) ** 2).sum(-1) * mask
        out[method] = float((d2.sum(1) / mask.sum(1)).sqrt().max())
    return out


def evaluate(
    restorer: PointRestorer,
    clouds: list[np.ndarray],
    elements: list,
    labels: list[str],
    args: argparse.Namespace,
    molecules: bool,
) -> dict[str, Any]:
    x0, mask = pad(clouds)
    els = elements if molecules else None
    result: dict[str, Any] = {"n_clouds": len(clouds), "items": labels, "t": {}}
    examples = {}
    for t in args.t_values:
        t0 = time.perf_counter()
        outs = run_methods(restorer, x0, mask, els, t, args.steps, args.chunk)
        entry: dict[str, Any] = {"steps": max(1, math.ceil(args.steps * t)), "rmsd": {}}
        for method, out in outs.items():
            r = kabsch_rmsd(out, x0, mask).numpy()
            entry["rmsd"][method] = stats(r)
            entry["rmsd"][method]["per_cloud"] = [round(float(v), 4) for v in r]
        if molecules:
            entry["bond_error"] = {
                m: stats(bond_errors(o, x0, clouds, els)) for m, o in outs.items()
            }
            entry["_bond_values"] = {m: bond_errors(o, x0, clouds, els) for m, o in outs.items()}
        entry["sigma_angstrom"] = float(restorer.process.sigma(t))
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        result["t"][str(t)] = entry
        examples[t] = {m: o[0, : len(clouds[0])].numpy() for m, o in outs.items()}
    n_eq = min(args.equivariance_clouds, len(clouds))
    result["equivariance_rms_angstrom"] = equivariance(
        restorer, x0[:n_eq], mask[:n_eq], None if els is None else els[:n_eq], args.steps
    )
    result["_example"] = {"truth": x0[0, : len(clouds[0])].numpy(), "by_t": examples}
    return result


# ----------------------------------------------------------------------------- outputs


def plot_rmsd(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        ts = [float(t) for t in res["t"]]
        for method in METHODS:
            mean = [res["t"][str(t)]["rmsd"][method]["mean"] for t in ts]
            sem = [res["t"][str(t)]["rmsd"][method]["sem"] for t in ts]
            style = "--" if method == "alg2-identity" else "-"
            ax.errorbar(ts, mean, yerr=sem, ls=style, marker="o", capsize=3, label=LABELS[method])
        ax.set_xlabel("blur t (σ = t × max_radius)")
        ax.set_ylabel("Kabsch RMSD to the truth (Å)")
        ax.set_title(f"{name} (held out, n = {res['n_clouds']})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_bonds(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = list(res["t"])
    fig, axes = plt.subplots(1, len(ts), figsize=(4.6 * len(ts), 3.6), squeeze=False)
    for ax, t in zip(axes[0], ts):
        values = res["t"][t]["_bond_values"]
        top = max(float(np.percentile(v, 99)) for v in values.values() if len(v)) or 0.1
        bins = np.linspace(0, top, 40)
        for method in METHODS:
            ax.hist(values[method], bins=bins, histtype="step", label=LABELS[method])
        ax.set_xlabel("bond-length error |d̂ − d| (Å)")
        ax.set_title(f"molecules, t = {t}")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("bonds")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_molecule(path: Path, res: dict[str, Any], elements: list[str], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryoprior.data.molecules import bonded_pairs

    truth = res["_example"]["truth"]
    t = max(res["_example"]["by_t"])
    panels = {
        f"blurred (t = {t:g})": res["_example"]["by_t"][t]["blurred"],
        "restored (Alg. 2)": res["_example"]["by_t"][t]["alg2"],
        "true": truth,
    }
    bonds = bonded_pairs(truth, elements)
    colours = {"C": "0.3", "N": "tab:blue", "O": "tab:red", "S": "gold", "P": "tab:orange"}
    fig = plt.figure(figsize=(12, 4.2))
    tt = torch.from_numpy(truth)
    for k, (title, xyz) in enumerate(panels.items()):
        r, c = kabsch(torch.from_numpy(xyz), tt)  # superpose on the truth for the view
        p = (torch.from_numpy(xyz) @ r.T + c).numpy()
        rmsd = float(np.sqrt(((p - truth) ** 2).sum(1).mean()))
        ax = fig.add_subplot(1, 3, k + 1, projection="3d")
        for i, j in bonds:
            ax.plot(*zip(p[i], p[j]), color="0.6", lw=1.5)
        ax.scatter(*p.T, c=[colours.get(e, "tab:green") for e in elements], s=40, depthshade=False)
        ax.set_title(f"{title}\nRMSD {rmsd:.2f} Å" if k < 2 else title)
        lim = float(np.abs(truth).max()) + 0.5
        for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            setter(-lim, lim)
        ax.set_box_aspect((1, 1, 1), zoom=1.9)
        ax.set_axis_off()
    fig.suptitle(f"held-out molecule {name} (bonds drawn from the true geometry)", y=0.99)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def goal(res: dict[str, Any]) -> dict[str, Any]:
    entry = res["t"].get("0.5")
    if entry is None:
        return {"checked": False, "why": "t = 0.5 not evaluated"}
    a, d = entry["rmsd"]["blurred"]["mean"], entry["rmsd"]["alg2"]["mean"]
    e = entry["rmsd"]["alg2-identity"]["mean"]
    return {
        "statement": "Alg. 2 RMSD <= 0.5 × blurred RMSD at t = 0.5 on held-out molecules",
        "blurred_rmsd": a,
        "alg2_rmsd": d,
        "alg2_identity_rmsd": e,
        "ratio": d / a if a > 0 else float("nan"),
        "met": bool(d <= 0.5 * a),
        "control_met": bool(e <= 0.5 * a),
        "network_gain": (e - d) / e if e > 0 else float("nan"),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Heat-kernel super-resolution of point clouds (issue 6)",
        "",
        f"Created {report['created']}, cryoprior {report['cryoprior_version']}, "
        f"{report['machine']}{' — QUICK smoke run, not a result' if report['quick'] else ''}.",
        "",
        "Kabsch RMSD (Å) to the true held-out structure, mean ± s.e.m. over clouds; σ = t × "
        "the prior's max_radius; Alg. 1/2 use ⌈K·t⌉ steps "
        f"(K = {report['settings']['steps']}).",
        "",
    ]
    for name, res in report["datasets"].items():
        p = res["prior"]
        lines += [
            f"## {name}: {res['n_clouds']} held-out clouds",
            "",
            f"Prior `{p['path']}` ({p['objective'].get('process')} blur, max_radius "
            f"{p['objective'].get('max_radius')} Å, trained {p['training_steps']} steps).",
            "",
            "| t | σ (Å) | " + " | ".join(LABELS[m] for m in METHODS) + " |",
            "|---|---|" + "---|" * len(METHODS),
        ]
        for t, e in res["t"].items():
            cells = [f"{e['rmsd'][m]['mean']:.3f} ± {e['rmsd'][m]['sem']:.3f}" for m in METHODS]
            lines.append(f"| {t} | {e['sigma_angstrom']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
        if "bond_error" in next(iter(res["t"].values())):
            lines += [
                "Bond-length error |d̂ − d| (Å) over the covalent bonds: mean / median / 95th pct.",
                "",
                "| t | " + " | ".join(LABELS[m] for m in METHODS) + " |",
                "|---|" + "---|" * len(METHODS),
            ]
            for t, e in res["t"].items():
                b = e["bond_error"]
                cells = [
                    f"{b[m]['mean']:.3f} / {b[m]['median']:.3f} / {b[m]['p95']:.3f}"
                    for m in METHODS
                ]
                lines.append(f"| {t} | " + " | ".join(cells) + " |")
            lines.append("")
        eq = res["equivariance_rms_angstrom"]
        lines += [
            "Equivariance error of blur + restoration at t = 0.5 (max over clouds of the RMS "
            "of f(RX + c) − (R f(X) + c), Å, float32 network): "
            + ", ".join(f"{LABELS[m]} {eq[m]:.1e}" for m in METHODS)
            + ".",
            "",
        ]
    g = report.get("goal")
    if g and g.get("checked", True):
        verdict = "met" if g["met"] else "NOT met"
        lines += [
            f"**Goal ({g['statement']}): {verdict}** — blurred {g['blurred_rmsd']:.3f} Å, "
            f"Alg. 2 {g['alg2_rmsd']:.3f} Å (ratio {g['ratio']:.2f}). The control (e), "
            f"Alg. 2 without the network, reaches {g['alg2_identity_rmsd']:.3f} Å "
            f"({'also meets' if g['control_met'] else 'does not meet'} the goal): the "
            f"learned restorer lowers Alg. 2's RMSD by {100 * g['network_gain']:.0f} %.",
            "",
        ]
    lines += [
        "Figures: heat_sr_rmsd.png (RMSD vs t), heat_sr_bonds.png (bond-length errors), "
        "heat_sr_molecule.png (one held-out molecule at t = 1).",
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _public(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON part of a dataset result (no arrays)."""
    out = {k: v for k, v in res.items() if not k.startswith("_")}
    out["t"] = {
        t: {k: v for k, v in e.items() if not k.startswith("_")} for t, e in res["t"].items()
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior-molecules", type=Path, default=ASSETS / "heat_sr_molecules")
    p.add_argument("--prior-calpha", type=Path, default=ASSETS / "heat_sr_calpha")
    p.add_argument("--corpus", default="corpus", help="corpus folder with the test chains")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--molecules", type=int, default=200, help="held-out molecules to use")
    p.add_argument("--max-chains", type=int, default=None, help="held-out chains (default all)")
    p.add_argument("--max-segments", type=int, default=None, help="segments per chain")
    p.add_argument("--steps", type=int, default=20, help="K: cold-diffusion steps at t = 1")
    p.add_argument("--chunk", type=int, default=64, help="clouds restored at once")
    p.add_argument("--equivariance-clouds", type=int, default=8)
    p.add_argument("--skip", choices=("molecules", "proteins"), nargs="*", default=[])
    args = p.parse_args(argv)
    args.t_values = list(T_VALUES)
    if args.quick:
        args.molecules, args.max_chains, args.max_segments = 6, 2, 1
        args.steps, args.equivariance_clouds = 4, 2
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "cryoprior_version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "datasets": {},
    }
    results = {}
    example = None
    for name, path in (("molecules", args.prior_molecules), ("proteins", args.prior_calpha)):
        if name in args.skip:
            continue
        if not Path(path).exists():
            print(f"no prior at {path}: skipping {name}", file=sys.stderr)
            continue
        restorer = PointRestorer(load_prior(path))  # type: ignore[arg-type]
        if name == "molecules":
            clouds, elements, labels = molecule_test_set(restorer, args.molecules)
        else:
            clouds, elements, labels = protein_test_set(
                restorer, args.corpus, args.max_chains, args.max_segments
            )
        t0 = time.perf_counter()
        res = evaluate(restorer, clouds, elements, labels, args, name == "molecules")
        meta = restorer.prior.metadata
        res["prior"] = {
            "path": str(path),
            "objective": meta.objective,
            "training_steps": meta.training.get("steps"),
            "normalisation": meta.normalisation,
        }
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        report["datasets"][name] = _public(res)
        if name == "molecules":
            report["goal"] = goal(res)
            example = (elements[0], labels[0])
        print(f"{name}: {len(clouds)} clouds in {res['seconds']} s", file=sys.stderr)
    if not results:
        print("no prior found; nothing to do", file=sys.stderr)
        return 1
    plot_rmsd(args.out / "heat_sr_rmsd.png", results)
    if "molecules" in results and example is not None:
        plot_bonds(args.out / "heat_sr_bonds.png", results["molecules"])
        plot_molecule(args.out / "heat_sr_molecule.png", results["molecules"], *example)
    (args.out / "heat_sr.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "heat_sr.md").write_text(markdown(report))
    print((args.out / "heat_sr.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
