"""Evaluate the MNIST diffusion prior: held-out denoising loss and a grid of DDIM samples.

The prior was trained on the official MNIST *train* split only. Here its denoising loss
(the training objective, cosine VP schedule, v target) is measured with the same fixed
noise draws on 2,000 images of each of the train, validation and test splits: the test
figure is the held-out loss; a train/test gap would show over-fitting. It also writes a
grid of 64 DDIM samples (50 steps, η = 0).

    python benchmarks/mnist_prior.py --prior src/cryoprior/assets/priors/mnist
Writes benchmarks/results/mnist_prior.{json,md} and mnist_samples.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cryoprior.data.images import mnist_dataset
from cryoprior.diffusion import dsm_loss
from cryoprior.priors import load_prior
from cryoprior.train.plots import write_image_grid

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def split_loss(prior, split: str, n: int, seed: int, repeats: int) -> tuple[float, float]:
    """Mean and standard error of the per-image DSM loss on ``n`` images of ``split``."""
    data = mnist_dataset(split)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    x0 = torch.stack([data[int(i)] for i in idx])
    diff = prior.metadata.diffusion
    losses = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(seed + 1 + r)  # same noise draws for every split
        for start in range(0, n, 250):
            loss, _ = dsm_loss(
                prior.denoiser,
                x0[start : start + 250],
                generator=g,
                target=diff.get("target") or diff.get("prediction", "eps"),
                t_sampling="stratified",
            )
            losses.append(loss)
    v = torch.cat(losses)
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="src/cryoprior/assets/priors/mnist")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    prior.denoiser.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = {
        s: split_loss(prior, s, args.n, 0, args.repeats) for s in ("train", "validation", "test")
    }
    t_loss = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = prior.sample(
        64, sampler="ddim", steps=args.steps, generator=torch.Generator().manual_seed(0)
    )
    t_sample = time.perf_counter() - t0
    write_image_grid(
        samples.clamp(0, 1),
        out / "mnist_samples.png",
        ncols=8,
        title=f"MNIST prior: 64 DDIM samples ({args.steps} steps, η = 0)",
    )
    meta = prior.metadata
    result = {
        "prior": args.prior,
        "trained_on": "MNIST official train split (50,000 images)",
        "training_command": meta.command,
        "network": meta.network,
        "diffusion": meta.diffusion,
        "loss": {s: {"mean": m, "sem": e} for s, (m, e) in rows.items()},
        "n_images_per_split": args.n,
        "noise_draws_per_image": args.repeats,
        "sampling_seconds_64_images": t_sample,
        "loss_seconds": t_loss,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (out / "mnist_prior.json").write_text(json.dumps(result, indent=2, default=str))
    md = [
        "# MNIST diffusion prior",
        "",
        "Denoising loss (the training objective; per image, stratified t, the same noise "
        f"draws on every split; {args.n} images × {args.repeats} draws per split). "
        "Trained on the train split only; the test split is held out.",
        "",
        "| split | loss (mean ± s.e.) |",
        "|---|---|",
    ]
    md += [f"| {s} | {m:.4f} ± {e:.4f} |" for s, (m, e) in rows.items()]
    md += [
        "",
        f"64 DDIM samples ({args.steps} steps): `mnist_samples.png`, "
        f"{t_sample:.1f} s on {args.threads} CPU threads.",
    ]
    (out / "mnist_prior.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
