"""Cα point clouds: zero centre of mass, masks, padding, crops, rotations, scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_records
from cryoprior.data.pointclouds import CalphaDataset, radius_of_gyration


@pytest.fixture(scope="module")
def records():
    return shipped_records("train")[:4]


def test_items_are_centred_masked_and_padded(records) -> None:
    ds = CalphaDataset(records, max_nodes=180, n_per_structure=2, seed=0)
    assert len(ds) == 2 * len(records)
    for i in range(len(ds)):
        item = ds[i]
        x, mask = item["x"], item["mask"]
        n = records[i // 2].n_residues
        assert x.shape == (180, 3) and mask.shape == (180,)
        assert x.dtype == torch.float32 and mask.dtype == torch.float32
        assert float(mask.sum()) == n and bool((mask[:n] == 1).all())
        assert bool((x[n:] == 0).all())
        com = (x * mask[:, None]).sum(0) / mask.sum()
        assert float(com.abs().max()) < 1e-5


def test_rotation_keeps_distances_and_scale_is_mean_rg(records) -> None:
    ds = CalphaDataset(records, max_nodes=180, seed=3)
    fixed = CalphaDataset(records, max_nodes=180, rotations="none", scale=ds.scale)
    expected_scale = np.mean([radius_of_gyration(r.calpha()) for r in records])
    assert ds.scale == pytest.approx(expected_scale)
    n = records[0].n_residues
    a, b = ds[0]["x"][:n].double(), fixed[0]["x"][:n].double()
    assert not torch.allclose(a, b, atol=1e-3)
    torch.testing.assert_close(torch.cdist(a, a), torch.cdist(b, b), atol=1e-5, rtol=1e-5)
    # in units of scale: consecutive Cα are 3.8 Å apart
    step = (b[1:] - b[:-1]).norm(dim=1) * ds.scale
    assert float(step.median()) == pytest.approx(3.8, abs=0.1)


def test_long_chains_are_cropped_to_contiguous_segments(records) -> None:
    ds = CalphaDataset(
        records, max_nodes=40, n_per_structure=4, seed=1, rotations="none", scale=1.0
    )
    full = records[0].calpha()
    starts = set()
    for i in range(4):
        item = ds[i]
        assert float(item["mask"].sum()) == 40
        x = item["x"].double().numpy()
        # the crop equals a contiguous window of the chain, centred
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        found = [
            s
            for s in range(len(full) - 39)
            if np.allclose(
                np.linalg.norm(full[s : s + 40, None] - full[None, s : s + 40], axis=-1),
                d,
                atol=1e-4,
            )
        ]
        assert found
        starts.add(found[0])
        assert float(np.abs(x.mean(0)).max()) < 1e-5
    assert len(starts) > 1  # different items crop different windows
    again = CalphaDataset(
        records, max_nodes=40, n_per_structure=4, seed=1, rotations="none", scale=1.0
    )
    assert torch.equal(again[2]["x"], ds[2]["x"])


def test_arrays_and_errors() -> None:
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(10, 3)) * 5
    ds = CalphaDataset([cloud], max_nodes=12, scale=2.0)
    assert ds.names == ["structure0"] and ds.metadata["scale"] == 2.0
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch["x"].shape == (2, 12, 3) and batch["mask"].shape == (2, 12)
    with pytest.raises(InputError):
        CalphaDataset([np.zeros((4, 2))], max_nodes=8)
    with pytest.raises(InputError):
        CalphaDataset([cloud], max_nodes=8, rotations="some")
    with pytest.raises(IndexError):
        ds[5]
