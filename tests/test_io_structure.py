"""PDB / mmCIF / XYZ structures: parsing, Cα traces, sequences, round trips, errors."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest

from cryoprior.core.errors import InputError
from cryoprior.io.structure import (
    ca_trace,
    chain_sequences,
    read_structure,
    read_xyz,
    write_pdb,
    write_xyz,
)

# Three residues in chain A (GLY with two alternative Cα positions), one in chain B with a
# blank element column, a hydrogen, a haem iron and a water.
PDB_TEXT = """\
ATOM      1  N   MET A   1      11.104   6.134  -6.504  1.00 10.00           N
ATOM      2  CA  MET A   1      11.639   6.071  -5.147  1.00 11.00           C
ATOM      3  C   MET A   1      12.000   5.000  -4.000  1.00 11.00           C
ATOM      4  H   MET A   1      11.000   6.000  -7.000  1.00 11.00           H
ATOM      5  CA AGLY A   2      12.000   7.000  -4.000  0.60 12.00           C
ATOM      6  CA BGLY A   2      12.500   7.500  -4.500  0.40 12.00           C
ATOM      7  SG  CYS A   3      14.000   8.000  -3.000  1.00 14.00           S
ATOM      8  CA  CYS A   3      13.500   8.500  -3.500  1.00 14.00           C
ATOM      9  CA  LYS B   1       1.000   2.000   3.000  1.00 13.00
HETATM   10 FE   HEM B 101       0.000   0.000   0.000  1.00 20.00          FE
HETATM   11  O   HOH A 201       5.000   5.000   5.000  1.00 30.00           O
END
"""


@pytest.fixture
def pdb_file(tmp_path):
    path = tmp_path / "tiny.pdb"
    path.write_text(PDB_TEXT)
    return path


def test_read_pdb_atoms_elements_and_flags(pdb_file):
    s = read_structure(pdb_file)
    assert len(s) == 8  # hydrogen, water and the second altloc removed
    assert s.elements == ["N", "C", "C", "C", "S", "C", "C", "FE"]
    np.testing.assert_allclose(s.coords[0], [11.104, 6.134, -6.504])
    np.testing.assert_allclose(s.coords[3], [12.0, 7.0, -4.0])  # first altloc
    assert s.chain_ids == ["A"] * 6 + ["B", "B"]
    assert s.residue_names[-1] == "HEM" and s.residue_numbers[-1] == 101
    assert s.is_hetero.tolist() == [False] * 7 + [True]
    assert s.b_factors[4] == 14.0 and s.atom_names[4] == "SG"

    full = read_structure(
        pdb_file, remove_water=False, remove_hydrogens=False, first_altloc_only=False
    )
    assert len(full) == 11 and "H" in full.elements and "HOH" in full.residue_names


def test_ca_trace_and_sequences(pdb_file):
    s = read_structure(pdb_file)
    coords, sequence = ca_trace(s)
    assert sequence == "MGCK"
    np.testing.assert_allclose(
        coords, [[11.639, 6.071, -5.147], [12.0, 7.0, -4.0], [13.5, 8.5, -3.5], [1.0, 2.0, 3.0]]
    )
    coords_a, seq_a = ca_trace(s, chain="A")
    assert seq_a == "MGC" and coords_a.shape == (3, 3)
    # With altlocs kept, the trace still takes the first Cα of GLY 2.
    full = read_structure(pdb_file, first_altloc_only=False)
    np.testing.assert_allclose(ca_trace(full, chain="A")[0][1], [12.0, 7.0, -4.0])
    assert chain_sequences(s) == {"A": "MGC", "B": "K"}
    with pytest.raises(InputError, match="chain 'Z'"):
        ca_trace(s, chain="Z")


def test_write_pdb_ca_trace_round_trip(tmp_path, pdb_file):
    coords, sequence = ca_trace(read_structure(pdb_file))
    three = {"M": "MET", "G": "GLY", "C": "CYS", "K": "LYS"}
    path = tmp_path / "trace.pdb"
    write_pdb(
        path, coords, residue_names=[three[c] for c in sequence], chain="C", bfactors=np.arange(4.0)
    )
    back = read_structure(path)
    np.testing.assert_allclose(back.coords, coords, atol=1e-3)
    assert ca_trace(back)[1] == sequence and back.atom_names == ["CA"] * 4
    assert back.chain_ids == ["C"] * 4 and back.residue_numbers.tolist() == [1, 2, 3, 4]
    assert back.b_factors.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not back.is_hetero.any()

    default = tmp_path / "ala.pdb"
    write_pdb(default, coords)
    assert ca_trace(read_structure(default))[1] == "AAAA"


def test_write_pdb_small_molecule_as_one_hetatm_residue(tmp_path):
    coords = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [2.2, 1.2, 0.0], [-0.7, 1.1, 0.3]])
    path = tmp_path / "lig.pdb"
    write_pdb(path, coords, elements=["C", "C", "N", "Cl"], residue_names="LIG")
    assert sum(line.startswith("HETATM") for line in path.read_text().splitlines()) == 4
    back = read_structure(path)
    assert back.elements == ["C", "C", "N", "CL"]
    assert back.atom_names == ["C1", "C2", "N1", "CL1"]
    assert back.is_hetero.all() and set(back.residue_numbers.tolist()) == {1}
    np.testing.assert_allclose(back.coords, coords, atol=1e-3)
    assert ca_trace(back)[1] == ""


def test_write_pdb_rejects_bad_input_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.pdb"
    with pytest.raises(InputError, match="PDB range"):
        write_pdb(path, np.array([[1e5, 0.0, 0.0]]))
    with pytest.raises(InputError, match="unknown element"):
        write_pdb(path, np.zeros((1, 3)), elements=["Qq"])
    with pytest.raises(InputError, match="shape"):
        write_pdb(path, np.zeros((2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_mmcif_read_via_gemmi(tmp_path, pdb_file):
    st = gemmi.read_structure(str(pdb_file))
    st.setup_entities()
    cif = tmp_path / "tiny.cif"
    st.make_mmcif_document().write_file(str(cif))
    from_cif, from_pdb = read_structure(cif), read_structure(pdb_file)
    np.testing.assert_allclose(from_cif.coords, from_pdb.coords)
    assert from_cif.elements == from_pdb.elements
    assert from_cif.is_hetero.tolist() == from_pdb.is_hetero.tolist()
    assert chain_sequences(from_cif) == {"A": "MGC", "B": "K"}


def test_gzipped_pdb(tmp_path):
    import gzip

    path = tmp_path / "tiny.pdb.gz"
    path.write_bytes(gzip.compress(PDB_TEXT.encode()))
    assert ca_trace(read_structure(path))[1] == "MGCK"


def test_structure_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_structure(tmp_path / "absent.pdb")
    broken = tmp_path / "broken.cif"
    broken.write_text('data_x\nloop_\n_atom_site.id\n garbage "unclosed\n')
    with pytest.raises(InputError, match="broken.cif"):
        read_structure(broken)
    junk = tmp_path / "junk.pdb"
    junk.write_text("hello world\n")
    with pytest.raises(InputError, match="no atoms"):
        read_structure(junk)
    only_water = tmp_path / "water.pdb"
    only_water.write_text(PDB_TEXT.splitlines()[-2] + "\nEND\n")
    with pytest.raises(InputError, match="no atoms"):
        read_structure(only_water)
    with pytest.raises(InputError, match="model 3"):
        read_structure(only_water, model=3, remove_water=False)


def test_xyz_round_trip_and_errors(tmp_path):
    coords = np.array([[0.0, 0.1, 0.2], [1.234567, -2.5, 3.0], [4.0, 5.0, -6.0]])
    path = tmp_path / "mol.xyz"
    write_xyz(path, coords, ["C", "fe", "O"], comment="test molecule")
    lines = path.read_text().splitlines()
    assert lines[:2] == ["3", "test molecule"] and lines[3].startswith("Fe ")
    back, elements = read_xyz(path)
    np.testing.assert_allclose(back, coords, atol=1e-6)
    assert elements == ["C", "FE", "O"]

    short = tmp_path / "short.xyz"
    short.write_text("3\ncomment\nC 0 0 0\n")
    with pytest.raises(InputError, match="expected 3 atom lines"):
        read_xyz(short)
    garbled = tmp_path / "garbled.xyz"
    garbled.write_text("1\n\nC 0 zero 0\n")
    with pytest.raises(InputError, match="line 3"):
        read_xyz(garbled)
