"""Super-resolve a structure, a density map or particle images with a trained prior.

  points  restore a blurred (low-resolution) structure with a heat-kernel restoration prior
          (EGNN cold diffusion): INPUT is .pdb/.cif/.mmcif (optionally .gz), .sdf/.mol or
          .xyz; the restored structure is written in the input's format. --t is the input's
          blur as a fraction of the prior's blur range (σ = t × the prior's max_radius Å),
          or give --sigma in Å. A molecule prior restores the heavy atoms (hydrogens move
          with their nearest heavy atom); a Cα prior restores the Cα atoms of amino-acid
          residues and writes a Cα trace (chains longer than the prior's clouds are
          restored in overlapping windows, blended). Output: the restored file and a JSON
          record beside it.
  map     super-resolve an MRC map with an SR3 or regression prior: the input's box and
          pixel size must be the prior's divided and multiplied by one of its trained
          factors (e.g. a 16³ map at 6 Å/px for a prior of 32³ maps at 3 Å/px); the output
          is at the prior's pixel size, on the same physical grid. With --samples N > 1 the
          output is the mean of N SR3 samples and OUT_std.mrc their per-voxel standard
          deviation.
  images  the same for each image of an MRC stack (.mrcs); writes a stack of means (and
          OUT_std.mrcs with --samples N > 1).

--consistency final (default) replaces the low frequencies of the output by the input's
(Fourier cropping of the output reproduces the input exactly); every_step also does so at
each sampler step; none leaves the network's output as is.

examples:
  cryoprior superres points blurred.sdf --prior src/cryoprior/assets/priors/heat_sr_molecules \\
      --t 0.5 -o restored.sdf
  cryoprior superres points lowres.pdb --prior heat_sr_calpha --sigma 3 --sampler improved
  cryoprior superres map map_6A.mrc --prior sr3_maps_residual --factor 2 --samples 8 -o map_3A.mrc
  cryoprior superres images particles_bin2.mrcs --prior sr3_images -o particles_sr.mrcs
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryoprior.cli._common import add_common_args, run_record, write_json
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError, require
from cryoprior.core.files import atomic_path, write_text_atomic
from cryoprior.core.runtime import progress, seed_everything, set_threads
from cryoprior.priors import load_prior
from cryoprior.train.objectives import POINT_SAMPLERS, PointRestorer, super_resolve

STRUCTURE_FORMATS = {
    ".pdb": "pdb",
    ".ent": "pdb",
    ".cif": "mmcif",
    ".mmcif": "mmcif",
    ".sdf": "sdf",
    ".mol": "sdf",
    ".xyz": "xyz",
}
CONSISTENCY = ("none", "final", "every_step")
_HYDROGENS = ("H", "D")
# amino acids whose CA is a Cα (the 20 standard ones and selenomethionine)
_AMINO_ACIDS = {
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL", "MSE",
}  # fmt: skip


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior superres`` (subcommands points, map, images)."""
    sub = parser.add_subparsers(dest="target", metavar="{points,map,images}")
    sub.required = True

    p = sub.add_parser("points", help="restore a blurred structure (heat-kernel prior)")
    p.add_argument("input", type=Path, help="structure: .pdb/.cif/.mmcif[.gz], .sdf/.mol, .xyz")
    p.add_argument("--prior", type=Path, required=True, help="heat_restoration prior folder")
    blur = p.add_mutually_exclusive_group(required=True)
    blur.add_argument(
        "--t", type=float, help="the input's blur as a fraction of the prior's range, in (0, 1]"
    )
    blur.add_argument("--sigma", type=float, help="the input's blur radius σ in Å")
    p.add_argument(
        "--sampler",
        choices=POINT_SAMPLERS,
        default="improved",
        help="one-step restoration, cold diffusion Algorithm 1 (naive) or 2 (improved; default)",
    )
    p.add_argument("--steps", type=int, default=20, help="cold-diffusion steps (default 20)")
    p.add_argument("-o", "--out", type=Path, default=None, help="output (default INPUT_restored)")
    add_common_args(p)
    p.set_defaults(_run=run_points)

    for name, what, suffix, shipped in (
        ("map", "MRC map", ".mrc", "sr3_maps_residual, sr3_maps, regression_maps"),
        ("images", "MRC stack", ".mrcs", "sr3_images, regression_images"),
    ):
        q = sub.add_parser(name, help=f"super-resolve an {what} (SR3 or regression prior)")
        q.add_argument("input", type=Path, help=f"the low-resolution {what} ({suffix})")
        q.add_argument(
            "--prior",
            type=Path,
            required=True,
            help=f"sr3 or regression prior folder, or a shipped name ({shipped})",
        )
        q.add_argument(
            "--factor",
            type=float,
            default=None,
            help="the super-resolution factor, checked against the input (default: the "
            "prior's box / the input's box)",
        )
        q.add_argument("--samples", type=int, default=1, help="SR3 samples to average (default 1)")
        q.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
        q.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="default ddim")
        q.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (default 0)")
        q.add_argument(
            "--consistency",
            choices=CONSISTENCY,
            default="final",
            help="data consistency with the input (default final; see above)",
        )
        q.add_argument(
            "--batch-size", type=int, default=None, help="samples drawn at once (default all)"
        )
        q.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        q.add_argument(
            "-o", "--out", type=Path, default=None, help=f"output (default INPUT_sr{suffix})"
        )
        add_common_args(q)
        q.set_defaults(_run=run_map if name == "map" else run_images)


def main(args: argparse.Namespace) -> int:
    """Run ``cryoprior superres``; returns the exit status."""
    set_threads(args.threads)
    seed_everything(args.seed)
    return int(args._run(args))


# ----------------------------------------------------------------------------- points


@dataclass
class StructureFile:
    """The atoms of a structure file that a prior restores, and how to write them back.

    ``coords`` (M, 3) Å and ``elements`` of the restored atoms (one cloud per molecule;
    several for a multi-molecule SDF), ``write(new_coords, path)`` writes the input with
    those atoms moved (list of (M, 3) arrays, one per cloud).
    """

    clouds: list[np.ndarray]
    elements: list[list[str]]
    write: Callable[[list[np.ndarray], Path], None]


def structure_format(path: Path) -> str:
    """ "pdb", "mmcif", "sdf" or "xyz" from the suffix (a trailing .gz is ignored)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = STRUCTURE_FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise InputError(
            f"{path}: unknown structure format; use one of {', '.join(sorted(STRUCTURE_FORMATS))}"
        )
    return fmt


def _follow(moved: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Positions ``moved`` (K, 3) displaced like their nearest atom of ``old`` -> ``new``."""
    if len(moved) == 0:
        return moved
    d = np.linalg.norm(moved[:, None] - old[None], axis=-1)
    nearest = d.argmin(1)
    return moved + (new - old)[nearest]


def read_structure_file(path: Path, calpha: bool) -> StructureFile:
    """The restorable atoms of ``path`` (Cα atoms for a Cα prior, heavy atoms otherwise)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    fmt = structure_format(path)
    if fmt in ("pdb", "mmcif"):
        return _read_gemmi(path, fmt, calpha)
    if fmt == "xyz":
        return _read_xyz(path, calpha)
    return _read_sdf(path, calpha)


def _read_gemmi(path: Path, fmt: str, calpha: bool) -> StructureFile:
    import gemmi

    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable PDB/mmCIF file ({e})") from None
    if len(st) == 0:
        raise InputError(f"{path}: no atoms found")
    while len(st) > 1:
        del st[len(st) - 1]
    st.remove_waters()
    st.remove_alternative_conformations()
    model = st[0]
    if calpha:
        for chain in model:
            for ri in reversed(range(len(chain))):
                res = chain[ri]
                for ai in reversed(range(len(res))):
                    if not (res.name in _AMINO_ACIDS and res[ai].name == "CA"):
                        del res[ai]
                if len(res) == 0:
                    del chain[ri]
        st.remove_empty_chains()
    atoms = [a for chain in model for res in chain for a in res]
    heavy = [a.element.name.upper() not in _HYDROGENS for a in atoms]
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms], dtype=np.float64).reshape(-1, 3)
    mask = np.array(heavy, dtype=bool)
    if not mask.any():
        what = "Cα atoms of amino-acid residues" if calpha else "heavy atoms"
        raise InputError(f"{path}: no {what} found")
    elements = [a.element.name.upper() for a, h in zip(atoms, heavy) if h]

    def write(new: list[np.ndarray], out: Path) -> None:
        moved = xyz.copy()
        moved[mask] = new[0]
        moved[~mask] = _follow(xyz[~mask], xyz[mask], new[0])
        for a, p in zip(atoms, moved):
            a.pos = gemmi.Position(*p)
        with atomic_path(out) as tmp:
            if fmt == "mmcif":
                st.make_mmcif_document().write_file(str(tmp))
            else:
                st.write_pdb(str(tmp))

    return StructureFile([xyz[mask]], [elements], write)


def _restored_atoms(elements: list[str], calpha: bool) -> np.ndarray:
    """Which atoms of an XYZ / SDF file the prior restores: all of them for a Cα prior
    (the file is taken to be a Cα trace), the heavy atoms otherwise."""
    if calpha:
        return np.ones(len(elements), dtype=bool)
    return np.array([e.upper() not in _HYDROGENS for e in elements], dtype=bool)


def _read_xyz(path: Path, calpha: bool) -> StructureFile:
    from cryoprior.io.structure import read_xyz, write_xyz

    xyz, elements = read_xyz(path)
    lines = path.read_text().splitlines()
    comment = lines[1] if len(lines) > 1 else ""
    mask = _restored_atoms(elements, calpha)
    if not mask.any():
        raise InputError(f"{path}: no heavy atoms found")

    def write(new: list[np.ndarray], out: Path) -> None:
        moved = xyz.copy()
        moved[mask] = new[0]
        moved[~mask] = _follow(xyz[~mask], xyz[mask], new[0])
        write_xyz(out, moved, elements, comment=comment.strip())

    return StructureFile([xyz[mask]], [[e for e, m in zip(elements, mask) if m]], write)


def _read_sdf(path: Path, calpha: bool) -> StructureFile:
    """MDL molfile V2000 records (a .mol file or an SDF of one or more molecules): the
    atom block's coordinates are replaced in place, everything else is kept verbatim."""
    text = path.read_text()
    # each "$$$$" line ends a record; the next record starts on the following line (its
    # three header lines may be blank, so only that one line break is dropped)
    pieces = text.split("$$$$")
    records = [pieces[0]] + [r[2:] if r.startswith("\r\n") else r[1:] for r in pieces[1:]]
    records = [r for r in records if r.strip()]
    parsed = []
    for k, record in enumerate(records):
        lines = record.splitlines()
        if len(lines) < 4 or "V3000" in lines[3]:
            raise InputError(
                f"{path}: molecule {k + 1} is not a V2000 molfile (V3000 is not supported)"
            )
        try:
            n_atoms = int(lines[3][0:3])
        except ValueError:
            raise InputError(f"{path}: molecule {k + 1} has an unreadable counts line") from None
        if len(lines) < 4 + n_atoms:
            raise InputError(f"{path}: molecule {k + 1} lists {n_atoms} atoms but has fewer")
        atom_lines = lines[4 : 4 + n_atoms]
        try:
            rows = [[float(v[0:10]), float(v[10:20]), float(v[20:30])] for v in atom_lines]
            xyz = np.array(rows, dtype=np.float64).reshape(-1, 3)
        except ValueError:
            raise InputError(f"{path}: molecule {k + 1} has unreadable coordinates") from None
        elements = [line[31:34].strip().upper() for line in atom_lines]
        mask = _restored_atoms(elements, calpha)
        if not mask.any():
            raise InputError(f"{path}: molecule {k + 1} has no heavy atoms")
        parsed.append((lines, xyz, elements, mask))

    def write(new: list[np.ndarray], out: Path) -> None:
        blocks = []
        for (lines, xyz, _, mask), cloud in zip(parsed, new):
            moved = xyz.copy()
            moved[mask] = cloud
            moved[~mask] = _follow(xyz[~mask], xyz[mask], cloud)
            lines = list(lines)
            for i, (x, y, z) in enumerate(moved):
                line = lines[4 + i]
                lines[4 + i] = f"{x:10.4f}{y:10.4f}{z:10.4f}{line[30:]}"
            blocks.append("\n".join(lines) + "\n")
        body = "$$$$\n".join(blocks)
        if path.suffix.lower() == ".sdf" or text.rstrip().endswith("$$$$"):
            body += "$$$$\n"
        write_text_atomic(out, body)

    clouds = [xyz[mask] for _, xyz, _, mask in parsed]
    elements = [[e for e, m in zip(els, mask) if m] for _, _, els, mask in parsed]
    return StructureFile(clouds, elements, write)


def blur_time(restorer: PointRestorer, t: float | None, sigma: float | None) -> float:
    """The process time t ∈ (0, 1] from --t or from --sigma (Å, inverting σ(t))."""
    radius = float(restorer.objective["max_radius"])
    if t is None:
        require(sigma is not None and sigma > 0, f"--sigma must be > 0 Å, got {sigma}")
        ratio = float(sigma) / radius
        if ratio > 1:
            raise InputError(
                f"--sigma {sigma:g} Å exceeds the prior's blur range (max_radius {radius:g} Å)"
            )
        t = ratio if restorer.objective["schedule"] == "linear" else math.sqrt(ratio)
    if not 0.0 < float(t) <= 1.0:
        raise InputError(f"--t must lie in (0, 1] (σ = t × {radius:g} Å), got {t}")
    return float(t)


def restore_clouds(
    restorer: PointRestorer,
    clouds: list[np.ndarray],
    elements: list[list[str]],
    t: float,
    sampler: str,
    steps: int,
) -> list[np.ndarray]:
    """Restore each cloud (M, 3) Å; returns the restored clouds in the same frame.

    Clouds up to the prior's size are restored as one padded batch. A longer cloud is
    split, for a Cα prior, into windows of the prior's size overlapping by half and the
    windows' restorations (each at its input window's centre of mass) are averaged with
    triangular weights; for a molecule prior it is an error.
    """
    n_max = restorer.max_nodes
    out: list[np.ndarray | None] = [None] * len(clouds)
    small = [i for i, c in enumerate(clouds) if len(c) <= n_max]
    for i, c in enumerate(clouds):
        if len(c) > n_max and (restorer.uses_elements or n_max < 4):
            raise InputError(
                f"molecule {i + 1} has {len(c)} heavy atoms but this molecule prior handles at "
                f"most {n_max}"
            )
    if small:
        n = max(len(clouds[i]) for i in small)
        x = torch.zeros(len(small), n, 3, dtype=torch.float64)
        mask = torch.zeros(len(small), n, dtype=torch.float64)
        for b, i in enumerate(small):
            x[b, : len(clouds[i])] = torch.from_numpy(clouds[i])
            mask[b, : len(clouds[i])] = 1.0
        els = [elements[i] for i in small] if restorer.uses_elements else None
        restored = restorer.restore(x, t, mask, els, sampler, steps)
        for b, i in enumerate(small):
            out[i] = restored[b, : len(clouds[i])].numpy()
    for i, c in enumerate(clouds):
        if out[i] is None:
            out[i] = _restore_windows(restorer, c, t, sampler, steps)
    return [o for o in out if o is not None]


def _restore_windows(
    restorer: PointRestorer, cloud: np.ndarray, t: float, sampler: str, steps: int
) -> np.ndarray:
    w = restorer.max_nodes
    stride = w // 2
    starts = list(range(0, len(cloud) - w + 1, stride))
    if starts[-1] != len(cloud) - w:
        starts.append(len(cloud) - w)
    x = torch.stack([torch.from_numpy(cloud[s : s + w]) for s in starts])
    restored = restorer.restore(x, t, None, None, sampler, steps)
    weight = torch.minimum(torch.arange(1, w + 1), torch.arange(w, 0, -1)).double()
    total = torch.zeros(len(cloud), 3, dtype=torch.float64)
    norm = torch.zeros(len(cloud), dtype=torch.float64)
    for s, r in zip(starts, restored):
        total[s : s + w] += weight[:, None] * r
        norm[s : s + w] += weight
    return (total / norm[:, None]).numpy()


def default_output(path: Path, tag: str, suffix: str | None = None) -> Path:
    """INPUT_<tag> with the input's suffix (a trailing .gz dropped)."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    stem, ext = (name.rsplit(".", 1) + [""])[:2] if "." in name else (name, "")
    ext = suffix or (f".{ext}" if ext else "")
    return path.with_name(f"{stem}_{tag}{ext}")


def run_points(args: argparse.Namespace) -> int:
    """``cryoprior superres points``."""
    prior = load_prior(args.prior)
    if prior.metadata.objective_kind != "heat_restoration":
        raise InputError(
            f"{args.prior} is a {prior.metadata.objective_kind} prior; `superres points` needs "
            "a heat_restoration prior (e.g. heat_sr_molecules or heat_sr_calpha)"
        )
    restorer = PointRestorer(prior)  # type: ignore[arg-type]
    require(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    t = blur_time(restorer, args.t, args.sigma)
    calpha = restorer.objective.get("atoms") == "calpha"
    fmt = structure_format(args.input)
    out = args.out or default_output(args.input, "restored")
    if structure_format(out) != fmt or out.name.lower().endswith(".gz"):
        raise InputError(
            f"-o {out}: the restored structure is written in the input's format ({fmt}, "
            "uncompressed); give a matching file name"
        )
    structure = read_structure_file(args.input, calpha)
    restored = restore_clouds(
        restorer,
        structure.clouds,
        structure.elements,
        t,
        args.sampler,
        args.steps,
    )
    structure.write(restored, out)
    shift = [
        float(np.sqrt(((a - b) ** 2).sum(1).mean())) for a, b in zip(restored, structure.clouds)
    ]
    record = run_record(
        "superres points",
        args,
        output=str(out),
        t=t,
        sigma_angstrom=float(restorer.process.sigma(t)),
        atoms="Cα" if calpha else "heavy atoms",
        n_atoms=[len(c) for c in structure.clouds],
        rms_displacement_angstrom=shift,
    )
    write_json(out.with_name(out.name + ".json"), record)
    print(
        f"restored {sum(len(c) for c in structure.clouds)} {record['atoms']} "
        f"(t = {t:g}, σ = {record['sigma_angstrom']:.2f} Å, {args.sampler}) -> {out}; "
        f"RMS displacement {', '.join(f'{s:.2f}' for s in shift)} Å"
    )
    return 0


# ----------------------------------------------------------------------------- maps / images


def _load_sr_prior(args: argparse.Namespace, representation: str):  # noqa: ANN202
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available; use --device cpu")
    prior = load_prior(args.prior, device=args.device)
    kind = prior.metadata.objective_kind
    if kind not in ("sr3", "regression"):
        raise InputError(
            f"{args.prior} is a {kind} prior; `superres {args.target}` needs an sr3 or "
            "regression prior"
        )
    if prior.representation != representation:
        other = "map" if prior.representation == "volume" else "images"
        raise InputError(
            f"{args.prior} super-resolves {prior.representation}s; use `superres {other}`"
        )
    require(args.samples >= 1, f"--samples must be >= 1, got {args.samples}")
    if kind == "regression" and args.samples > 1:
        raise InputError("a regression prior is deterministic: --samples must be 1")
    if kind == "regression" and args.consistency == "every_step":
        raise InputError("a regression prior supports --consistency none or final")
    return prior


def _sr_kwargs(args: argparse.Namespace) -> dict:
    return {
        "factor": args.factor,
        "n_samples": args.samples,
        "steps": args.steps,
        "sampler": args.sampler,
        "data_consistency": args.consistency,
        "eta": args.eta,
        "batch_size": args.batch_size,
    }


def _std_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_std{out.suffix}")


def run_map(args: argparse.Namespace) -> int:
    """``cryoprior superres map``."""
    from cryoprior.io.mrc import read_map, read_map_origin, write_map
    from cryoprior.train.objectives import check_superres_input

    prior = _load_sr_prior(args, "volume")
    low = read_map(args.input)
    factor = check_superres_input(prior, tuple(low.data.shape), low.pixel_size, args.factor)
    out = args.out or default_output(args.input, "sr", ".mrc")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    result = super_resolve(
        prior,
        low.data,
        low.pixel_size,
        generator=generator,
        show_progress=not args.quiet,
        **_sr_kwargs(args),
    )
    # the same physical grid: low-res index m sits at high-res index f (m - M//2) + N//2
    origin_in = read_map_origin(args.input)
    m, n = low.data.shape[0], result.mean.shape[0]
    origin = tuple(o + (m // 2) * low.pixel_size - (n // 2) * result.pixel_size for o in origin_in)
    write_map(out, Volume(result.mean.cpu().float(), result.pixel_size), origin)
    files = [out]
    if args.samples > 1:
        write_map(_std_path(out), Volume(result.std.cpu().float(), result.pixel_size), origin)
        files.append(_std_path(out))
    write_json(
        out.with_name(out.name + ".json"),
        run_record(
            "superres map",
            args,
            objective=prior.metadata.objective_kind,
            factor=factor,
            input_pixel_size=low.pixel_size,
            output_pixel_size=result.pixel_size,
            files=[str(f) for f in files],
        ),
    )
    print(
        f"super-resolved {'x'.join(map(str, low.data.shape))} at {low.pixel_size:g} Å/px -> "
        f"{'x'.join(map(str, result.mean.shape))} at {result.pixel_size:g} Å/px "
        f"({prior.metadata.objective_kind}, factor {factor:g}): {', '.join(map(str, files))}"
    )
    return 0


def run_images(args: argparse.Namespace) -> int:
    """``cryoprior superres images``."""
    from cryoprior.io.mrc import StackWriter, read_stack
    from cryoprior.train.objectives import check_superres_input

    prior = _load_sr_prior(args, "image")
    out = args.out or default_output(args.input, "sr", ".mrcs")
    with read_stack(args.input) as stack:
        n = len(stack)
        factor = check_superres_input(prior, stack.shape, stack.pixel_size, args.factor)
        box = tuple(int(s) for s in prior.metadata.spatial_shape)
        px_out = stack.pixel_size / factor
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        writers = [(out, "mean")] + ([(_std_path(out), "std")] if args.samples > 1 else [])
        with contextlib.ExitStack() as files_open:
            opened = [
                files_open.enter_context(StackWriter(path, n, box, px_out)) for path, _ in writers
            ]
            for i in progress(range(n), desc="images", enabled=not args.quiet):
                result = super_resolve(
                    prior,
                    stack.get(i)[0],
                    stack.pixel_size,
                    generator=generator,
                    **_sr_kwargs(args),
                )
                for w, (_, what) in zip(opened, writers):
                    w.write(i, getattr(result, what).cpu().float())
    files = [p for p, _ in writers]
    write_json(
        out.with_name(out.name + ".json"),
        run_record(
            "superres images",
            args,
            objective=prior.metadata.objective_kind,
            factor=factor,
            n_images=n,
            input_pixel_size=stack.pixel_size,
            output_pixel_size=px_out,
            files=[str(f) for f in files],
        ),
    )
    print(
        f"super-resolved {n} images {stack.shape[0]}x{stack.shape[1]} at {stack.pixel_size:g} "
        f"Å/px -> {box[0]}x{box[1]} at {px_out:g} Å/px: {', '.join(map(str, files))}"
    )
    return 0
