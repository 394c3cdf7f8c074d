"""Engine benchmark: one training step (DSM loss, forward + backward + AdamW) per network.

Cases: U-Net 2D at 28² and 64², U-Net 3D at 32³ and 64³, EGNN at N = 50 and 200 nodes;
each with 1 and 2 torch threads. Each case runs in a fresh subprocess, so its peak
resident memory (VmHWM) is its own; the time is the median of a few steps after warm-up.
Writes benchmarks/results/engine.{json,md}.

    python benchmarks/engine.py            # all cases
    python benchmarks/engine.py --quick    # small sizes, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import peak_rss_mb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "unet2d-28": dict(kind="unet", dims=2, size=28, batch=32, base=32, mults=[1, 2, 2]),
    "unet2d-64": dict(kind="unet", dims=2, size=64, batch=32, base=32, mults=[1, 2, 2, 2]),
    "unet3d-32": dict(kind="unet", dims=3, size=32, batch=4, base=16, mults=[1, 2, 2]),
    "unet3d-64": dict(kind="unet", dims=3, size=64, batch=2, base=16, mults=[1, 2, 2, 2]),
    "egnn-50": dict(kind="egnn", nodes=50, batch=32, hidden=128, layers=4),
    "egnn-200": dict(kind="egnn", nodes=200, batch=32, hidden=128, layers=4),
}
QUICK = {
    "unet2d-16": dict(kind="unet", dims=2, size=16, batch=4, base=8, mults=[1, 2]),
    "egnn-10": dict(kind="egnn", nodes=10, batch=4, hidden=16, layers=2),
}


def worker(case: dict, threads: int, steps: int) -> dict:
    """Time ``steps`` training steps of one case; returns seconds per step and memory."""
    import torch

    from cryoprior.diffusion import CosineSchedule, Denoiser, dsm_loss
    from cryoprior.networks import EGNN, UNet

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    if case["kind"] == "unet":
        net = UNet(
            dims=case["dims"],
            in_channels=1,
            out_channels=1,
            base_channels=case["base"],
            channel_mults=tuple(case["mults"]),
        )
        x0 = torch.randn(case["batch"], 1, *([case["size"]] * case["dims"]), generator=g)
        mask = None
        den = Denoiser(net, CosineSchedule(), prediction="eps")
    else:
        net = EGNN(hidden_features=case["hidden"], num_layers=case["layers"])
        x0 = torch.randn(case["batch"], case["nodes"], 3, generator=g)
        x0 = x0 - x0.mean(1, keepdim=True)
        mask = torch.ones(case["batch"], case["nodes"])
        den = Denoiser(net, CosineSchedule(), prediction="eps", representation="points")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    params = sum(p.numel() for p in net.parameters())
    base = peak_rss_mb()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = dsm_loss(den, x0, generator=g, mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        if i > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return {
        "seconds_per_step": statistics.median(times),
        "peak_mb": peak_rss_mb(),
        "baseline_mb": base,
        "parameters": params,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = QUICK if args.quick else CASES
    if args.worker:
        name, threads = args.worker.split(":")
        print(json.dumps(worker(cases[name], int(threads), args.steps)))
        return 0
    rows = []
    for name, case in cases.items():
        for threads in args.threads:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                f"{name}:{threads}",
                "--steps",
                str(args.steps),
            ] + (["--quick"] if args.quick else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            res = (
                json.loads(p.stdout.strip().splitlines()[-1])
                if p.returncode == 0
                else {"error": p.stderr[-800:]}
            )
            row = {"case": name, "threads": threads, **case, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "engine",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "steps_timed": args.steps,
        "what": "one DSM training step (cosine VP, eps target): forward, backward, AdamW",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    stem = "engine_quick" if args.quick else "engine"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Engine: one training step",
        "",
        f"{meta['machine']}; {meta['time']}; median of {args.steps} steps after one "
        f"warm-up step; peak RSS of a fresh process (includes ~250 MB for torch itself).",
        "",
        "| case | batch | params | threads | s/step | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['batch']} | | {r['threads']} | failed | |")
        else:
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['parameters']:,} | "
                f"{r['threads']} | {r['seconds_per_step']:.3f} | {r['peak_mb']:.0f} |"
            )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
