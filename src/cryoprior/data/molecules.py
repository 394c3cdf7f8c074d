"""Small-molecule conformers from the PDB Chemical Component Dictionary (optional).

The CCD (~49,000 components with ideal 3-D coordinates) ships inside the ``biotite``
wheel (BSD-3-Clause; the CCD itself is wwPDB data, CC0). biotite is an optional
dependency (``pip install cryoprior[molecules]`` or ``pip install biotite``) imported only
when this module's functions run. Conformers are the heavy atoms of each component's
ideal coordinates, centred. Splits are by molecule identity (component id), assigned by a
stable hash of the id, so adding components never moves existing ones between splits.
Stereoisomers and tautomers have their own ids and may fall into different splits.

:func:`select_ccd_conformers` draws a stable pseudo-random sample of components for each
split (for training sets of a few thousand molecules without reading all ~49,000), and
:func:`bonded_pairs` lists the covalent bonds of a conformer from its distances (for
bond-length errors).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cryoprior.core.errors import InputError, require
from cryoprior.core.runtime import progress
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
        with warnings.catch_warnings():
            # components without ideal coordinates fall back to model coordinates
            warnings.simplefilter("ignore", UserWarning)
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


def _hash_unit(text: str) -> float:
    """u in [0, 1) from the first 8 bytes of sha256(text)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def select_ccd_conformers(
    n_per_split: Mapping[str, int],
    max_heavy_atoms: int = 60,
    min_heavy_atoms: int = 3,
    organic_only: bool = True,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    salt: str = "cryoprior",
    names: Sequence[str] | None = None,
    show_progress: bool = False,
) -> dict[str, list[Conformer]]:
    """Up to ``n_per_split[split]`` CCD conformers for each of train / validation / test.

    Component ids (``names``, default every CCD component) are split by molecule identity
    with :func:`split_molecules` (``fractions``, ``salt``); within a split they are visited
    in the order of sha256(salt + "order" + id), a fixed pseudo-random order, and read
    until the split has its quota of conformers with ``min_heavy_atoms..max_heavy_atoms``
    heavy atoms (and, with ``organic_only``, only elements of :data:`ELEMENTS` other than
    "OTHER", i.e. no metals). The same arguments always give the same molecules; a split
    not in ``n_per_split`` gets none.
    """
    unknown = sorted(set(n_per_split) - set(SPLITS))
    require(not unknown, f"unknown split(s) {unknown}; splits: {SPLITS}")
    require(
        all(int(n) >= 0 for n in n_per_split.values()),
        f"counts per split must be >= 0, got {dict(n_per_split)}",
    )
    if names is None:
        names = _biotite_info().all_residues()
    split = split_molecules(names, fractions, salt)
    allowed = set(ELEMENTS[:-1])
    out: dict[str, list[Conformer]] = {s: [] for s in SPLITS}
    for name_split in SPLITS:
        want = int(n_per_split.get(name_split, 0))
        if want == 0:
            continue
        order = sorted(split[name_split], key=lambda n: _hash_unit(f"{salt}order{n}"))
        bar = progress(order, desc=f"CCD {name_split}", enabled=show_progress)
        for name in bar:
            conf = ccd_conformer(name)
            if conf is None or not min_heavy_atoms <= len(conf.elements) <= max_heavy_atoms:
                continue
            if organic_only and not set(conf.elements) <= allowed:
                continue
            out[name_split].append(conf)
            if len(out[name_split]) >= want:
                break
    return out


#: Covalent radii in Å (Cordero et al. 2008, Dalton Trans., Table 2; C sp3), for
#: :func:`bonded_pairs`; elements not listed use 1.5 Å.
COVALENT_RADII = {
    "C": 0.76,
    "N": 0.71,
    "O": 0.66,
    "S": 1.05,
    "P": 1.07,
    "F": 0.57,
    "CL": 1.02,
    "BR": 1.20,
    "I": 1.39,
    "B": 0.84,
    "SE": 1.20,
}


def bonded_pairs(
    coords: np.ndarray | torch.Tensor, elements: Sequence[str], tolerance: float = 0.4
) -> np.ndarray:
    """Index pairs (M, 2), i < j, of atoms closer than r_i + r_j + ``tolerance`` Å.

    r are :data:`COVALENT_RADII`; the usual distance criterion for covalent bonds of a
    reasonable geometry (e.g. the ideal CCD coordinates).
    """
    xyz = np.asarray(coords, dtype=np.float64)
    require(
        xyz.ndim == 2 and xyz.shape[1] == 3 and len(elements) == xyz.shape[0],
        f"need coords (N, 3) and N elements, got {xyz.shape} and {len(elements)}",
    )
    r = np.asarray([COVALENT_RADII.get(str(e).upper(), 1.5) for e in elements])
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    i, j = np.nonzero(np.triu(d < r[:, None] + r[None, :] + tolerance, k=1))
    return np.stack([i, j], axis=1)


class ConformerDataset(Dataset):
    """Conformers as {"x": (max_atoms, 3), "mask": (max_atoms,), "types": (max_atoms,)}.

    ``x`` is in units of ``scale`` Å (None: mean radius of gyration of these conformers;
    set it from the TRAINING set), zero mean over real atoms, randomly rotated per item
    with a generator seeded by (seed, index), zero-padded; ``types`` indexes
    :data:`ELEMENTS` (padding: 0, masked out). :meth:`collate` stacks items and drops the
    padding columns that no item of the batch uses.
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

    @property
    def names(self) -> list[str]:
        """Component ids, in order."""
        return [c.name for c in self.conformers]

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items into a batch trimmed to the largest molecule's atom count (padding
        columns no item uses cost EGNN time for nothing; masked results are unchanged)."""
        n = max(int(item["mask"].sum()) for item in items)
        return {k: torch.stack([item[k][:n] for item in items]) for k in items[0]}
