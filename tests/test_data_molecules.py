"""Small-molecule conformers (biotite optional) and molecule-identity splits."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.data.molecules import (
    ELEMENTS,
    Conformer,
    ConformerDataset,
    ccd_conformer,
    load_ccd_conformers,
    split_molecules,
)

HAVE_BIOTITE = importlib.util.find_spec("biotite") is not None


def test_split_by_component_id_is_stable_and_disjoint() -> None:
    names = [f"C{i:03d}" for i in range(400)]
    split = split_molecules(names)
    assert sorted(sum(split.values(), [])) == names
    assert 0.7 < len(split["train"]) / 400 < 0.9
    # adding molecules never moves existing ones
    bigger = split_molecules(names + ["NEW1", "NEW2"])
    for s in split:
        assert set(split[s]) <= set(bigger[s])


def test_conformer_dataset_centres_and_types() -> None:
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(5, 3)) * 2
    conf = Conformer("XYZ", coords - coords.mean(0), ("C", "C", "N", "O", "ZN"))
    ds = ConformerDataset([conf], max_atoms=8, seed=0)
    item = ds[0]
    assert item["x"].shape == (8, 3) and float(item["mask"].sum()) == 5
    assert float(item["x"][:5].mean(0).abs().max()) < 1e-6
    assert item["types"][:5].tolist() == [0, 0, 1, 2, len(ELEMENTS) - 1]
    a = item["x"][:5].double()
    b = torch.from_numpy(conf.coords) / ds.scale
    torch.testing.assert_close(torch.cdist(a, a), torch.cdist(b, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError):
        ConformerDataset([conf], max_atoms=4)


@pytest.mark.skipif(HAVE_BIOTITE, reason="biotite installed")
def test_without_biotite_the_error_says_what_to_install() -> None:
    with pytest.raises(InputError, match="pip install biotite"):
        ccd_conformer("ATP")


@pytest.mark.skipif(not HAVE_BIOTITE, reason="biotite not installed")
def test_ccd_conformers_heavy_atoms_only() -> None:
    confs = load_ccd_conformers(["ATP", "HEM", "NOT_A_COMPONENT"], max_heavy_atoms=60)
    names = [c.name for c in confs]
    assert "ATP" in names and "NOT_A_COMPONENT" not in names
    atp = next(c for c in confs if c.name == "ATP")
    assert len(atp.elements) == 31 and "H" not in atp.elements
    np.testing.assert_allclose(atp.coords.mean(0), 0, atol=1e-9)
