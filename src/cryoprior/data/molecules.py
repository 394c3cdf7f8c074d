"""Small-molecule conformers from the PDB Chemical Component Dictionary (optional).

The CCD (~49,000 components with ideal 3-D coordinates) ships inside the ``biotite``
wheel (BSD-3-Clause; the CCD itself is wwPDB data, CC0). biotite is an optional
dependency (``pip install cryoprior[molecules]`` or ``pip install biotite``) imported only
when this module's functions run. Conformers are the heavy atoms of each component's
ideal coordinates, centred. Splits are by molecule identity (component id), assigned by a
stable hash of the id, so adding components never moves existing ones between splits.
Stereoisomers and tautomers have their own ids and may fall into different splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cryoprior.core.errors import InputError, require
from cryoprior.data.splits import SPLITS
from cryoprior.data.volumes import item_generator
from cryoprior.geometry.rotations import random_rotations

#: Atom-type vocabulary of :class:`ConformerDataset` (last index = any other element).
ELEMENTS = ("C", "N", "O", "S", "P", "F", "CL", "BR", "I", "B", "SE", "OTHER")


def _biotite_info() -> Any:
    try:
        import biotite.structure.info as info
    except ImportError:
        raise InputError(
            "small-molecule conformers need biotite: pip install biotite "
            "(or pip install 'cryoprior[molecules]')"
        ) from None
    return info


@dataclass(frozen=True)
class Conformer:
    """Heavy atoms of one component: coords (N, 3) Å centred on their mean, elements."""

    name: str
    coords: np.ndarray
    elements: tuple[str, ...]


def ccd_conformer(name: str) -> Conformer | None:
    """The ideal-coordinate heavy-atom conformer of CCD component ``name``, or None if
    the component is unknown or lacks coordinates."""
    info = _biotite_info()
    try:
        atoms = info.residue(name)
    except (KeyError, ValueError):
        return None
    heavy = np.asarray([str(e).upper() not in ("H", "D") for e in atoms.element])
    coords = np.asarray(atoms.coord, dtype=np.float64)[heavy]
    if coords.shape[0] == 0 or not np.isfinite(coords).all():
        return None
    elements = tuple(str(e).upper() for e in np.asarray(atoms.element)[heavy])
    return Conformer(name, coords - coords.mean(0, keepdims=True), elements)


def load_ccd_conformers(
    names: Iterable[str] | None = None,
    max_heavy_atoms: int = 60,
    min_heavy_atoms: int = 3,
    limit: int | None = None,
) -> list[Conformer]:
    """Conformers of CCD components with ``min_heavy_atoms..max_heavy_atoms`` heavy atoms.

    ``names`` defaults to every component (``biotite.structure.info.all_residues()``;
    reading all of them takes minutes); ``limit`` stops after that many conformers.
    """
    require(
        1 <= min_heavy_atoms <= max_heavy_atoms,
        f"need 1 <= min_heavy_atoms <= max_heavy_atoms, got {min_heavy_atoms}, {max_heavy_atoms}",
    )
    if names is None:
        names = _biotite_info().all_residues()
    out = []
    for name in names:
        conf = ccd_conformer(name)
        if conf is not None and min_heavy_atoms <= len(conf.elements) <= max_heavy_atoms:
            out.append(conf)
            if limit is not None and len(out) >= limit:
                break
    return out


def split_molecules(
    names: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), salt: str = "cryoprior"
) -> dict[str, list[str]]:
    """Split component ids into train / validation / test by a stable hash of each id.

    u = first 8 bytes of sha256(salt + id) / 2^64 is compared with the cumulative
    ``fractions``; the same id always lands in the same split.
    """
    frac = np.asarray(fractions, dtype=np.float64)
    require(
        frac.shape == (3,) and (frac >= 0).all() and frac.sum() > 0,
        f"fractions must be 3 numbers >= 0, got {tuple(fractions)}",
    )
    edges = np.cumsum(frac / frac.sum())
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in sorted(set(names)):
        digest = hashlib.sha256(f"{salt}{name}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        out[SPLITS[min(int(np.searchsorted(edges, u, side="right")), 2)]].append(name)
    return out


class ConformerDataset(Dataset):
    """Conformers as {"x": (max_atoms, 3), "mask": (max_atoms,), "types": (max_atoms,)}.

    ``x`` is in units of ``scale`` Å (None: mean radius of gyration of these conformers;
    set it from the TRAINING set), zero mean over real atoms, randomly rotated per item
    with a generator seeded by (seed, index), zero-padded; ``types`` indexes
    :data:`ELEMENTS` (padding: 0, masked out).
    """

    def __init__(
        self,
        conformers: Sequence[Conformer],
        max_atoms: int = 60,
        scale: float | None = None,
        rotations: str = "random",
        seed: int = 0,
        split: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        require(len(conformers) > 0, "no conformers given")
        too_big = [c.name for c in conformers if len(c.elements) > max_atoms]
        require(
            not too_big, f"{len(too_big)} conformers exceed max_atoms={max_atoms}: {too_big[:5]}"
        )
        require(
            rotations in ("random", "none"),
            f"rotations must be 'random' or 'none', got {rotations!r}",
        )
        self.conformers = list(conformers)
        self.max_atoms = int(max_atoms)
        self.rotations = rotations
        self.seed = int(seed)
        self.split = {k: list(v) for k, v in split.items()} if split else None
        if scale is None:
            rg = [np.sqrt((c.coords**2).sum(1).mean()) for c in self.conformers]
            scale = float(np.mean(rg))
        self.scale = float(scale)
        require(self.scale > 0, f"scale must be > 0 Å, got {self.scale}")

    def __len__(self) -> int:
        return len(self.conformers)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        conf = self.conformers[index]
        xyz = torch.from_numpy(conf.coords - conf.coords.mean(0, keepdims=True))
        if self.rotations == "random":
            xyz = xyz @ random_rotations(1, item_generator(self.seed, index), torch.float64)[0].T
        n = xyz.shape[0]
        x = torch.zeros(self.max_atoms, 3, dtype=torch.float32)
        x[:n] = (xyz / self.scale).to(torch.float32)
        x[:n] -= x[:n].mean(0, keepdim=True)
        mask = torch.zeros(self.max_atoms, dtype=torch.float32)
        mask[:n] = 1.0
        types = torch.zeros(self.max_atoms, dtype=torch.long)
        other = len(ELEMENTS) - 1
        types[:n] = torch.tensor(
            [ELEMENTS.index(e) if e in ELEMENTS else other for e in conf.elements]
        )
        return {"x": x, "mask": mask, "types": types}
