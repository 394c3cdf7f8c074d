"""Multi-target detection: simulate a measurement holding rotated copies of an image, and
estimate the image from the measurement alone (approximate EM, optional learned prior).

  simulate  writes measurement.mrc (N×N), truth.mrc (L×L), simulation.json (positions,
            angles in degrees, σ, SNR) and measurement.png (copies outlined).
  estimate  writes estimate.mrc, estimate.json (settings, σ, log-likelihood and, with
            --truth, the error after every iteration) and estimate.png.

SNR = ‖F‖²/(L²σ²): the mean square of the target over its L×L box over the noise variance
(Zabatani, Kreymer & Bendory 2023), not the DESIGN.md box-variance convention. The error
is min over rotations ‖F* − rot(F̂)‖/‖F*‖ (the paper's); "aligned error" also minimises
over translations of F̂ inside its box, which the measurement cannot reveal when F has a
zero border. MNIST targets come from the official *test* split; their natural [0, 1)
units are the units of an MNIST prior, so the prior applies to the estimate directly.

examples:
  cryoprior mtd simulate --target mnist --index 3 --snr 0.5 -o mtd
  cryoprior mtd estimate mtd/measurement.mrc --size 28 --sigma 0.63 \\
      --prior runs/mnist/prior --anneal-from 0.2 --init mnist-mean --truth mtd/truth.mrc \\
      -o mtd/est
  cryoprior mtd simulate --target gaussian --snr 5 -o g && \\
      cryoprior mtd estimate g/measurement.mrc --size 5 --prior gaussian --truth g/truth.mrc \\
      --restarts 10 -o g/est
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import torch

from cryoprior.cli._common import add_common_args, output_dir, run_record, write_json
from cryoprior.core.errors import InputError, require
from cryoprior.core.files import atomic_path
from cryoprior.core.runtime import seed_everything, set_threads
from cryoprior.io.mrc import read_stack
from cryoprior.physics.mtd import DEFAULT_DENSITY, simulate_mtd
from cryoprior.solvers.mtd_em import EMConfig, MTDResult, aligned_error, approximate_em
from cryoprior.solvers.score_prior import (
    DEFAULT_NOISE_LEVEL,
    GAUSSIAN_SIZE,
    GaussianScore,
    PriorScore,
    gaussian_image_mean,
    sample_gaussian_images,
)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior mtd`` (two actions: simulate, estimate)."""
    sub = parser.add_subparsers(dest="mtd_action", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("simulate", help="simulate an MTD measurement and its truth")
    s.add_argument(
        "--target",
        default="mnist",
        help="mnist (a test-split digit), gaussian (N(μ, I), μ fixed by the Gaussian prior's "
        "seed) or a 2-D .mrc image (default mnist)",
    )
    s.add_argument("--index", type=int, default=0, help="MNIST test-split index (default 0)")
    s.add_argument(
        "--size", type=int, default=GAUSSIAN_SIZE, help="Gaussian target side L (default 5)"
    )
    s.add_argument("--snr", type=float, default=1.0, help="‖F‖²/(L²σ²); 0 = no noise")
    s.add_argument("--n", type=int, default=None, help="measurement side N (default 11 L)")
    s.add_argument("--density", type=float, default=DEFAULT_DENSITY, help="p L²/N² (0.1)")
    s.add_argument(
        "--separation", type=int, default=None, help="least corner distance, px (default 2L)"
    )
    s.add_argument(
        "--rotations",
        type=int,
        default=4,
        help="K: angles k·360°/K (4: quarter turns, exact); 0: continuous angles",
    )
    add_common_args(s)
    s.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    s.set_defaults(_mtd=simulate_main)

    e = sub.add_parser("estimate", help="estimate the image from a measurement (EM)")
    e.add_argument("measurement", type=Path, help="the measurement (.mrc, one 2-D image)")
    e.add_argument("--size", type=int, default=None, help="L (default: the truth's or prior's)")
    e.add_argument("--sigma", type=float, default=None, help="noise σ (default: estimated jointly)")
    e.add_argument(
        "--prior",
        default="none",
        help="none, gaussian (the analytic N(μ, I) image prior) or a prior folder",
    )
    e.add_argument(
        "--noise-level",
        type=float,
        default=DEFAULT_NOISE_LEVEL,
        help=f"smoothing σ̃ of a learned prior in image units (default {DEFAULT_NOISE_LEVEL})",
    )
    e.add_argument("--t", type=float, default=None, help="diffusion time (overrides σ̃)")
    e.add_argument(
        "--anneal-from",
        type=float,
        default=None,
        help="start σ̃ here and lower it to --noise-level over the γ ramp (e.g. 0.2 for "
        "MNIST, chosen on validation digits); default: fixed σ̃, as the paper",
    )
    e.add_argument("--gamma", choices=("linear", "constant"), default="linear")
    e.add_argument("--gamma-max", type=float, default=1.0, help="final prior weight γ")
    e.add_argument("--grad-steps", type=int, default=10, help="ascent steps per EM iteration")
    e.add_argument("--step-size", type=float, default=1.0, help="preconditioned step μ")
    e.add_argument("--occupancy", choices=("uniform", "learned"), default="uniform")
    e.add_argument("--rotations", type=int, default=4, help="K rotations searched (4)")
    e.add_argument("--max-iter", type=int, default=100, help="EM iteration cap (100)")
    e.add_argument("--tol", type=float, default=1e-5, help="stop at ‖ΔF‖/‖F‖ < tol")
    e.add_argument("--restarts", type=int, default=1, help="random starts tried (1)")
    e.add_argument("--restart-iters", type=int, default=10, help="iterations per start")
    e.add_argument(
        "--init",
        default="random",
        help="random (U[0,1)), mnist-mean (mean training digit) or an L×L .mrc image",
    )
    e.add_argument("--truth", type=Path, default=None, help="true image (.mrc), for errors")
    e.add_argument("--device", default="cpu", help="where a learned prior runs (cpu)")
    add_common_args(e)
    e.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    e.set_defaults(_mtd=estimate_main)


def main(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    return int(args._mtd(args))


# ----------------------------------------------------------------------- files


def write_image_mrc(path: Path, image: torch.Tensor) -> None:
    """One 2-D image as a float32 MRC file (1 Å/px: MTD images carry no physical size)."""
    data = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 1.0


def read_image_mrc(path: Path) -> torch.Tensor:
    """A 2-D image (H, W) float64 from an MRC file holding exactly one image."""
    with read_stack(path, mmap=False) as stack:
        if len(stack) != 1:
            raise InputError(f"{path}: expected one 2-D image, the file holds {len(stack)}")
        return stack.get(0)[0].to(torch.float64)


def mnist_image(split: str, index: int) -> tuple[torch.Tensor, int]:
    """One MNIST image (28, 28) float64 in [0, 1) and its label."""
    from cryoprior.data.images import load_mnist

    images, labels = load_mnist(split)
    require(0 <= index < len(images), f"--index must be in [0, {len(images)}), got {index}")
    return torch.from_numpy(images[index]).to(torch.float64), int(labels[index])


def mnist_mean_image() -> torch.Tensor:
    """The mean image of the MNIST training split (28, 28) float64."""
    from cryoprior.data.images import load_mnist

    images, _ = load_mnist("train")
    return torch.from_numpy(images.mean(0)).to(torch.float64)


def save_measurement_png(path: Path, measurement: torch.Tensor, positions, size: int) -> None:
    """The measurement in grey with the true copies outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(measurement.numpy(), cmap="gray", interpolation="nearest")
    for r, c in positions.tolist():
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), size, size, fill=False, edgecolor="red", lw=0.8))
    ax.set_axis_off()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def save_estimate_png(
    path: Path, result: MTDResult, truth: torch.Tensor | None, title: str = ""
) -> None:
    """Estimate (and truth, best quarter turn) beside the error or log-likelihood curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    est = result.estimate
    panels = [("estimate", est)]
    if truth is not None:
        errs = [float((torch.rot90(est, k) - truth).norm()) for k in range(4)]
        best = torch.rot90(est, int(np.argmin(errs)))
        panels = [("estimate (best quarter turn)", best), ("truth", truth)]
    fig = Figure(figsize=(3.2 * (len(panels) + 1), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, img) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels) + 1, i + 1)
        ax.imshow(img.numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    ax = fig.add_subplot(1, len(panels) + 1, len(panels) + 1)
    it = [h["iteration"] for h in result.history]
    if truth is not None:
        ax.plot(it, result.error_curve())
        ax.set_ylabel("relative error (min over rotations)")
    else:
        ax.plot(it, [h["log_likelihood"] for h in result.history])
        ax.set_ylabel("log-likelihood")
    ax.set_xlabel("EM iteration")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------- actions


def _target(args: argparse.Namespace, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    if args.target == "mnist":
        image, label = mnist_image("test", args.index)
        return image, {"kind": "mnist", "split": "test", "index": args.index, "label": label}
    if args.target == "gaussian":
        mu = gaussian_image_mean(args.size)
        image = sample_gaussian_images(1, mu, generator=generator)[0]
        return image, {"kind": "gaussian", "size": args.size, "draw_seed": args.seed}
    path = Path(args.target)
    if not path.is_file():
        raise InputError(f"--target: {path} is neither mnist, gaussian nor an existing file")
    image = read_image_mrc(path)
    require(image.shape[0] == image.shape[1], f"{path}: the target must be square")
    return image, {"kind": "file", "path": str(path)}


def simulate_main(args: argparse.Namespace) -> int:
    """``cryoprior mtd simulate``."""
    set_threads(args.threads)
    out = output_dir(args.out)
    g = seed_everything(args.seed)
    target, source = _target(args, g)
    snr = math.inf if args.snr == 0 else args.snr
    m = simulate_mtd(
        target,
        snr,
        n=args.n,
        density=args.density,
        separation=args.separation,
        rotations=None if args.rotations == 0 else args.rotations,
        generator=g,
    )
    write_image_mrc(out / "measurement.mrc", m.measurement)
    write_image_mrc(out / "truth.mrc", m.target)
    save_measurement_png(out / "measurement.png", m.measurement, m.positions, m.size)
    write_json(
        out / "simulation.json",
        run_record(
            "mtd simulate",
            args,
            target=source,
            size=m.size,
            n=m.n,
            copies=len(m.positions),
            density=m.density,
            separation=m.separation,
            rotations=m.rotations,
            sigma=m.sigma,
            snr=None if math.isinf(m.snr) else m.snr,
            snr_definition="‖F‖²/(L²σ²)",
            positions_row_col=m.positions.tolist(),
            angles_deg=[math.degrees(a) for a in m.angles.tolist()],
        ),
    )
    if not args.quiet:
        print(f"{len(m.positions)} copies, σ = {m.sigma:.4g}; wrote {out}/measurement.mrc")
    return 0


def _score(args: argparse.Namespace, size: int) -> tuple[Any, dict]:
    if args.prior == "none":
        return None, {"kind": "none"}
    if args.prior == "gaussian":
        return GaussianScore(gaussian_image_mean(size)), {"kind": "gaussian", "size": size}
    from cryoprior.priors import load_prior

    prior = load_prior(args.prior).to(args.device)
    prior.check_compatible(box=size, representation="image")
    if args.t is not None:
        score = PriorScore(prior, args.t)
    else:
        score = PriorScore.from_noise_level(prior, args.noise_level)
    info = {"kind": "learned", "path": str(args.prior), "t": score.t}
    return score, {**info, "noise_level": score.noise_level}


def _size(args: argparse.Namespace, truth: torch.Tensor | None) -> int:
    if args.size is not None:
        return int(args.size)
    if truth is not None:
        return int(truth.shape[-1])
    if args.prior not in ("none", "gaussian"):
        from cryoprior.priors import read_prior_metadata

        return int(read_prior_metadata(args.prior).shape[-1])
    raise InputError("give the target size with --size (or --truth, or a prior folder)")


def _init(args: argparse.Namespace, size: int) -> torch.Tensor | None:
    if args.init == "random":
        return None
    if args.init == "mnist-mean":
        require(size == 28, f"--init mnist-mean needs --size 28, got {size}")
        return mnist_mean_image()
    image = read_image_mrc(Path(args.init))
    require(tuple(image.shape) == (size, size), f"--init must be {size}×{size}")
    return image


def estimate_main(args: argparse.Namespace) -> int:
    """``cryoprior mtd estimate``."""
    set_threads(args.threads)
    g = seed_everything(args.seed)
    measurement = read_image_mrc(args.measurement)
    truth = read_image_mrc(args.truth) if args.truth is not None else None
    size = _size(args, truth)
    require(
        min(measurement.shape) >= size,
        f"{args.measurement}: the measurement is smaller than one {size}×{size} patch",
    )
    score, prior_info = _score(args, size)
    config = EMConfig(
        rotations=args.rotations,
        grad_steps=args.grad_steps,
        step_size=args.step_size,
        gamma=args.gamma,
        gamma_max=args.gamma_max,
        anneal_from=args.anneal_from if score is not None else None,
        occupancy=args.occupancy,
        max_iter=args.max_iter,
        tol=args.tol,
        restarts=args.restarts,
        restart_iters=args.restart_iters,
    )
    out = output_dir(args.out)
    result = approximate_em(
        measurement,
        size,
        sigma=args.sigma,
        init=_init(args, size),
        score=score,
        config=config,
        truth=truth,
        generator=g,
        show_progress=not args.quiet,
    )
    write_image_mrc(out / "estimate.mrc", result.estimate)
    summary: dict[str, Any] = {
        "size": size,
        "sigma": result.sigma,
        "sigma_estimated": args.sigma is None,
        "prior": prior_info,
        "em": result.config,
        "iterations": result.iterations,
        "converged": result.converged,
        "seconds_per_iteration": result.seconds_per_iteration(),
        "restart_log_likelihoods": result.restart_log_likelihoods,
        "history": result.history,
    }
    if truth is not None:
        summary["error"] = result.error_curve()[-1]
        summary["aligned_error"] = aligned_error(result.estimate, truth, args.rotations)
    write_json(out / "estimate.json", run_record("mtd estimate", args, **summary))
    title = f"prior: {prior_info['kind']}, occupancy: {args.occupancy}"
    save_estimate_png(out / "estimate.png", result, truth, title)
    if not args.quiet:
        tail = f", error {summary['error']:.3f}" if truth is not None else ""
        print(f"{result.iterations} EM iterations{tail}; wrote {out}/estimate.mrc")
    return 0
