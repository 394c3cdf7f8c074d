"""Benchmark: Fourier-slice projection, back-projection and Wiener reconstruction.

Measures, for N images of D² pixels (default 1000 images at 64² and 128²), throughput
(images/s), peak memory of the operation (MB) and accuracy, for cryoprior's operators
(cubic B-spline and trilinear kernels) side by side with torch-fourier-slice 0.6.0 when it
is installed (``pip install torch-fourier-slice==0.6.0``; otherwise its rows say "not
installed").

- project: images of a Gaussian-blob map (blobs out to 0.3 D, σ = 1.5 D/32 voxels) for
  uniform random poses; accuracy = relative L2 error against the exact line integrals.
- backproject: cryoprior's exact adjoint of project (no accuracy: it is not an inverse).
- reconstruct: map from the exact (analytic, noiseless) projections: cryoprior's Wiener
  reconstruction (trilinear, SSNR 100 since the data are noiseless) and
  torch-fourier-slice's ``backproject_2d_to_3d`` (weights clamped at 1); accuracy =
  relative L2 error against the sampled blob map.

Each measurement runs in a fresh subprocess with the requested threads: time is the best
of ``--repeats`` runs after a small warm-up; peak memory is the rise of VmHWM (the resident
set high-water mark, reset through /proc/self/clear_refs) over the resident set before the
operation. Writes ``projection.json`` and ``projection.md`` to ``--out``.

    python benchmarks/projection.py              # full run (minutes; run on a quiet machine)
    python benchmarks/projection.py --quick --out /tmp/bench   # tiny smoke run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TFS = "torch-fourier-slice"


# ---------------------------------------------------------------------------------------
# child process: one measurement


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _phantom(size: int, dtype):
    import torch

    from cryoprior.physics.projection import gaussian_blobs

    base = torch.tensor(
        [[1.0, 0.0, -0.5], [-1.0, 0.6, 0.3], [0.0, -1.0, 0.8], [0.4, 0.5, -1.0], [0.2, 0.1, 0.1]],
        dtype=torch.float64,
    )
    centres = base * (0.3 * size / base.norm(dim=1).max())
    amplitudes = torch.tensor([1.0, 0.7, 1.3, 0.9, 0.5], dtype=torch.float64)
    sigma = 1.5 * size / 32
    return centres, amplitudes, sigma, gaussian_blobs(centres, sigma, size, amplitudes, dtype)


def _operation(case: dict):
    """Build inputs; return (run(n_images) -> output, accuracy(output) -> float | None)."""
    import torch

    from cryoprior.geometry.rotations import random_rotations
    from cryoprior.physics.projection import backproject, project, project_gaussian_blobs
    from cryoprior.solvers.backprojection import wiener_reconstruct

    size, n, op, impl = case["size"], case["n"], case["op"], case["impl"]
    gen = torch.Generator().manual_seed(case["seed"])
    rot = random_rotations(n, gen, torch.float32)
    centres, amps, sigma, volume = _phantom(size, torch.float64)
    volume32 = volume.float()
    exact = project_gaussian_blobs(centres, sigma, rot.double(), size, amps)

    def rel(out) -> float:
        ref = exact if op == "project" else volume
        return float((out.double() - ref).norm() / ref.norm())

    if impl == TFS:
        from torch_fourier_slice import backproject_2d_to_3d, project_3d_to_2d

        rot_t = rot.transpose(-1, -2).contiguous()  # tfs samples the slice at R k
        if op == "project":
            return (lambda m: project_3d_to_2d(volume32, rot_t[:m], pad_factor=2.0)), rel
        images = exact.float()
        return (lambda m: backproject_2d_to_3d(images[:m], rot_t[:m], pad_factor=2.0)), rel
    kernel = case.get("kernel", "linear")
    pad = case.get("pad", 2.0)
    if op == "project":
        return (lambda m: project(volume32, rot[:m], pad=pad, kernel=kernel)), rel
    images = exact.float()
    if op == "backproject":
        return (lambda m: backproject(images[:m], rot[:m], pad=pad, kernel=kernel)), None
    return (lambda m: wiener_reconstruct(images[:m], rot[:m], kernel=kernel, snr=100.0)), rel


def run_child(case: dict) -> dict:
    """Time one case in this (fresh) process; return a result row."""
    import torch

    torch.set_num_threads(case["threads"])
    run, accuracy = _operation(case)
    run(min(8, case["n"]))  # warm-up: allocator, FFT plans
    rss_before = _memory_kb("VmRSS")
    peak_ok = _reset_peak()
    times = []
    peak_kb = None
    for i in range(case["repeats"]):
        start = time.perf_counter()
        out = run(case["n"])
        times.append(time.perf_counter() - start)
        if i == 0 and peak_ok:
            peak_kb = _memory_kb("VmHWM") - rss_before
    best = min(times)
    return {
        **case,
        "seconds": best,
        "images_per_s": case["n"] / best,
        "peak_mb": None if peak_kb is None else peak_kb / 1024,
        "rel_l2_error": None if accuracy is None else accuracy(out),
    }


# ---------------------------------------------------------------------------------------
# parent: the case list, subprocesses, tables


def _tfs_version() -> str | None:
    if importlib.util.find_spec("torch_fourier_slice") is None:
        return None
    try:
        return importlib.metadata.version(TFS)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cases(args: argparse.Namespace) -> list[dict]:
    cases = []
    for size in args.sizes:
        n = args.n_images
        common = {
            "size": size,
            "n": n,
            "seed": args.seed,
            "threads": args.threads,
            "repeats": args.repeats,
        }
        # (kernel, pad): the accurate default, a fast cubic setting, and trilinear.
        settings = (("cubic", 2.0), ("cubic", 1.125), ("linear", 2.0))
        for kernel, pad in settings:
            cases.append(
                {**common, "op": "project", "impl": "cryoprior", "kernel": kernel, "pad": pad}
            )
        cases.append({**common, "op": "project", "impl": TFS})
        for kernel, pad in settings:
            cases.append(
                {**common, "op": "backproject", "impl": "cryoprior", "kernel": kernel, "pad": pad}
            )
        cases.append({**common, "op": "reconstruct", "impl": "cryoprior", "kernel": "linear"})
        cases.append({**common, "op": "reconstruct", "impl": TFS})
    if not args.quick:  # the scale the reconstruction must handle: 10,000 images at 64²
        big = {"size": 64, "n": 10_000, "seed": args.seed, "threads": args.threads, "repeats": 1}
        cases.append({**big, "op": "reconstruct", "impl": "cryoprior", "kernel": "linear"})
        cases.append({**big, "op": "reconstruct", "impl": TFS})
    return cases


def _run_case(case: dict, tfs_version: str | None, timeout: float) -> dict:
    if case["impl"] == TFS and tfs_version is None:
        return {**case, "status": "not installed"}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(case["threads"]),
        "MKL_NUM_THREADS": str(case["threads"]),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"timed out after {timeout:.0f} s"}
    if proc.returncode in (-9, 137):
        return {**case, "status": "killed (out of memory)"}
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or "no output").splitlines()
        return {**case, "status": f"failed: {lines[-1][:200]}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Projection benchmark",
        "",
        f"{meta['date']} · torch {meta['torch']} · {meta['threads']} threads · "
        f"{meta['cpu']} · torch-fourier-slice: {meta['torch_fourier_slice'] or 'not installed'}",
        "",
        "Phantom: Gaussian blobs out to 0.3 D (σ = 1.5 D/32 voxels); uniform random poses; "
        "pad as stated (torch-fourier-slice: pad 2). Error: relative L2 against exact line "
        "integrals (project) or the sampled "
        "map (reconstruct; cryoprior: Wiener with SSNR 100, noiseless data). Memory: rise "
        "of the resident-set high-water mark during the operation.",
        "",
        "| operation | implementation | box | images | time (s) | images/s | peak memory (MB) "
        "| rel. L2 error | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        impl = r["impl"] + (
            f" ({r['kernel']}, pad {r.get('pad', 2.0):g})" if r.get("kernel") else ""
        )
        lines.append(
            f"| {r['op']} | {impl} | {r['size']}² | {r['n']} | {_fmt(r.get('seconds'), '.3f')} "
            f"| {_fmt(r.get('images_per_s'), '.0f')} | {_fmt(r.get('peak_mb'), '.0f')} "
            f"| {_fmt(r.get('rel_l2_error'), '.2e')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (32², 50 images, one repeat) to check the script works",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for projection.json and projection.md"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="box sizes (default 64 128; quick: 32)"
    )
    parser.add_argument(
        "--n-images", type=int, default=None, help="images per case (default 1000; quick: 50)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per case, best kept (default 3; quick: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for poses")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    args.sizes = args.sizes or ([32] if args.quick else [64, 128])
    args.n_images = args.n_images or (50 if args.quick else 1000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    import torch

    from cryoprior.core.files import write_text_atomic

    tfs_version = _tfs_version()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "torch_fourier_slice": tfs_version,
        "threads": args.threads,
        "cpu": _cpu_name(),
        "seed": args.seed,
        "quick": args.quick,
    }
    rows = []
    for case in _cases(args):
        row = _run_case(case, tfs_version, args.timeout)
        rows.append(row)
        print(
            f"{row['op']:<12} {row['impl']:<20} {row.get('kernel', ''):<7} {row['size']:>4}² "
            f"n={row['n']:<6} {_fmt(row.get('images_per_s'), '10.0f')} img/s "
            f"{_fmt(row.get('peak_mb'), '8.0f')} MB  err {_fmt(row.get('rel_l2_error'), '.2e')}"
            f"  {row['status']}",
            flush=True,
        )
    write_text_atomic(
        args.out / "projection.json", json.dumps({"meta": meta, "results": rows}, indent=2) + "\n"
    )
    write_text_atomic(args.out / "projection.md", _markdown(meta, rows))
    print(f"wrote {args.out / 'projection.json'} and {args.out / 'projection.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
