"""Map data sets: determinism per index, rotation augmentation, normalisation, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_records
from cryoprior.data.volumes import CachedMapDataset, MapDataset

PIXEL = 3.0


@pytest.fixture(scope="module")
def records():
    by_name = {r.name: r for r in shipped_records()}
    return [by_name["5pti_A"], by_name["3a4r_A"]]  # the two smallest: fast


@pytest.mark.parametrize("box", [26, 27])
def test_maps_are_deterministic_per_index_and_seed(records, box: int) -> None:
    a = MapDataset(records, box, PIXEL, n_per_structure=3, seed=5, scale=1.0)
    b = MapDataset(records, box, PIXEL, n_per_structure=3, seed=5, scale=1.0)
    c = MapDataset(records, box, PIXEL, n_per_structure=3, seed=6, scale=1.0)
    assert len(a) == 6
    x = a[4]
    assert x.shape == (1, box, box, box) and x.dtype == torch.float32
    assert torch.equal(x, b[4])
    assert torch.equal(x, a[4])
    assert not torch.allclose(x, c[4])
    assert not torch.allclose(a[3], a[4])  # two orientations of one protein differ


@pytest.mark.parametrize("box", [26, 27])
def test_rotation_changes_the_map_but_keeps_its_integral(records, box: int) -> None:
    rot = MapDataset(records[:1], box, PIXEL, n_per_structure=2, seed=0, scale=1.0)
    fixed = MapDataset(records[:1], box, PIXEL, rotations="none", scale=1.0)
    m0 = fixed[0].double()
    for i in range(2):
        m = rot[i].double()
        assert (m - m0).abs().max() > 0.2 * m0.abs().max()
        torch.testing.assert_close(m.sum(), m0.sum(), rtol=1e-4, atol=0)
    # the rotation is a proper one and is the one reported
    r = rot.rotation(1)
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64))
    assert torch.linalg.det(r) == pytest.approx(1.0)
    # the unrotated map's centre of mass is at the box centre (centred model)
    idx = torch.arange(box, dtype=torch.float64) - box // 2
    com_z = (m0[0].sum((1, 2)) * idx).sum() / m0.sum()
    assert abs(float(com_z)) < 0.2


def test_scale_is_fixed_from_training_and_recorded(records) -> None:
    train = MapDataset(records, 26, PIXEL, seed=0)
    assert train.scale > 0 and train.scale_source.startswith("estimated")
    raw = torch.stack([train.render(i).double() for i in range(len(train))])
    # rotation does not change the voxel statistics much: std of normalised maps ~ 1
    assert float((raw / train.scale).std()) == pytest.approx(1.0, rel=0.15)
    val = MapDataset(records[:1], 26, PIXEL, seed=1, scale=train.scale)
    assert val.scale == train.scale and val.metadata["scale_source"] == "given"
    torch.testing.assert_close(
        val[0][0].double(), val.render(0).double() / train.scale, rtol=1e-5, atol=1e-6
    )


def test_bfactor_modes(records) -> None:
    auto = MapDataset(records[:1], 26, PIXEL, rotations="none", scale=1.0)
    sharp = MapDataset(records[:1], 26, PIXEL, rotations="none", scale=1.0, bfactor=0.0)
    assert float(sharp[0].max()) > float(auto[0].max())
    torch.testing.assert_close(sharp[0].sum(), auto[0].sum(), rtol=1e-4, atol=0)
    with pytest.raises(InputError):
        MapDataset(records[:1], 26, PIXEL, bfactor="sharp")


def test_oversize_structures(records) -> None:
    with pytest.raises(InputError, match="beyond the box"):
        MapDataset(records, 12, PIXEL, scale=1.0)
    with pytest.raises(InputError, match="no structure fits"):
        MapDataset(records, 12, PIXEL, scale=1.0, on_oversize="skip")
    coords = np.array([[0.0, 0.0, 0.0], [60.0, 0.0, 0.0], [1.5, 0.0, 0.0]])
    ds = MapDataset(
        [records[0], (coords, ["C", "C", "N"])], 26, PIXEL, scale=1.0, on_oversize="skip"
    )
    assert ds.names == ["5pti_A"] and ds.skipped == ["structure1"]


def test_precompute_and_cache_round_trip(records, tmp_path) -> None:
    split = {"train": ["5pti_A", "3a4r_A"], "validation": [], "test": []}
    ds = MapDataset(records, 26, PIXEL, n_per_structure=2, seed=2, split=split)
    expected = torch.stack([ds[i] for i in range(len(ds))])
    maps = ds.precompute(path=tmp_path / "maps.safetensors", show_progress=False)
    torch.testing.assert_close(maps, expected)
    assert torch.equal(ds[3], expected[3])
    cached = CachedMapDataset(tmp_path / "maps.safetensors")
    assert len(cached) == 4 and cached.box == 26 and cached.pixel_size == PIXEL
    assert cached.scale == pytest.approx(ds.scale)
    assert cached.metadata["split"] == split
    assert cached.metadata["names"] == ["5pti_A", "3a4r_A"]
    torch.testing.assert_close(cached[1], expected[1])
    with pytest.raises(InputError):
        CachedMapDataset(tmp_path / "missing.safetensors")
