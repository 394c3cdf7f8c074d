"""Data kinds of ``cryoprior train`` built from real structures: density maps, map
patches, Cα clouds, small molecules and projections; split by protein or molecule identity
(the corpus's split, recorded in the prior)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cryoprior.core.errors import InputError
from cryoprior.train.prior_data import PriorData, TensorItems, is_int


def _corpus_records(corpus: str | None) -> tuple[dict[str, list], dict[str, list[str]]]:
    from cryoprior.data import corpus as corpus_mod

    folder = corpus_mod.shipped_folder() if corpus is None else Path(corpus)
    records = {s: corpus_mod.load_corpus(folder, s) for s in ("train", "validation", "test")}
    if not records["train"]:
        raise InputError(f"the corpus {folder} has no training structures")
    return records, {s: [r.name for r in rs] for s, rs in records.items()}


def protein_maps(
    seed: int,
    box: int = 32,
    pixel_size: float = 3.0,
    n_per_structure: int = 16,
    rotations: str = "random",
    bfactor: float | str = "auto",
    corpus: str | None = None,
    precompute: bool = True,
) -> PriorData:
    """Density maps of the corpus's structures in random orientations
    (``cryoprior.data.volumes.MapDataset``); split by protein identity (the corpus's
    split); the map scale is fixed from the training maps."""
    from cryoprior.data.volumes import MapDataset

    records, names = _corpus_records(corpus)
    kw = dict(
        box=box,
        pixel_size=pixel_size,
        rotations=rotations,
        n_per_structure=n_per_structure,
        bfactor=bfactor,
        on_oversize="skip",
        split=names,
    )
    train = MapDataset(records["train"], seed=seed, **kw)
    val = (
        MapDataset(records["validation"], seed=seed + 1, scale=train.scale, **kw)
        if records["validation"]
        else None
    )
    if precompute:
        for ds in (train, val):
            if ds is not None:
                ds.precompute(show_progress=False)
    summary = {k: v for k, v in train.metadata.items() if k not in ("names", "split")}
    summary.update(
        kind="maps",
        n_train=len(train),
        n_val=0 if val is None else len(val),
        corpus=corpus or "shipped",
    )
    return PriorData(
        train=train,
        val=val,
        representation="volume",
        shape=(1, box, box, box),
        pixel_size=float(pixel_size),
        normalisation={"scale": train.scale, "offset": 0.0},
        summary=summary,
        split=names,
    )


def protein_map_patches(
    seed: int,
    box: int = 64,
    pixel_size: float = 1.5,
    patch: int = 32,
    n_per_structure: int = 8,
    bfactor: float | str = "auto",
    bfactor_extra: Sequence[float] = (0.0, 120.0),
    patches_per_map: int = 16,
    val_patches: int = 256,
    corpus: str | None = None,
) -> PriorData:
    """Random ``patch``³ patches of the corpus's maps (``box``³ at ``pixel_size`` Å/px, the
    structures in random orientations, rendered once), with random proper cube rotations
    and an extra B-factor blur uniform in ``bfactor_extra`` Å²
    (:class:`~cryoprior.data.patches.MapPatchDataset`): the training data of a fully
    convolutional volume prior that applies to any box at this pixel size. Split by
    protein identity (the corpus's split); the scale is the std of the training maps'
    voxels (whole boxes), recorded."""
    from cryoprior.data.patches import MapPatchDataset
    from cryoprior.data.volumes import MapDataset

    if not (is_int(patch) and 8 <= patch <= box):
        raise InputError(f"data.patch must be an integer between 8 and data.box, got {patch}")
    records, names = _corpus_records(corpus)
    kw = dict(
        box=box,
        pixel_size=pixel_size,
        rotations="random",
        n_per_structure=n_per_structure,
        bfactor=bfactor,
        on_oversize="skip",
        split=names,
    )
    whole = {"train": MapDataset(records["train"], seed=seed, **kw)}
    if records["validation"]:
        whole["validation"] = MapDataset(
            records["validation"], seed=seed + 1, scale=whole["train"].scale, **kw
        )
    for ds in whole.values():
        ds.precompute(show_progress=False)
    extra = tuple(float(b) for b in bfactor_extra)
    train = MapPatchDataset(
        whole["train"], patch, pixel_size, len(whole["train"]) * int(patches_per_map), extra, seed
    )
    val = None
    if "validation" in whole:
        val = MapPatchDataset(
            whole["validation"], patch, pixel_size, int(val_patches), extra, seed + 1
        )
    summary = {k: v for k, v in whole["train"].metadata.items() if k not in ("names", "split")}
    summary.update(
        kind="map_patches",
        patch=int(patch),
        bfactor_extra=list(extra),
        cube_rotations=True,
        fully_convolutional=True,
        n_train=len(train),
        n_val=0 if val is None else len(val),
        n_train_maps=len(whole["train"]),
        corpus=corpus or "shipped",
    )
    return PriorData(
        train=train,
        val=val,
        representation="volume",
        shape=(1, patch, patch, patch),
        pixel_size=float(pixel_size),
        normalisation={"scale": whole["train"].scale, "offset": 0.0},
        summary=summary,
        split=names,
    )


def calpha_clouds(
    seed: int,
    max_nodes: int = 64,
    n_per_structure: int = 16,
    rotations: str = "random",
    corpus: str | None = None,
) -> PriorData:
    """Cα traces of the corpus's structures as point clouds
    (``cryoprior.data.pointclouds.CalphaDataset``); split by protein identity; the length
    scale (Å per unit) is fixed from the training traces."""
    from cryoprior.data.pointclouds import CalphaDataset

    records, names = _corpus_records(corpus)
    kw = dict(
        max_nodes=max_nodes, rotations=rotations, n_per_structure=n_per_structure, split=names
    )
    train = CalphaDataset(records["train"], seed=seed, **kw)
    val = (
        CalphaDataset(records["validation"], seed=seed + 1, scale=train.scale, **kw)
        if records["validation"]
        else None
    )
    summary = {k: v for k, v in train.metadata.items() if k not in ("names", "split")}
    summary.update(
        kind="calpha",
        n_train=len(train),
        n_val=0 if val is None else len(val),
        corpus=corpus or "shipped",
    )
    return PriorData(
        train=train,
        val=val,
        representation="points",
        shape=(max_nodes, 3),
        pixel_size=None,
        normalisation={"scale": train.scale, "offset": 0.0},
        summary=summary,
        split=names,
    )


def ccd_molecules(
    seed: int,
    n_train: int = 4000,
    n_val: int = 200,
    n_test: int = 200,
    max_atoms: int = 60,
    min_atoms: int = 5,
    organic_only: bool = True,
    rotations: str = "random",
) -> PriorData:
    """Heavy-atom conformers of small molecules from the PDB Chemical Component Dictionary
    (``cryoprior.data.molecules``, needs biotite): ``n_train`` / ``n_val`` / ``n_test``
    components with ``min_atoms..max_atoms`` heavy atoms, split by molecule identity (a
    stable hash of the component id; the test ids are recorded, never trained on). Items
    carry the atom types ("types"); the length scale (Å per unit) is the training
    conformers' mean radius of gyration."""
    from cryoprior.data.molecules import ConformerDataset, select_ccd_conformers

    confs = select_ccd_conformers(
        {"train": n_train, "validation": n_val, "test": n_test},
        max_heavy_atoms=max_atoms,
        min_heavy_atoms=min_atoms,
        organic_only=organic_only,
    )
    if not confs["train"]:
        raise InputError("no CCD conformers were selected for training; raise data.n_train")
    names = {s: [c.name for c in cs] for s, cs in confs.items()}
    kw = dict(max_atoms=max_atoms, rotations=rotations, split=names)
    train = ConformerDataset(confs["train"], seed=seed, **kw)
    val = (
        ConformerDataset(confs["validation"], scale=train.scale, seed=seed + 1, **kw)
        if confs["validation"]
        else None
    )
    return PriorData(
        train=train,
        val=val,
        representation="points",
        shape=(max_atoms, 3),
        pixel_size=None,
        normalisation={"scale": train.scale, "offset": 0.0},
        summary={
            "kind": "molecules",
            "source": "PDB Chemical Component Dictionary (ideal coordinates, via biotite)",
            "atoms": "heavy atoms",
            "seed": seed,
            "max_atoms": max_atoms,
            "min_atoms": min_atoms,
            "organic_only": organic_only,
            "rotations": rotations,
            "n_train": len(train),
            "n_val": 0 if val is None else len(val),
            "n_test": len(names["test"]),
            "scale": train.scale,
            "units": "Å / scale",
            "normalisation_source": "mean radius of gyration of the training conformers",
            "split_method": "sha256 of the component id (cryoprior.data.molecules)",
        },
        split=names,
    )


def render_projections(maps: Any, n_per_structure: int, seed: int) -> torch.Tensor:
    """Projections (n_structures · n_per_structure, 1, D, D) in Å^-1 of the unrotated maps
    of a ``MapDataset`` (``rotations="none"``, one item per structure): structure k is
    projected by :class:`cryoprior.physics.projection.Projector` in ``n_per_structure``
    orientations drawn uniformly from SO(3) with the generator of (seed, k), and the
    voxel sums are multiplied by the pixel size (a line integral in Å)."""
    from cryoprior.data.volumes import item_generator
    from cryoprior.geometry.rotations import random_rotations
    from cryoprior.physics.projection import Projector

    if maps.rotations != "none" or maps.n_per_structure != 1:
        raise InputError("render_projections needs a MapDataset with rotations='none', 1 item each")
    out = []
    for k in range(len(maps)):
        rot = random_rotations(int(n_per_structure), item_generator(seed, k), torch.float64)
        volume = maps.render(k).to(torch.float64)
        out.append(Projector(volume).project(rot).float() * float(maps.pixel_size))
    return torch.cat(out).unsqueeze(1)


def protein_projections(
    seed: int,
    box: int = 32,
    pixel_size: float = 3.0,
    n_per_structure: int = 32,
    bfactor: float | str = "auto",
    corpus: str | None = None,
) -> PriorData:
    """Particle-like images: projections of the corpus's maps in random orientations.

    Each structure is rendered once, centred, as its band-limited potential
    (``cryoprior.data.volumes.MapDataset``, ``rotations="none"``) and projected in
    ``n_per_structure`` orientations drawn uniformly from SO(3) with a generator seeded by
    (seed, structure index) by the Fourier-slice projector
    (:class:`cryoprior.physics.projection.Projector`): image(x, y) = ∫ V(Rᵀ(x, y, z)) dz
    in Å^-1, a clean projection in the project's convention (no CTF, no noise). Split by
    protein identity (the corpus's split); normalised by the mean and standard deviation of
    the training images.
    """
    from cryoprior.data.volumes import MapDataset

    if not (is_int(n_per_structure) and n_per_structure >= 1):
        raise InputError(f"data.n_per_structure must be an integer >= 1, got {n_per_structure}")
    records, names = _corpus_records(corpus)
    kw = dict(
        box=box,
        pixel_size=pixel_size,
        rotations="none",
        bfactor=bfactor,
        on_oversize="skip",
        split=names,
    )

    train_maps = MapDataset(records["train"], **kw)
    train = render_projections(train_maps, n_per_structure, seed)
    val = None
    if records["validation"]:
        val = render_projections(MapDataset(records["validation"], **kw), n_per_structure, seed + 1)
    offset, scale = float(train.mean()), float(train.std())
    summary = {
        k: v
        for k, v in train_maps.metadata.items()
        if k not in ("names", "split", "scale", "scale_source", "units", "rotations")
    }
    summary.update(
        kind="projections",
        format="Fourier-slice projections of MapDataset maps (cubic kernel, pad 2)",
        rotations="uniform on SO(3), seeded by (seed, structure index)",
        n_per_structure=n_per_structure,
        seed=seed,
        units="projected potential (Å^-1)",
        normalisation_source="mean and std of the training images",
        n_train=len(train),
        n_val=0 if val is None else len(val),
        corpus=corpus or "shipped",
    )
    return PriorData(
        train=TensorItems((train - offset) / scale),
        val=None if val is None else TensorItems((val - offset) / scale),
        representation="image",
        shape=(1, box, box),
        pixel_size=float(pixel_size),
        normalisation={"scale": scale, "offset": offset},
        summary=summary,
        split=names,
    )
