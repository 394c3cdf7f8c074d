"""Denoise two half maps with a density-map prior (posterior sampling), with baselines.

The half maps' difference gives the noise power per Fourier shell of their average;
the prior's posterior given that average (a Fourier-diagonal Gaussian likelihood, see
cryoprior.solvers.halfmap) is sampled at the prior's pixel size on the maps' own box,
and the mean and per-voxel spread go back to the input's box, pixel size and origin.

Writes, in -o: denoised.mrc (posterior mean), denoised_std.mrc (spread), lowpass.mrc
(average low-passed at the half maps' FSC 0.143), postprocess.mrc (RELION-postprocess
style: FSC-weighted, Guinier B sharpened, low-passed), with --mask also
denoised_masked.mrc; fsc_halves.png; denoise.json (half-map FSC resolutions, the
B-factor, the intensity scale, timings, the run's arguments).

With --angles particles.star (the particles behind the halves, with their poses), the
Fourier regions that no view measured (the missing cone of a preferred orientation) get
no likelihood weight and are filled by the prior; the noise spectrum is measured on the
measured region only.

  cryoprior denoise half1.mrc half2.mrc --sequence seq.fasta -o den
  cryoprior denoise half1.mrc half2.mrc --mass-kda 40 --angles run_data.star -o den
"""

from __future__ import annotations

import argparse

import torch

from cryoprior.cli._common import add_common_args, output_dir, run_record, write_json
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError, require
from cryoprior.core.runtime import set_threads
from cryoprior.io.mrc import read_map, read_map_origin, write_map
from cryoprior.metrics.fsc import fsc, plot_fsc
from cryoprior.solvers.dps import GUIDANCES
from cryoprior.solvers.prior_reconstruction import DEFAULT_GUIDANCE

DEFAULT_PRIOR = "volume_native"


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior denoise``."""
    p.add_argument("half1", help="first half map (.mrc)")
    p.add_argument("half2", help="second half map (.mrc), same box and pixel size")
    p.add_argument("--mask", help="mask (.mrc, same box): masked FSC and denoised_masked.mrc")
    p.add_argument(
        "--prior",
        default=DEFAULT_PRIOR,
        help=f"density-map prior folder or shipped name (default {DEFAULT_PRIOR})",
    )
    p.add_argument(
        "--angles",
        metavar="STAR",
        help="the particles behind the half maps (RELION STAR with poses): Fourier regions "
        "no view measured (a missing cone from preferred orientation) are left to the prior",
    )
    p.add_argument("--mass-kda", type=float, help="molecular mass in the box (kDa)")
    p.add_argument("--sequence", help="protein sequence (one-letter) or a FASTA file")
    p.add_argument(
        "--intensity-scale", type=float, help="map units per prior unit (skips the estimate)"
    )
    p.add_argument("--samples", type=int, default=4, help="posterior samples (default 4)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument(
        "--guidance",
        choices=GUIDANCES,
        default=DEFAULT_GUIDANCE,
        help=f"DPS rule (default {DEFAULT_GUIDANCE})",
    )
    p.add_argument(
        "--prior-spectrum",
        choices=("white", "protein"),
        default="white",
        help="prior variance of the guidance: one white variance (default) or the expected "
        "spectrum of a protein of the given mass (needs --mass-kda or --sequence)",
    )
    p.add_argument("--pixel-size", type=float, help="override the headers' pixel size (Å)")
    p.add_argument("-o", "--out", default="denoise", help="output folder")
    add_common_args(p)


def _read_inputs(args: argparse.Namespace) -> tuple[Volume, Volume, Volume | None]:
    h1 = read_map(args.half1, pixel_size=args.pixel_size)
    h2 = read_map(args.half2, pixel_size=args.pixel_size)
    if tuple(h1.data.shape) != tuple(h2.data.shape):
        raise InputError(
            f"{args.half1} is {tuple(h1.data.shape)} but {args.half2} is "
            f"{tuple(h2.data.shape)}: give the two halves of one refinement"
        )
    if abs(h1.pixel_size - h2.pixel_size) > 1e-3 * h1.pixel_size:
        raise InputError(
            f"{args.half1} has {h1.pixel_size:.4f} Å/px but {args.half2} has "
            f"{h2.pixel_size:.4f} Å/px: give the two halves of one refinement "
            "(or --pixel-size if a header is wrong)"
        )
    if len(set(h1.data.shape)) != 1:
        raise InputError(
            f"the half maps are {tuple(h1.data.shape)}, not cubic: pad them to a cube "
            "first (e.g. relion_image_handler --new_box)"
        )
    mask = None
    if args.mask is not None:
        mask = read_map(args.mask, pixel_size=h1.pixel_size)
        if tuple(mask.data.shape) != tuple(h1.data.shape):
            raise InputError(
                f"{args.mask}: mask box {tuple(mask.data.shape)} differs from the half "
                f"maps' {tuple(h1.data.shape)}"
            )
    return h1, h2, mask


def _read_views(path: str) -> torch.Tensor:
    """Pose matrices (n, 3, 3) of the particles in a STAR file; refused without poses."""
    from cryoprior.io.star import read_particles

    particles = read_particles(path)
    if not particles.has_poses or len(particles) == 0:
        raise InputError(
            f"{path} has no particle poses (rlnAngleRot/Tilt/Psi): --angles needs the "
            "refined particles of the half maps (e.g. run_data.star)"
        )
    return particles.rotation_matrices()


def main(args: argparse.Namespace) -> int:
    """Denoise, run the baselines, write the maps and the record."""
    from cryoprior.cli.reconstruct_calpha import read_sequence
    from cryoprior.physics.composition import protein_mass_kda
    from cryoprior.priors import load_prior
    from cryoprior.solvers.denoise import denoise_half_maps
    from cryoprior.solvers.halfmap import half_map_noise
    from cryoprior.solvers.postprocess import fsc_lowpass, fsc_weighted_sharpened
    from cryoprior.solvers.prior_reconstruction import check_volume_prior

    set_threads(args.threads)
    require(args.samples >= 1, f"--samples must be >= 1, got {args.samples}")
    require(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    h1, h2, mask = _read_inputs(args)
    origin = read_map_origin(args.half1)
    prior = load_prior(args.prior)
    check_volume_prior(prior)
    mass = protein_mass_kda(read_sequence(args.sequence)) if args.sequence else args.mass_kda
    views = _read_views(args.angles) if args.angles else None
    px = h1.pixel_size
    a, b = h1.data.double(), h2.data.double()
    noise = half_map_noise(a, b, px)  # on the input's grid, for the baselines
    average = (a + b) / 2
    lowpass = fsc_lowpass(average, noise)
    sharp = fsc_weighted_sharpened(average, noise)
    result = denoise_half_maps(
        a,
        b,
        px,
        prior,
        mass_kda=mass,
        intensity=args.intensity_scale,
        view_rotations=views,
        guidance=args.guidance,
        n_steps=args.steps,
        n_samples=args.samples,
        seed=args.seed,
        spectrum=args.prior_spectrum,
        show_progress=not args.quiet,
    )
    halves = fsc(a, b, px, mask=None if mask is None else mask.data)
    out = output_dir(args.out)
    maps = {
        "denoised": result.mean,
        "denoised_std": result.std,
        "lowpass": lowpass,
        "postprocess": sharp.map,
    }
    if mask is not None:
        maps["denoised_masked"] = result.mean * mask.data.double()
    for name, data in maps.items():
        write_map(out / f"{name}.mrc", Volume(data.float(), px), origin_angstrom=origin)
    plot_fsc({"half maps": halves}, out / "fsc_halves.png", title="FSC of the half maps")
    write_json(
        out / "denoise.json",
        run_record(
            "denoise",
            args,
            box=int(a.shape[-1]),
            pixel_size=px,
            origin_angstrom=origin,
            halves_fsc={
                "fsc0143": halves.resolution_0143,
                "fsc05": halves.resolution_05,
                "masked": mask is not None,
            },
            guinier_bfactor=sharp.bfactor,
            postprocess_resolution=sharp.resolution,
            **result.info(),
        ),
    )
    print(
        f"posterior mean of {args.samples} sample(s) ({result.plan.describe()}) -> "
        f"{out}/denoised.mrc, spread {out}/denoised_std.mrc; half maps "
        f"{halves.describe()}; {result.seconds['total']:.0f} s"
    )
    return 0
