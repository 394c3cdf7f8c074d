"""Train a diffusion prior from a config file (TOML or JSON) and write it as a prior folder.

The config has the sections [data], [network], [diffusion], [train] and [output] (see
configs/*.toml). Any value can be overridden with --set SECTION.KEY=VALUE (VALUE is read
as JSON, else as a string). The run folder receives config.json (the resolved config,
cryoprior version, command line, time, host), metrics.jsonl, loss.png,
checkpoints/last.pt and, at the end, the prior folder (weights.safetensors + prior.json).

examples:
  cryoprior train configs/digits.toml
  cryoprior train configs/mnist.toml --set train.steps=2000 --set train.lr=1e-4 --out runs/m
  cryoprior train configs/mnist.toml --out runs/m --resume      # continue a killed run
  torchrun --nproc_per_node 2 -m cryoprior.cli.main train configs/mnist.toml   # DDP
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryoprior.train.config import command_line, load_run_config
from cryoprior.train.trainer import train_prior


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior train``."""
    parser.add_argument("config", type=Path, help="run config (.toml or .json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. train.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: output.dir, else runs/<config name>)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run folder's last checkpoint"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``cryoprior train``; returns the exit status."""
    overrides = [*args.overrides, *(["train.progress=false"] if args.quiet else [])]
    config = load_run_config(args.config, overrides)
    out = args.out or Path(config["output"]["dir"] or Path("runs") / args.config.stem)
    run = train_prior(config, out, resume=args.resume, command=command_line())
    if run.prior_dir is not None:
        s = run.summary
        loss = f"train loss {s.train_loss:.4g}" if s.train_loss is not None else ""
        if s.val_loss is not None:
            loss += f", validation loss {s.val_loss:.4g}"
        print(f"trained {s.step} steps in {s.elapsed:.0f} s ({loss}); prior: {run.prior_dir}")
    return 0
