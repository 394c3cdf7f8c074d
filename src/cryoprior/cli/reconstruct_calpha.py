"""``cryoprior reconstruct --prior`` with a point-cloud (Cα) prior: a Cα cloud from particles
at known poses by posterior sampling (issue 4; :mod:`cryoprior.solvers.calpha_fit`).

The particles (images, RELION poses, CTF parameters and origins from the STAR file) become a
:class:`~cryoprior.solvers.calpha_fit.CalphaMeasurement` exactly as the Cα image simulator
(:func:`~cryoprior.solvers.calpha_fit.simulate_calpha_images`) and the particle simulator
(:class:`~cryoprior.physics.simulator.ParticleRenderer`) build images: the images as stored
(not re-centred), the CTF evaluated on the padded grid (pad · D) and the particle moved to
−origin by the operator, i.e. shifts = −rlnOriginX/YAngst / pixel size (pixels; see
:class:`~cryoprior.physics.operators.ShiftOperator`). The model then renders the segment
centred in the box, which is where the prior's zero centre of mass puts it.

N (the number of residues) comes from ``--n-residues`` or from ``--sequence`` (one-letter
string or FASTA file). The per-residue amplitude (profile likelihood) and the noise σ (the
images' background) are estimated from the images.

Outputs (in ``-o``):

- ``model.pdb``: the matched posterior mean, one CA atom per point, chain A, residues
  numbered 1…N, all named UNK. The points are unlabelled (neither the likelihood nor the
  permutation-equivariant EGNN prior says which point is which residue), so the sequence is
  not written onto them: residue i of the file is not residue i of the sequence.
  Coordinates in Å in the particles' map frame: 0 Å at voxel index D//2 on every axis,
  the origin that :func:`cryoprior.io.mrc.write_map` writes, so the model overlays the
  map reconstructed from the same particles. B-factor column: 8π²·s²/3 (Å²) from the
  per-residue RMS spread s over the samples (isotropic: ⟨u²⟩ per axis = s²/3), capped at
  999.99 (s ≈ 6.2 Å, the column's width; the exact s is in reconstruct.json).
- ``samples.pdb`` (with ``--samples`` > 1): one MODEL per posterior sample, each matched
  to the mean (point i of every model corresponds to point i of model.pdb).
- ``reconstruct.json``: the run record with the per-residue spread (Å).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoprior.cli._common import output_dir, run_record, write_json
from cryoprior.core.errors import InputError, require
from cryoprior.core.files import write_text_atomic
from cryoprior.io.structure import write_pdb
from cryoprior.physics.ctf import compute_ctf
from cryoprior.physics.projection import padded_size
from cryoprior.physics.source import ParticleSource
from cryoprior.priors import NetworkPrior, Prior
from cryoprior.solvers.calpha_fit import DEFAULT_SIGMA, CalphaMeasurement, fit_calpha_with_prior

#: guidance rules of the Cα path; the first is the default
CALPHA_GUIDANCES = ("dps_x0", "dps")
#: reverse diffusion steps of the Cα path when --steps is not given
DEFAULT_CALPHA_STEPS = 50
#: images used at most when --max-images is not given
DEFAULT_MAX_IMAGES = 1000
#: largest B-factor (Å²) a PDB file holds (columns 61-66, %6.2f)
MAX_BFACTOR = 999.99


def add_calpha_args(group: Any) -> None:
    """The Cα-prior arguments, added to the ``--prior`` argument group."""
    group.add_argument(
        "--n-residues",
        type=int,
        help="Cα prior: number of residues N of the segment (or give --sequence)",
    )
    group.add_argument(
        "--blob-sigma",
        type=float,
        default=DEFAULT_SIGMA,
        help=f"Cα prior: Gaussian blob std per residue, Å (default {DEFAULT_SIGMA:g})",
    )
    group.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"Cα prior: use at most the first N particles (default {DEFAULT_MAX_IMAGES}; "
        "memory grows with the number of images)",
    )


def read_sequence(text: str) -> str:
    """A sequence given inline, or the non-header lines of a FASTA file named ``text``
    (all records concatenated), stripped of line breaks. Not validated here."""
    path = Path(text)
    if path.is_file():
        lines = path.read_text().splitlines()
        text = "".join(line.strip() for line in lines if not line.startswith(">"))
    return text


def residue_count(n_residues: int | None, sequence: str | None) -> int:
    """N from ``--n-residues`` or the length of ``--sequence`` (one-letter codes or a FASTA
    file); an InputError when neither is given, N < 1, or the two disagree."""
    n_seq = None
    if sequence is not None:
        seq = "".join(read_sequence(sequence).split())
        if not seq or not seq.isalpha():
            raise InputError(
                f"--sequence must be one-letter amino-acid codes or a FASTA file, got "
                f"{sequence[:30]!r}"
            )
        n_seq = len(seq)
    if n_residues is None and n_seq is None:
        raise InputError(
            "a Cα prior needs the number of residues: give --n-residues N or --sequence "
            "(one-letter codes or a FASTA file)"
        )
    if n_residues is not None and n_seq is not None and n_residues != n_seq:
        raise InputError(
            f"--n-residues {n_residues} disagrees with the {n_seq} residues of --sequence; "
            "give one of them"
        )
    n = int(n_residues if n_residues is not None else n_seq)  # type: ignore[arg-type]
    require(n >= 1, f"--n-residues must be >= 1, got {n}")
    return n


def calpha_guidance(guidance: str | None) -> str:
    """The Cα path's guidance: ``guidance`` if allowed, "dps_x0" when not given."""
    if guidance is None:
        return CALPHA_GUIDANCES[0]
    if guidance not in CALPHA_GUIDANCES:
        raise InputError(
            f"--guidance {guidance} works with density-map priors only; a point-cloud (Cα) "
            f"prior takes {' or '.join(CALPHA_GUIDANCES)} (default {CALPHA_GUIDANCES[0]})"
        )
    return guidance


def check_calpha_prior(prior: Prior | NetworkPrior, n_residues: int, where: str) -> int:
    """Raise InputError unless ``prior`` is a point-cloud diffusion (denoising) prior whose
    clouds hold ``n_residues`` points; returns its max_nodes."""
    kind = prior.metadata.objective_kind
    if not isinstance(prior, Prior) or kind != "denoising":
        raise InputError(
            f"{where} is a {kind} point-cloud model; reconstruct needs a point-cloud "
            "diffusion (denoising) prior such as calpha_prior"
        )
    max_nodes = int(prior.shape[0])
    if n_residues > max_nodes:
        raise InputError(
            f"the segment has {n_residues} residues but the prior {where} models clouds of "
            f"at most {max_nodes} points: reconstruct a segment of at most {max_nodes} "
            "residues (particles re-extracted around it, --n-residues) or use a prior "
            "trained on larger clouds"
        )
    return max_nodes


def measurement_from_source(
    source: ParticleSource,
    indices: np.ndarray,
    sigma: float = DEFAULT_SIGMA,
    pad: float = 2.0,
    batch_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> CalphaMeasurement:
    """The Cα measurement of particles ``indices`` (0-based) of ``source``.

    Images as stored (K, D, D); poses (K, 3, 3); CTFs (K, Dp, Dp) on the padded grid
    Dp = round(pad · D) (as :func:`~cryoprior.solvers.prior_reconstruction.
    accumulate_particles` and the simulator evaluate them), None without CTF columns;
    shifts (K, 2) px = −origin / pixel size (the particle sits at −origin, DESIGN.md),
    applied by the model on the padded grid, as the simulator applies them. ``sigma``:
    blob std (Å).
    """
    source.require_poses("Cα reconstruction")
    px, dp = source.pixel_size, padded_size(source.box, pad)
    images, rotations, ctfs = [], [], []
    for batch in source.batches(int(batch_size), indices=indices, center=False, dtype=dtype):
        images.append(batch.images)
        rotations.append(batch.rotations.to(dtype))
        if batch.ctf is not None:
            ctfs.append(compute_ctf(batch.ctf, (dp, dp), px, torch.float64).to(dtype))
    origins = torch.as_tensor(source.particles.shifts[np.asarray(indices)], dtype=torch.float64)
    shifts = (-origins / px).to(dtype)
    return CalphaMeasurement(
        torch.cat(images),
        torch.cat(rotations),
        px,
        sigma,
        torch.cat(ctfs) if ctfs else None,
        shifts if bool(shifts.any()) else None,
        pad,
    )


def spread_bfactors(spread: torch.Tensor) -> np.ndarray:
    """Isotropic B-factors (Å²) 8π²⟨u²⟩ with ⟨u²⟩ = s²/3 per axis, from RMS spreads s (Å),
    capped at :data:`MAX_BFACTOR` (the PDB column's largest value; s ≈ 6.2 Å)."""
    s = spread.detach().double().cpu().numpy()
    return np.minimum(8.0 * math.pi**2 * s**2 / 3.0, MAX_BFACTOR)


def write_pdb_models(path: Path, models: list[np.ndarray], **pdb_args: Any) -> None:
    """Several models (each (N, 3) Å) as one multi-MODEL PDB file, atomically; each model is
    formatted by :func:`cryoprior.io.structure.write_pdb` (``pdb_args``)."""
    records = ("ATOM", "HETATM", "TER")
    header: list[str] = []
    body: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, coords in enumerate(models, start=1):
            one = Path(tmp) / f"model_{i}.pdb"
            write_pdb(one, coords, **pdb_args)
            lines = one.read_text().splitlines()
            if i == 1:
                header = [ln for ln in lines if not ln.startswith((*records, "END"))]
            body += [f"MODEL     {i:4d}", *[ln for ln in lines if ln.startswith(records)]]
            body.append("ENDMDL")
    write_text_atomic(path, "\n".join([*header, *body, "END"]) + "\n")


def run_calpha(
    args: argparse.Namespace, source: ParticleSource, prior: Prior | NetworkPrior
) -> int:
    """Posterior sampling of the Cα cloud for ``cryoprior reconstruct --prior``; writes
    model.pdb, samples.pdb (several samples) and reconstruct.json into ``args.out``."""
    t0 = time.perf_counter()
    for name in ("mass_kda", "intensity_scale"):
        if getattr(args, name) is not None:
            raise InputError(
                f"--{name.replace('_', '-')} applies to a density-map prior; with a Cα prior "
                "the per-residue amplitude is estimated from the images"
            )
    n = residue_count(args.n_residues, args.sequence)
    max_nodes = check_calpha_prior(prior, n, args.prior)
    assert isinstance(prior, Prior)
    guidance = calpha_guidance(args.guidance)
    steps = DEFAULT_CALPHA_STEPS if args.steps is None else int(args.steps)
    require(steps >= 1, f"--steps must be >= 1, got {steps}")
    require(args.samples >= 1, f"--samples must be >= 1, got {args.samples}")
    require(args.max_images >= 1, f"--max-images must be >= 1, got {args.max_images}")
    args.steps, args.guidance = steps, guidance  # the run record shows what was used
    n_used = min(len(source), int(args.max_images))
    if n_used < len(source):
        print(
            f"using the first {n_used} of {len(source)} particles (--max-images {n_used}); "
            "raise --max-images to use more"
        )
    measurement = measurement_from_source(
        source,
        np.arange(n_used),
        sigma=args.blob_sigma,
        pad=args.pad,
        batch_size=args.batch_size,
    )
    t_read = time.perf_counter() - t0
    fit = fit_calpha_with_prior(
        measurement,
        n,
        prior,
        n_samples=args.samples,
        n_steps=steps,
        guidance=guidance,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    out = output_dir(args.out)
    assert fit.spread is not None
    coords = fit.coords.detach().double().cpu().numpy()
    names = ["UNK"] * n
    write_pdb(out / "model.pdb", coords, residue_names=names, bfactors=spread_bfactors(fit.spread))
    if args.samples > 1:
        models = [s.detach().double().cpu().numpy() for s in fit.samples]
        write_pdb_models(out / "samples.pdb", models, residue_names=names)
    spread = [float(v) for v in fit.spread]
    total = time.perf_counter() - t0
    write_json(
        out / "reconstruct.json",
        run_record(
            "reconstruct",
            args,
            method="calpha_prior",
            n_particles=n_used,
            n_particles_in_star=len(source),
            box=measurement.box,
            pixel_size=measurement.pixel_size,
            n_residues=n,
            prior_max_nodes=max_nodes,
            guidance=guidance,
            n_steps=steps,
            blob_sigma=measurement.sigma,
            noise_sigma=fit.noise_sigma,
            amplitude=fit.amplitude,
            log_likelihood=fit.log_likelihood,
            frame="Å, 0 at voxel index box//2 (the map frame of write_map); zero centre of mass",
            spread_rms=spread,
            spread_rms_mean=float(np.mean(spread)),
            fit=fit.config,
            seconds={"reading": t_read, "fit": fit.seconds, "total": total},
        ),
    )
    samples = f"; {out}/samples.pdb" if args.samples > 1 else ""
    print(
        f"Cα posterior mean of {args.samples} sample(s), {n} residues, from {n_used} "
        f"particles -> {out}/model.pdb{samples}; mean RMS spread {np.mean(spread):.2f} Å; "
        f"{total:.0f} s"
    )
    return 0


__all__ = [
    "CALPHA_GUIDANCES",
    "DEFAULT_CALPHA_STEPS",
    "DEFAULT_MAX_IMAGES",
    "MAX_BFACTOR",
    "add_calpha_args",
    "calpha_guidance",
    "check_calpha_prior",
    "measurement_from_source",
    "read_sequence",
    "residue_count",
    "run_calpha",
    "spread_bfactors",
    "write_pdb_models",
]
