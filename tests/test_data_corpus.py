"""Corpus building from a tiny synthetic archive, cleaning, records, shipped set."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

from cryoprior.core.errors import InputError
from cryoprior.data.corpus import (
    build_corpus,
    clean_chains,
    demo_record,
    load_corpus,
    shipped_folder,
    shipped_records,
    subset_corpus,
)


def _shipped_pdb(name: str) -> str:
    return gzip.decompress((shipped_folder() / f"{name}.pdb.gz").read_bytes()).decode()


def _dirty(pdb: str, chain: str = "A") -> str:
    """Add what a raw PDB file holds: a repeated atom without altloc, a hydrogen, a
    water, a ligand, and a Cα-only second chain (rejected as incomplete)."""
    lines = [ln for ln in pdb.splitlines() if ln.startswith("ATOM")]
    extra = [
        lines[4],  # the same atom again (a second conformer written without a flag)
        lines[1][:12] + " HA " + lines[1][16:76] + " H",
        "HETATM 9001  O   HOH W   1      10.000  10.000  10.000  1.00 20.00           O",
        "HETATM 9002  C1  LIG L   1      11.000  10.000  10.000  1.00 20.00           C",
    ]
    ca_only = [
        f"ATOM  {9100 + i:5d}  CA  ALA Z{i + 1:4d}    {3.8 * i:8.3f}   0.000   0.000"
        "  1.00 20.00           C"
        for i in range(60)
    ]
    return "\n".join(lines + extra + ["TER"] + ca_only + ["END"]) + "\n"


def _tar(path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _n_atoms(pdb: str) -> int:
    return sum(1 for ln in pdb.splitlines() if ln.startswith("ATOM"))


def test_clean_chains_drops_water_ligand_h_duplicates_and_ca_traces(tmp_path) -> None:
    pdb = _shipped_pdb("5pti_A")
    path = tmp_path / "x.pdb"
    path.write_text(_dirty(pdb))
    chains = clean_chains(path)
    assert [c.chain for c in chains] == ["A"]
    c = chains[0]
    assert c.sequence == next(r.sequence for r in shipped_records() if r.name == "5pti_A")
    assert sum(len(r) for r in c.structure[0][0]) == _n_atoms(pdb)
    assert c.n_breaks == 0 and c.completeness > 0.95


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_build_corpus_from_archive(tmp_path, kind: str) -> None:
    a, b = _shipped_pdb("5pti_A"), _shipped_pdb("3a4r_A")
    files = {
        "pkg-1.0/data/5PTI.pdb": _dirty(a),
        "pkg-1.0/data/sub/3a4rA.pdb": b,
        "pkg-1.0/data/copy_of_bpti.pdb": a,
        "pkg-1.0/README.txt": "not a structure",
    }
    if kind == "tar":
        archive = tmp_path / "pkg-1.0.tar.gz"
        _tar(archive, files)
    else:
        archive = tmp_path / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as zf:
            for name, text in files.items():
                zf.writestr(name, text)
    out = tmp_path / "corpus"
    records = build_corpus(out, from_archive=[archive], min_residues=40, max_residues=200)
    names = sorted(r.name for r in records)
    assert names == ["3a4r_A", "5pti_A"]  # the copy of BPTI is a duplicate sequence
    manifest = json.loads((out / "corpus.json").read_text())
    entry = next(r for r in manifest["records"] if r["name"] == "5pti_A")
    assert entry["pdb_id"] == "5PTI"
    assert entry["source"]["path"] == "pkg-1.0/data/5PTI.pdb"
    assert "CC0" in entry["licence"]
    # both are shipped test/train proteins: BPTI is pinned to test by hold_out_shipped
    assert "5pti_A" in manifest["split"]["test"]
    assert json.loads((out / "split.json").read_text())["test"] == manifest["split"]["test"]
    by_name = {r.name: r for r in load_corpus(out)}
    coords, elements, bfac = by_name["5pti_A"].atoms()
    assert coords.shape == (_n_atoms(a), 3)
    assert set(elements) <= {"C", "N", "O", "S"}
    assert by_name["3a4r_A"].calpha().shape == (by_name["3a4r_A"].n_residues, 3)
    assert [r.name for r in load_corpus(out, split="test")] == ["5pti_A"]


def test_build_corpus_errors(tmp_path) -> None:
    archive = tmp_path / "empty-0.1.tar.gz"
    _tar(archive, {"empty-0.1/README": "nothing"})
    with pytest.raises(InputError, match="no protein chain"):
        build_corpus(tmp_path / "o", from_archive=[archive])
    with pytest.raises(InputError, match="does not exist"):
        build_corpus(tmp_path / "o", from_archive=[tmp_path / "missing.tar.gz"])
    with pytest.raises(InputError, match="no corpus.json"):
        load_corpus(tmp_path)


def test_shipped_records_and_demo() -> None:
    records = shipped_records()
    assert 12 <= len(records) <= 20
    sizes = [r.n_residues for r in records]
    assert min(sizes) >= 55 and max(sizes) <= 175
    demo = demo_record()
    coords, elements, _ = demo.atoms()
    assert coords.shape[0] > 7 * demo.n_residues  # full heavy-atom model, not a trace
    assert np.isfinite(coords).all()
    assert len(shipped_records("test")) >= 5
    total = sum(p.stat().st_size for p in shipped_folder().iterdir())
    assert total < 600 * 1024


def test_subset_corpus_checks_the_split(tmp_path) -> None:
    names = ["5pti_A", "3a4r_A", "2xcj_A"]
    recs = subset_corpus(
        shipped_folder(),
        tmp_path / "s",
        names,
        split={"train": ["3a4r_A", "2xcj_A"], "test": ["5pti_A"]},
        demo="5pti_A",
    )
    assert sorted(r.name for r in recs) == sorted(names)
    with pytest.raises(InputError, match="exactly once"):
        subset_corpus(shipped_folder(), tmp_path / "t", names, split={"train": ["3a4r_A"]})


def test_clean_chains_repairs_missing_element_column(tmp_path):
    # Columns 77-78 (element) left empty, as in some older PDB files: gemmi reads "X".
    lines = []
    serial = 1
    for i, (x, y) in enumerate([(0.0, 0.0), (3.8, 0.0), (7.6, 0.0)]):
        for name, dx in (("N", -1.0), ("CA", 0.0), ("C", 1.0), ("O", 1.5)):
            lines.append(
                f"ATOM  {serial:5d}  {name:<3s} ALA A{i + 1:4d}    "
                f"{x + dx:8.3f}{y:8.3f}{0.0:8.3f}  1.00 20.00"
            )
            serial += 1
        lines.append(
            f"ATOM  {serial:5d}  CB  ALA A{i + 1:4d}    {x:8.3f}{y + 1.5:8.3f}{0.0:8.3f}"
            "  1.00 20.00"
        )
        serial += 1
    path = tmp_path / "noelem.pdb"
    path.write_text("\n".join(lines) + "\nEND\n")
    (chain,) = clean_chains(path)
    elements = {a.element.name for r in chain.structure[0][0] for a in r}
    assert elements == {"N", "C", "O"}
