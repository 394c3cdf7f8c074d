"""Refine particle poses and a 3-D map from a STAR file (gold-standard auto-refine).

The particles are split into two independent half sets; each is aligned against its own
reference — a global search over SO(3) × shifts first, then local searches whose angular
step follows the resolution — and reconstructed, and the half maps' FSC sets the next
search's resolution limit (as RELION's auto-refine). The poses in the STAR file, if any,
are ignored.

--initial-model MAP: the starting map (any scale; resampled to the particles' pixel size
and box), low-passed to --initial-lowpass Å (default 30). --initial-model none: an ab
initio start (stochastic EM with soft assignment at 40 → 15 Å on random subsets; the hand
is arbitrary). --prior [PRIOR] (with --mass-kda or --sequence): before every pose search,
each half map is denoised by the density-map prior on its own (Blush-style).

Writes, in -o: iter_NNN/ (half1/half2.mrc, the references ref1/ref2.mrc, particles.star,
poses.npz) after every iteration, so a killed run resumes when the same command is run
again; at the end map.mrc, half1.mrc, half2.mrc, run_data.star (RELION 3.1, estimated
poses), fsc.png (the half maps' FSC per iteration), fsc.json and refine.json.
Under torchrun each process searches and back-projects its own shard of the particles.

  cryoprior refine particles.star --initial-model ref.mrc -o refine
  cryoprior refine particles.star --initial-model none -o refine_abinitio
  torchrun --nproc_per_node 2 -m cryoprior.cli.main refine particles.star --initial-model ref.mrc
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cryoprior.cli._common import add_common_args, output_dir, run_record, write_json
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError, require
from cryoprior.core.runtime import set_threads
from cryoprior.io.mrc import read_map, write_map
from cryoprior.metrics.fsc import FSCResult, plot_fsc, resolution_from_curve
from cryoprior.physics.source import ParticleSource


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior refine``."""
    p.add_argument("particles", help="RELION STAR file of the particles (poses not needed)")
    p.add_argument(
        "--initial-model",
        required=True,
        metavar="MAP|none",
        help="starting map (.mrc), or 'none' for an ab initio start",
    )
    p.add_argument(
        "--initial-lowpass", type=float, default=30.0, help="Å, low-pass of the start (30)"
    )
    p.add_argument("--iterations", type=int, default=12, help="most iterations (default 12)")
    p.add_argument("--global-step", type=float, default=7.5, help="SO(3) grid step, degrees (7.5)")
    p.add_argument("--max-shift", type=float, default=None, help="Å (default 4 px)")
    p.add_argument(
        "--soft-k",
        type=int,
        default=1,
        help="global iterations reconstruct each particle from its K best poses, weighted "
        "by their likelihood (RELION's expectation, truncated); 1 = best pose only (1)",
    )
    p.add_argument(
        "--particle-radius", type=float, default=None, help="Å, for the angular step (0.3 box)"
    )
    p.add_argument(
        "--mask-radius",
        type=float,
        default=None,
        help="Å, soft spherical solvent mask of the references and the FSC (0.4 box)",
    )
    p.add_argument(
        "--prior",
        nargs="?",
        const="volume_native",
        default=None,
        help="denoise each half's reference with a density-map prior before every search "
        "(Blush-style; bare: volume_native); measured in benchmarks/results/refine.md",
    )
    p.add_argument("--mass-kda", type=float, help="molecular mass (kDa), with --prior")
    p.add_argument("--sequence", help="protein sequence or FASTA file, with --prior")
    p.add_argument("--abinitio-subset", type=int, default=1000, help="particles per round")
    p.add_argument("--batch-size", type=int, default=2048, help="images per search batch")
    p.add_argument("-o", "--out", default="refine", help="output folder")
    add_common_args(p)


def _initial_model(path: str, source: ParticleSource) -> torch.Tensor:
    """The starting map on the particles' grid (Fourier-resampled, then cropped/padded)."""
    from cryoprior.physics.degrade import fourier_resize
    from cryoprior.physics.projection import crop_centred, pad_centred

    vol = read_map(path)
    data = vol.data.to(torch.float64)
    if len(set(data.shape)) != 1:
        raise InputError(f"{path}: the initial model is {tuple(data.shape)}, not a cube")
    box, px = source.box, source.pixel_size
    if abs(vol.pixel_size - px) > 1e-3 * px:
        size = int(round(data.shape[-1] * vol.pixel_size / px))
        require(size >= 8, f"{path}: at {px} Å/px the initial model would be {size} px wide")
        data = fourier_resize(data, (size,) * 3, ndim=3)
    if data.shape[-1] > box:
        data = crop_centred(data, box, 3)
    elif data.shape[-1] < box:
        data = pad_centred(data, box, 3)
    if not bool(torch.isfinite(data).all()):
        raise InputError(f"{path}: the initial model has NaN or infinite voxels")
    return data


def _curve(values: list[float], box: int, pixel_size: float) -> FSCResult:
    """An :class:`FSCResult` from a recorded curve (shells 0 … D//2)."""
    fsc = np.asarray(values, dtype=np.float64)
    freq = np.arange(fsc.size) / (box * pixel_size)
    r1, n1 = resolution_from_curve(freq, fsc, 0.143)
    r5, n5 = resolution_from_curve(freq, fsc, 0.5)
    return FSCResult(freq, fsc, np.zeros(fsc.size), pixel_size, box, 3, r1, r5, n1, n5)


def main(args: argparse.Namespace) -> int:
    """Run the refinement (or ab initio + refinement) and write its outputs."""
    from cryoprior.cli.reconstruct_calpha import read_sequence
    from cryoprior.io.star import write_particles
    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.solvers.abinitio import AbInitioConfig, ab_initio
    from cryoprior.solvers.refine import RefineConfig, refine
    from cryoprior.train import distributed as ddp

    set_threads(args.threads)
    require(args.iterations >= 1, f"--iterations must be >= 1, got {args.iterations}")
    source = ParticleSource.from_star(args.particles)
    mass = protein_mass_kda(read_sequence(args.sequence)) if args.sequence else args.mass_kda
    prior = None
    if args.prior is not None:
        from cryoprior.priors import load_prior
        from cryoprior.solvers.prior_reconstruction import check_volume_prior

        if mass is None:
            raise InputError("--prior needs the molecule's mass: give --mass-kda or --sequence")
        prior = load_prior(args.prior)
        check_volume_prior(prior)
    from_scratch = args.initial_model.lower() == "none"
    initial = None if from_scratch else _initial_model(args.initial_model, source)
    env = ddp.setup(torch.device("cpu"))
    log = print if (env.is_main and not args.quiet) else (lambda _m: None)
    out = output_dir(args.out)
    try:
        abinitio = None
        if from_scratch:
            state = out / "abinitio.mrc"
            if state.is_file():
                initial = read_map(state).data.double()
                log(f"using the ab initio model of an earlier run: {state}")
            else:
                initial, abinitio = ab_initio(
                    source,
                    AbInitioConfig(subset=args.abinitio_subset, seed=args.seed),
                    log=log,
                )
                if env.is_main:
                    write_map(state, Volume(initial.float(), source.pixel_size))
        lowpass = args.initial_lowpass
        if from_scratch:  # the ab initio model is good to its last band
            lowpass = min(lowpass, AbInitioConfig().bands[-1])
        config = RefineConfig(
            iterations=args.iterations,
            initial_lowpass=lowpass,
            global_step=args.global_step,
            max_shift=args.max_shift,
            particle_radius=args.particle_radius,
            mask_radius=args.mask_radius,
            soft_k=args.soft_k,
            image_batch=args.batch_size,
            seed=args.seed,
        )
        result = refine(
            source,
            initial,
            out,
            config,
            prior=prior,
            mass_kda=mass,
            log=log,
            show_progress=env.is_main and not args.quiet,
        )
    finally:
        ddp.cleanup(env)
    if not env.is_main:
        return 0
    px = source.pixel_size
    for name, data in (("map", result.full), ("half1", result.half1), ("half2", result.half2)):
        write_map(out / f"{name}.mrc", Volume(data.float(), px))
    write_particles(out / "run_data.star", result.particles)
    curves = {
        f"iteration {r.iteration}": _curve(r.fsc_curve, source.box, px) for r in result.history
    }
    plot_fsc(curves, out / "fsc.png", title="Half-map FSC per iteration")
    write_json(out / "fsc.json", {"iterations": [vars(r) for r in result.history]})
    write_json(
        out / "refine.json",
        run_record(
            "refine",
            args,
            n_particles=len(source),
            box=source.box,
            pixel_size=px,
            resolution_0143_halves=result.resolution,
            iterations=len(result.history),
            resumed=result.resumed,
            abinitio=abinitio,
            processes=env.world_size,
            seconds=sum(r.seconds for r in result.history),
        ),
    )
    print(
        f"refined {len(source)} particles in {len(result.history)} iterations -> {out}/map.mrc, "
        f"{out}/run_data.star; half-map FSC 0.143 {result.resolution:.2f} Å"
    )
    return 0
