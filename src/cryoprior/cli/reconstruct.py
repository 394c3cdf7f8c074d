"""Reconstruct a 3-D map from particles with known poses (a RELION STAR file).

Default method: Wiener-filtered direct Fourier inversion (back-projection) with CTF
correction. One pass over the images fills two half-set grids (random half split by
--seed); the half maps' FSC gives the per-shell SSNR used to Wiener-filter the full map
(as RELION does). Writes map.mrc, half1.mrc, half2.mrc, fsc_halves.json/.png and
reconstruct.json. Images are streamed from disk in batches. Under torchrun each process
streams its own shard of the particles, the Fourier sums are added over the processes
(gloo on CPU, NCCL with --device cuda: one GPU per process) and rank 0 writes the same
files one process would; the half split depends only on --seed.

With --prior [PRIOR] (a density-map diffusion prior; --prior alone takes the shipped
native-resolution prior volume_native, 1.5 Å/px, any box): diffusion posterior sampling
at the known poses. A fully convolutional prior (volume_native) works on the particles'
own box, Fourier-cropped or -padded to its pixel size (within limits: the error says what
to do); a fixed-box prior (volume_32, 32³ at 3 Å/px, the coarse one) needs the
particles to span its physical box. The intensity scale comes from the images' DC terms
and the molecule's mass (--mass-kda or --sequence), or is given (--intensity-scale).
Writes map.mrc (posterior mean) and std.mrc (per-voxel spread over --samples samples;
an even number are drawn in antithetic pairs unless --independent-samples) on
the particles' box and pixel size, sample_NNN.mrc with --write-samples, and
reconstruct.json. Guidance pigdm (default), dps_x0, pigdm_dc or dps; 30 DDIM steps by
default.

With --prior PRIOR a point-cloud (Cα) diffusion prior (e.g. calpha_prior): the Cα cloud of
a segment of N residues (--n-residues, or --sequence), each residue a Gaussian blob of
--blob-sigma Å, by posterior sampling at the known poses, CTFs and shifts (guidance
dps_x0, the default, or dps; 50 DDPM steps by default; at most the first --max-images
particles). Writes model.pdb (CA atoms of the matched posterior mean, in Å with 0 at the
box centre: the frame of the maps written here), samples.pdb (one MODEL per sample) and
reconstruct.json (with the per-residue spread over the samples).

  cryoprior reconstruct particles.star -o rec
  torchrun --nproc_per_node 4 -m cryoprior.cli.main reconstruct particles.star -o rec
  cryoprior reconstruct particles.star --prior --mass-kda 12 --samples 4 -o rec_prior
  cryoprior reconstruct particles.star --prior calpha_prior --n-residues 58 -o rec_ca
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

from cryoprior.cli._common import add_common_args, output_dir, run_record, write_json
from cryoprior.cli.reconstruct_calpha import (
    DEFAULT_CALPHA_STEPS,
    add_calpha_args,
    read_sequence,
    run_calpha,
)
from cryoprior.cli.reconstruct_mfn import add_mfn_args, run_mfn
from cryoprior.core.containers import Volume
from cryoprior.core.errors import require
from cryoprior.core.runtime import set_threads
from cryoprior.io.mrc import write_map
from cryoprior.metrics.fsc import plot_fsc
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import reconstruct_source
from cryoprior.solvers.dps import GUIDANCES
from cryoprior.solvers.prior_reconstruction import DEFAULT_GUIDANCE

if TYPE_CHECKING:
    from cryoprior.train.distributed import DistEnv

#: the prior of a bare --prior
DEFAULT_VOLUME_PRIOR = "volume_native"
#: defaults of --steps and --guidance with a density-map prior
VOLUME_STEPS = 20
VOLUME_GUIDANCE = DEFAULT_GUIDANCE


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior reconstruct``."""
    p.add_argument("star", help="RELION particle STAR file with poses (and CTF)")
    p.add_argument(
        "--method",
        choices=["wiener", "mfn"],
        default="wiener",
        help="reconstruction method: wiener back-projection (default) or mfn (coordinate network "
        "fitted coarse to fine with pose refinement)",
    )
    p.add_argument(
        "--ssnr",
        default="fsc",
        help="Wiener regulariser: 'fsc' (per-shell SSNR from the half maps; "
        "default) or a number (constant per-image SSNR)",
    )
    p.add_argument("--pad", type=float, default=2.0, help="Fourier oversampling (default 2)")
    p.add_argument("--batch-size", type=int, default=512, help="images read per batch")
    p.add_argument(
        "--device",
        default="cpu",
        help="device of the Wiener back-projection: cpu (default), cuda, cuda:N or auto; "
        "under torchrun with CUDA each process takes GPU LOCAL_RANK",
    )
    g = p.add_argument_group("prior-guided reconstruction (--prior)")
    g.add_argument(
        "--prior",
        nargs="?",
        const=DEFAULT_VOLUME_PRIOR,
        help="prior folder (prior.json + weights) or shipped name: a density-map prior "
        f"(writes map.mrc; --prior alone: {DEFAULT_VOLUME_PRIOR}, 1.5 Å/px, any box; "
        "volume_32: the coarse 32³ at 3 Å/px one) or a point-cloud Cα prior (writes "
        "model.pdb; needs --n-residues or --sequence)",
    )
    g.add_argument("--mass-kda", type=float, help="molecular mass of the particle (kDa)")
    g.add_argument("--sequence", help="protein sequence (one-letter) or a FASTA file")
    g.add_argument(
        "--intensity-scale", type=float, help="measurement units per prior unit (skips estimate)"
    )
    g.add_argument("--samples", type=int, default=1, help="posterior samples (default 1)")
    g.add_argument(
        "--steps",
        type=int,
        help=f"reverse steps (default {VOLUME_STEPS} DDIM for a density-map prior, "
        f"{DEFAULT_CALPHA_STEPS} DDPM for a Cα prior)",
    )
    g.add_argument(
        "--guidance",
        choices=GUIDANCES,
        help=f"DPS rule (default {VOLUME_GUIDANCE}; a Cα prior takes dps_x0 (default) or dps)",
    )
    g.add_argument("--eta", type=float, default=0.5, help="DDIM eta (default 0.5)")
    g.add_argument(
        "--prior-spectrum",
        choices=("protein", "white"),
        help="prior variance of a density-map prior's guidance: the expected spectrum of a "
        "protein of the given mass (default when the mass is known) or one white variance",
    )
    g.add_argument(
        "--independent-samples",
        action="store_true",
        help="draw a density-map prior's samples independently (default: in antithetic "
        "pairs when --samples is even: a pair's noise draws are opposite, and the mean of "
        "pairs estimates the posterior mean far better)",
    )
    g.add_argument("--write-samples", action="store_true", help="write every sample's map")
    add_calpha_args(g)
    p.add_argument("-o", "--out", default="reconstruction", help="output folder")
    add_mfn_args(p)
    add_common_args(p)


def main(args: argparse.Namespace) -> int:
    """Reconstruct and write the maps and the half-map FSC."""
    set_threads(args.threads)
    source = ParticleSource.from_star(args.star)
    source.require_poses("reconstruction")
    from cryoprior.train.distributed import detect

    require(
        not detect().distributed or (args.prior is None and args.method == "wiener"),
        "only the Wiener back-projection (no --prior, --method wiener) runs under torchrun; "
        "run the others as one process",
    )
    if args.prior is not None:
        return _main_prior(args, source)
    if args.method == "mfn":
        summary = run_mfn(args, source, output_dir(args.out))
        print(f"MFN reconstruction of {len(source)} particles -> {summary.get('map', args.out)}")
        return 0
    return _main_wiener(args, source)


def _wiener_device(requested: str, env: DistEnv) -> torch.device:
    """The device of this process (GPU LOCAL_RANK under torchrun with CUDA)."""
    from cryoprior.train.distributed import training_device

    require(
        not requested.startswith("cuda") or torch.cuda.is_available(),
        f"--device {requested}: CUDA is not available; use --device cpu",
    )
    return training_device(requested, env)


def _main_wiener(args: argparse.Namespace, source: ParticleSource) -> int:
    """Wiener back-projection, sharded over the processes under torchrun; rank 0 writes."""
    from cryoprior.train import distributed as ddp

    ssnr = args.ssnr if args.ssnr == "fsc" else float(args.ssnr)
    device = _wiener_device(args.device, ddp.detect())
    env = ddp.setup(device)
    try:
        result = reconstruct_source(
            source,
            ssnr=ssnr,
            pad=args.pad,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            distributed=env.distributed,
            show_progress=not args.quiet and env.is_main,
        )
    finally:
        ddp.cleanup(env)
    if not env.is_main:
        return 0
    out = output_dir(args.out)
    px = source.pixel_size
    for name, data in (("map", result.full), ("half1", result.half1), ("half2", result.half2)):
        write_map(out / f"{name}.mrc", Volume(data.float(), px))
    plot_fsc(
        {"half maps": result.fsc_halves},
        out / "fsc_halves.png",
        title="Gold-standard FSC (independent half maps)",
    )
    write_json(out / "fsc_halves.json", result.fsc_halves.to_dict())
    write_json(
        out / "reconstruct.json",
        run_record(
            "reconstruct",
            args,
            n_particles=len(source),
            box=source.box,
            pixel_size=px,
            resolution_0143_halves=result.fsc_halves.resolution_0143,
            processes=env.world_size,
            device=str(device),
            seconds=result.seconds,
        ),
    )
    print(
        f"reconstructed {len(source)} particles -> {out}/map.mrc; half-map "
        f"{result.fsc_halves.describe()}"
    )
    return 0


def _sequence_mass(text: str) -> float:
    """Mass (kDa) of a sequence given inline or as a FASTA file."""
    from cryoprior.physics.composition import protein_mass_kda

    return protein_mass_kda(read_sequence(text))


def _main_prior(args: argparse.Namespace, source: ParticleSource) -> int:
    """Posterior sampling with a density-map prior (writes mean, spread and a record), or
    with a point-cloud prior (:func:`~cryoprior.cli.reconstruct_calpha.run_calpha`)."""
    from cryoprior.priors import load_prior
    from cryoprior.solvers.prior_reconstruction import (
        check_volume_prior,
        reconstruct_with_prior,
    )

    require(args.samples >= 1, f"--samples must be >= 1, got {args.samples}")
    require(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    prior = load_prior(args.prior)
    if prior.representation == "points":
        return run_calpha(args, source, prior)
    if args.steps is None:
        args.steps = VOLUME_STEPS
    if args.guidance is None:
        args.guidance = VOLUME_GUIDANCE
    check_volume_prior(prior)
    mass = args.mass_kda
    if args.sequence is not None:
        mass = _sequence_mass(args.sequence)
    result = reconstruct_with_prior(
        source,
        prior,
        mass_kda=mass,
        intensity=args.intensity_scale,
        guidance=args.guidance,
        n_steps=args.steps,
        n_samples=args.samples,
        eta=args.eta,
        spectrum=args.prior_spectrum,
        antithetic=False if args.independent_samples else None,
        pad=args.pad,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    out = output_dir(args.out)
    mean, std, samples = result.on_particle_grid()
    px = source.pixel_size
    write_map(out / "map.mrc", Volume(mean.float(), px))
    write_map(out / "std.mrc", Volume(std.float(), px))
    if args.write_samples:
        for i, sample in enumerate(samples):
            write_map(out / f"sample_{i:03d}.mrc", Volume(sample.float(), px))
    write_json(
        out / "reconstruct.json",
        run_record(
            "reconstruct",
            args,
            method="prior",
            n_particles=len(source),
            box=int(mean.shape[-1]),
            pixel_size=px,
            prior_grid={"box": int(result.mean.shape[-1]), "pixel_size": result.pixel_size},
            grid=result.info["grid"],
            noise_sigma=result.info["noise_sigma"],
            intensity_scale=result.scale.to_dict(),
            likelihood_calibration=result.info["kappa"],
            dps=result.dps.config,
            seconds=result.seconds,
        ),
    )
    pairs = " (antithetic pairs)" if result.info["antithetic"] else ""
    print(
        f"posterior mean of {args.samples} sample(s){pairs} from {len(source)} particles "
        f"({result.info['grid']}) -> {out}/map.mrc, spread {out}/std.mrc; "
        f"{result.seconds['total']:.0f} s"
    )
    return 0
