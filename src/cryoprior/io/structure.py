"""Atomic structures: PDB / mmCIF via gemmi, and plain XYZ files.

A :class:`Structure` is a flat list of atoms (one model) with coordinates in Å. Element
symbols are upper case ('C', 'N', 'FE'), as in PDB columns 77-78.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

from cryoprior.core.errors import InputError
from cryoprior.core.files import atomic_path, write_text_atomic

# The 20 standard amino acids, three-letter -> one-letter code.
THREE_TO_ONE = {
    "ALA": "A",
    "ARG": "R",
    "ASN": "N",
    "ASP": "D",
    "CYS": "C",
    "GLN": "Q",
    "GLU": "E",
    "GLY": "G",
    "HIS": "H",
    "ILE": "I",
    "LEU": "L",
    "LYS": "K",
    "MET": "M",
    "PHE": "F",
    "PRO": "P",
    "SER": "S",
    "THR": "T",
    "TRP": "W",
    "TYR": "Y",
    "VAL": "V",
}
# Selenomethionine (crystal structures) is read as methionine in traces and sequences.
_TRACE_RESIDUES = {**THREE_TO_ONE, "MSE": "M"}
#: residue names written as ATOM records (the standard amino acids and UNK, unknown residue)
_POLYMER_RESIDUES = {*THREE_TO_ONE, "UNK"}
# PDB coordinate fields are 8.3f: values must fit in 8 characters.
_PDB_MIN, _PDB_MAX = -999.999, 9999.999


@dataclass
class Structure:
    """The atoms of one model: per-atom arrays and lists, all of length N.

    coords (N, 3) float64 Å; elements upper-case symbols; b_factors (N,) Å²; occupancies
    (N,); chain_ids, residue_names, atom_names, insertion_codes lists of str;
    residue_numbers (N,) int64; is_hetero (N,) bool (HETATM records).
    """

    coords: np.ndarray
    elements: list[str]
    b_factors: np.ndarray
    occupancies: np.ndarray
    chain_ids: list[str]
    residue_names: list[str]
    residue_numbers: np.ndarray
    insertion_codes: list[str]
    atom_names: list[str]
    is_hetero: np.ndarray

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def subset(self, mask: np.ndarray) -> Structure:
        """A new Structure with the atoms selected by a boolean mask or integer indices."""
        idx = np.arange(len(self))[np.asarray(mask)]
        return Structure(
            **{
                name: value[idx] if isinstance(value, np.ndarray) else [value[i] for i in idx]
                for name, value in vars(self).items()
            }
        )

    def _residue_keys(self) -> list[tuple[str, int, str, str]]:
        """(chain, number, insertion code, name) per atom: equal keys = same residue."""
        return list(
            zip(
                self.chain_ids,
                self.residue_numbers.tolist(),
                self.insertion_codes,
                self.residue_names,
            )
        )


def read_structure(
    path: str | os.PathLike,
    model: int = 0,
    remove_water: bool = True,
    remove_hydrogens: bool = True,
    first_altloc_only: bool = True,
) -> Structure:
    """Read one model of a PDB or mmCIF file (.pdb, .ent, .cif, .mmcif; .gz too).

    Waters and hydrogens (incl. deuterium) are removed by default, and of alternative
    conformations only the first is kept. Raises InputError for a missing or unparsable
    file, a model index out of range, or no atoms left.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable PDB/mmCIF file ({err})") from None
    if len(st) == 0:
        raise InputError(f"{path}: no atoms found (is it a PDB or mmCIF file?)")
    if not 0 <= model < len(st):
        raise InputError(
            f"{path}: model {model} requested but the file has {len(st)} "
            "model(s) (models are counted from 0)"
        )
    if remove_water:
        st.remove_waters()
    if remove_hydrogens:
        st.remove_hydrogens()
    if first_altloc_only:
        st.remove_alternative_conformations()
    records = [(chain.name, res, atom) for chain in st[model] for res in chain for atom in res]
    if not records:
        removed = " after removing waters and hydrogens" if remove_water or remove_hydrogens else ""
        raise InputError(f"{path}: no atoms in model {model}{removed}")
    return Structure(
        coords=np.array([[a.pos.x, a.pos.y, a.pos.z] for _, _, a in records], dtype=np.float64),
        elements=[a.element.name.upper() for _, _, a in records],
        b_factors=np.array([a.b_iso for _, _, a in records], dtype=np.float64),
        occupancies=np.array([a.occ for _, _, a in records], dtype=np.float64),
        chain_ids=[c for c, _, _ in records],
        residue_names=[r.name for _, r, _ in records],
        residue_numbers=np.array([r.seqid.num for _, r, _ in records], dtype=np.int64),
        insertion_codes=[r.seqid.icode.strip() for _, r, _ in records],
        atom_names=[a.name for _, _, a in records],
        is_hetero=np.array([r.het_flag == "H" for _, r, _ in records], dtype=bool),
    )


def ca_trace(structure: Structure, chain: str | None = None) -> tuple[np.ndarray, str]:
    """Cα coordinates (M, 3) Å and the one-letter sequence of the amino-acid residues.

    Uses the standard amino acids (and MSE as M), one Cα per residue (the first, i.e.
    the first alternative location), in file order; all chains when ``chain`` is None.
    """
    if chain is not None and chain not in structure.chain_ids:
        raise InputError(
            f"chain {chain!r} not found; chains present: {sorted(set(structure.chain_ids))}"
        )
    seen: set[tuple[str, int, str, str]] = set()
    rows, letters = [], []
    for i, key in enumerate(structure._residue_keys()):
        if (chain is not None and key[0] != chain) or key in seen:
            continue
        if (
            key[3] in _TRACE_RESIDUES
            and structure.atom_names[i] == "CA"
            and structure.elements[i] == "C"
        ):
            seen.add(key)
            rows.append(i)
            letters.append(_TRACE_RESIDUES[key[3]])
    return structure.coords[rows].reshape(-1, 3), "".join(letters)


def chain_sequences(structure: Structure) -> dict[str, str]:
    """One-letter amino-acid sequence of each chain's modelled residues, in file order.

    Chains without standard amino acids (e.g. only ligands or nucleic acid) are left out.
    """
    sequences: dict[str, list[str]] = {}
    seen: set[tuple[str, int, str, str]] = set()
    for key in structure._residue_keys():
        if key in seen or key[3] not in _TRACE_RESIDUES:
            continue
        seen.add(key)
        sequences.setdefault(key[0], []).append(_TRACE_RESIDUES[key[3]])
    return {c: "".join(s) for c, s in sequences.items()}


def _per_atom(value: str | list[str] | None, n: int, default: str, name: str) -> list[str]:
    """A per-atom list from one string, a list of N strings, or the default."""
    if value is None:
        value = default
    if isinstance(value, str):
        return [value] * n
    values = [str(v) for v in value]
    if len(values) != n:
        raise InputError(f"{name} has {len(values)} entries for {n} atoms")
    return values


def _checked_coords(coords: np.ndarray) -> np.ndarray:
    """Coordinates as an (N, 3) float64 array of finite values."""
    xyz = np.asarray(coords, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
        raise InputError(f"coordinates must have shape (N, 3) with N >= 1, got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise InputError("coordinates contain NaN or infinite values")
    return xyz


def _element(symbol: str) -> gemmi.Element:
    element = gemmi.Element(symbol)
    if element.name == "X" and symbol.upper() != "X":
        raise InputError(f"unknown element symbol {symbol!r}")
    return element


def write_pdb(
    path: str | os.PathLike,
    coords: np.ndarray,
    elements: str | list[str] | None = None,
    atom_names: str | list[str] | None = None,
    residue_names: str | list[str] | None = None,
    chain: str = "A",
    bfactors: np.ndarray | None = None,
    residue_numbers: np.ndarray | list[int] | None = None,
) -> None:
    """Write atoms (N, 3) Å as a PDB file, atomically.

    Defaults suit a Cα trace: residue 'ALA', atom 'CA', element 'C', one residue per atom.
    A single non-amino-acid residue name (e.g. ``residue_names='LIG'``) writes one HETATM
    residue holding every atom, with atom names like C1, C2, N1 when none are given.
    Elements default to the first letter of each atom name. Standard amino acids are
    written as ATOM records, everything else as HETATM.
    """
    xyz = _checked_coords(coords)
    n = xyz.shape[0]
    if xyz.min() < _PDB_MIN or xyz.max() > _PDB_MAX:
        raise InputError(
            f"{path}: coordinates outside the PDB range [{_PDB_MIN}, {_PDB_MAX}] "
            "Å; centre them or write mmCIF"
        )
    if not 1 <= len(chain) <= 2:
        raise InputError(f"chain id must be 1 or 2 characters, got {chain!r}")
    res_names = _per_atom(residue_names, n, "ALA", "residue_names")
    one_residue = isinstance(residue_names, str) and residue_names not in _POLYMER_RESIDUES
    if residue_numbers is None:
        numbers = np.ones(n, dtype=np.int64) if one_residue else np.arange(1, n + 1)
    else:
        numbers = np.asarray(residue_numbers, dtype=np.int64).reshape(-1)
        if numbers.size != n:
            raise InputError(f"residue_numbers has {numbers.size} entries for {n} atoms")
    if atom_names is None and one_residue:
        symbols = _per_atom(elements, n, "C", "elements")
        counts: dict[str, int] = {}
        names = []
        for s in symbols:
            counts[s.upper()] = counts.get(s.upper(), 0) + 1
            names.append(f"{s.upper()}{counts[s.upper()]}")
    else:
        names = _per_atom(atom_names, n, "CA", "atom_names")
    if elements is None:
        symbols = [next((ch for ch in name if ch.isalpha()), "X") for name in names]
    else:
        symbols = _per_atom(elements, n, "C", "elements")
    if any(not 1 <= len(r) <= 3 for r in res_names) or any(not 1 <= len(a) <= 4 for a in names):
        raise InputError("PDB residue names must have 1-3 characters and atom names 1-4")
    b = np.zeros(n) if bfactors is None else np.asarray(bfactors, dtype=np.float64).reshape(-1)
    if b.size != n:
        raise InputError(f"bfactors has {b.size} entries for {n} atoms")

    gemmi_chain = gemmi.Chain(chain)
    residue = None
    for i in range(n):
        key = (res_names[i], int(numbers[i]))
        if residue is None or (residue.name, residue.seqid.num) != key:
            if residue is not None:
                gemmi_chain.add_residue(residue)
            residue = gemmi.Residue()
            residue.name = res_names[i]
            residue.seqid = gemmi.SeqId(int(numbers[i]), " ")
            residue.het_flag = "A" if res_names[i] in _POLYMER_RESIDUES else "H"
        atom = gemmi.Atom()
        atom.name = names[i]
        atom.element = _element(symbols[i])
        atom.pos = gemmi.Position(*xyz[i])
        atom.occ = 1.0
        atom.b_iso = float(b[i])
        residue.add_atom(atom)
    gemmi_chain.add_residue(residue)
    model = gemmi.Model("1")
    model.add_chain(gemmi_chain)
    st = gemmi.Structure()
    st.add_model(model)
    with atomic_path(path) as tmp:
        st.write_pdb(str(tmp))


def write_xyz(
    path: str | os.PathLike, coords: np.ndarray, elements: list[str], comment: str = ""
) -> None:
    """Write an XYZ file (count, comment, then ``Symbol x y z`` in Å per atom), atomically."""
    xyz = _checked_coords(coords)
    if len(elements) != xyz.shape[0]:
        raise InputError(f"elements has {len(elements)} entries for {xyz.shape[0]} atoms")
    if "\n" in comment:
        raise InputError("the XYZ comment must be a single line")
    lines = [str(xyz.shape[0]), comment]
    for symbol, (x, y, z) in zip(elements, xyz):
        lines.append(f"{_element(symbol).name:<2s} {x:14.6f} {y:14.6f} {z:14.6f}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_xyz(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read the first frame of an XYZ file: coordinates (N, 3) Å and upper-case elements."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    lines = path.read_text().splitlines()
    try:
        n = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise InputError(f"{path}: the first line must be the atom count") from None
    if n < 1 or len(lines) < n + 2:
        raise InputError(
            f"{path}: expected {n} atom lines after the comment line, found "
            f"{max(len(lines) - 2, 0)}"
        )
    coords = np.empty((n, 3))
    elements = []
    for i, line in enumerate(lines[2 : n + 2]):
        parts = line.split()
        try:
            coords[i] = [float(v) for v in parts[1:4]]
        except ValueError:
            parts = []
        if len(parts) < 4:
            raise InputError(f"{path}: line {i + 3} is not 'Symbol x y z': {line!r}")
        try:
            elements.append(_element(parts[0]).name.upper())
        except InputError as err:
            raise InputError(f"{path}: line {i + 3}: {err}") from None
    return coords, elements
