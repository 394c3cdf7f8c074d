"""Draw samples from a trained prior and write them in physical units.

Images go to a PNG grid (-o samples.png) or an MRC stack (-o samples.mrcs); volumes to MRC
maps (one file per sample: samples_000.mrc, ... when -n > 1); point clouds to PDB files
(Cα records, real nodes only). A JSON file beside the output records the prior, the
sampler, the steps, the seed and the command line.

examples:
  cryoprior sample runs/digits/prior -n 16 -o digits.png
  cryoprior sample runs/maps/prior -n 2 --sampler ode --steps 40 -o map.mrc
  cryoprior sample runs/calpha/prior -n 4 --n-nodes 50 -o chain.pdb --seed 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cryoprior import __version__
from cryoprior.cli._common import add_common_args
from cryoprior.core.containers import ImageStack, Volume
from cryoprior.core.errors import InputError
from cryoprior.core.files import write_text_atomic
from cryoprior.core.runtime import set_threads
from cryoprior.diffusion import SAMPLERS
from cryoprior.priors import Prior, load_prior
from cryoprior.train.config import command_line
from cryoprior.train.plots import write_image_grid

SUFFIXES = {"image": (".png", ".mrcs"), "volume": (".mrc",), "points": (".pdb",)}


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior sample``."""
    parser.add_argument("prior", type=Path, help="prior folder (or .zip/.tar of one)")
    parser.add_argument("-n", "--num", type=int, default=16, help="number of samples")
    parser.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default="ddim",
        help="reverse-diffusion sampler (default ddim)",
    )
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    parser.add_argument(
        "--n-nodes",
        type=int,
        default=None,
        help="point clouds: real nodes per sample (default: all)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="samples drawn at once (default: all)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_common_args(parser)
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="output file: .png/.mrcs (images), .mrc (volumes), .pdb (points)",
    )


def output_paths(out: Path, n: int) -> list[Path]:
    """One path per sample for per-sample formats: ``out`` itself when n == 1, else
    ``stem_000.ext``, ``stem_001.ext``, ..."""
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(n)]


def write_samples(
    prior: Prior, samples: torch.Tensor, out: Path, mask: torch.Tensor | None = None
) -> list[Path]:
    """Write physical-unit ``samples`` (n, *prior.shape) to ``out`` in the format its suffix
    names; returns the files written."""
    rep = prior.representation
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES[rep]:
        raise InputError(
            f"a {rep} prior writes {' or '.join(SUFFIXES[rep])} files, not {out.name!r}"
        )
    n = samples.shape[0]
    if not bool(torch.isfinite(samples).all()):
        raise InputError(
            "the sampler produced non-finite values; try another --sampler or more "
            "--steps (an undertrained prior can diverge)"
        )
    if rep == "image":
        if suffix == ".png":
            title = f"{n} samples of {prior.metadata.data.get('summary', {}).get('kind', 'prior')}"
            return [write_image_grid(samples[:, 0], out, title=title)]
        from cryoprior.io.mrc import write_stack

        write_stack(out, ImageStack(samples[:, 0].float(), prior.pixel_size))
        return [out]
    if rep == "volume":
        from cryoprior.io.mrc import write_map

        paths = output_paths(out, n)
        for p, x in zip(paths, samples):
            write_map(p, Volume(x[0].float(), prior.pixel_size))
        return paths
    from cryoprior.io.structure import write_pdb

    if float(samples.abs().max()) > 999.0:
        raise InputError(
            f"sampled coordinates reach {float(samples.abs().max()):.3g} Å, beyond what a PDB "
            "file holds; the prior may be undertrained or the sampler diverged (try "
            "--sampler ddpm or more --steps)"
        )
    paths = output_paths(out, n)
    for i, (p, x) in enumerate(zip(paths, samples)):
        real = x if mask is None else x[mask[i] > 0]
        write_pdb(p, real.double().numpy())
    return paths


def main(args: argparse.Namespace) -> int:
    """Run ``cryoprior sample``; returns the exit status."""
    set_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available; use --device cpu")
    prior = load_prior(args.prior, device=args.device)
    default = {"image": "samples.png", "volume": "samples.mrc", "points": "samples.pdb"}
    out = args.out or Path(default[prior.representation])
    if args.n_nodes is not None and prior.representation != "points":
        raise InputError("--n-nodes applies to point-cloud priors only")
    kwargs = {} if args.eta is None else {"eta": args.eta}
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    samples = prior.sample(
        args.num,
        sampler=args.sampler,
        steps=args.steps,
        generator=generator,
        n_nodes=args.n_nodes,
        batch_size=args.batch_size,
        device=args.device,
        show_progress=not args.quiet,
        **kwargs,
    ).cpu()
    mask = None
    if prior.representation == "points" and args.n_nodes is not None:
        mask = prior.node_mask(args.num, args.n_nodes)
    files = write_samples(prior, samples, out, mask)
    record = {
        "prior": str(args.prior),
        "sampler": args.sampler,
        "steps": args.steps,
        "seed": args.seed,
        "n": args.num,
        "n_nodes": args.n_nodes,
        "eta": args.eta,
        "files": [str(f) for f in files],
        "command": command_line(),
        "cryoprior_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(out.with_name(out.stem + ".json"), json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} file(s): {files[0]}" + (" ..." if len(files) > 1 else ""))
    return 0
