"""Prior files: safetensors + JSON round trip, no pickle, archives, checks, sampling."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion import CosineSchedule, Denoiser, VESchedule, ddim_sample
from cryoprior.networks import EGNN, UNet
from cryoprior.priors import (
    Prior,
    PriorMetadata,
    denoiser_config,
    load_prior,
    read_prior_metadata,
    save_prior,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and immune to a busy machine; restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero weights everywhere (networks zero-initialise their last layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


CASES = {
    "image": dict(
        net=lambda: UNet(2, 1, 1, base_channels=8, channel_mults=(1, 2), groups=4),
        shape=(1, 8, 6),
        pixel_size=1.5,
        denoiser=dict(prediction="eps"),
    ),
    "volume": dict(
        net=lambda: UNet(3, 1, 1, base_channels=4, channel_mults=(1, 2), groups=2),
        shape=(1, 4, 4, 4),
        pixel_size=2.0,
        denoiser=dict(prediction="v"),
    ),
    "points": dict(
        net=lambda: EGNN(hidden_features=16, num_layers=2, checkpoint=False),
        shape=(7, 3),
        pixel_size=None,
        denoiser=dict(prediction="eps", representation="points"),
    ),
}


def make_prior(kind: str, seed: int = 0, normalisation=None) -> Prior:
    case = CASES[kind]
    torch.manual_seed(seed)
    net = randomise(case["net"](), seed)
    denoiser = Denoiser(net, CosineSchedule(), **case["denoiser"])
    meta = PriorMetadata(
        representation=kind,
        shape=case["shape"],
        pixel_size=case["pixel_size"],
        normalisation=normalisation or {"scale": 2.0, "offset": 0.5 if kind != "points" else 0},
        data={"kind": "test", "split": {"train": ["a", "b"], "val": ["c"], "test": ["d"]}},
        command="pytest",
        extra={"note": "unit test"},
    )
    return Prior(denoiser, meta)


@pytest.mark.parametrize("kind", ["image", "volume", "points"])
def test_round_trip_identical_outputs(kind, tmp_path, monkeypatch):
    prior = make_prior(kind)
    folder = save_prior(tmp_path / "p", prior.denoiser, prior.metadata)
    assert sorted(p.name for p in folder.iterdir()) == ["prior.json", "weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary folders left
    for f in folder.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), "pickle protocol header found"

    def refuse(*a, **k):
        raise AssertionError("load_prior must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_prior(folder)
    monkeypatch.undo()

    assert loaded.metadata.to_dict() == prior.metadata.to_dict()
    assert loaded.metadata.diffusion == denoiser_config(prior.denoiser)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, *prior.shape, generator=g)
    t = torch.tensor([0.3, 0.8])
    a, b = prior.denoiser.eval()(x, t), loaded.denoiser(x, t)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps)
    s1 = prior.sample(2, steps=3, generator=torch.Generator().manual_seed(1))
    s2 = loaded.sample(2, steps=3, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (2, *prior.shape) and torch.equal(s1, s2)


def test_sample_is_in_physical_units():
    prior = make_prior("image", normalisation={"scale": 3.0, "offset": -1.0})
    got = prior.sample(3, steps=4, generator=torch.Generator().manual_seed(2))
    raw = ddim_sample(prior.denoiser, (3, 1, 8, 6), n_steps=4,
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(got, 3.0 * raw - 1.0)
    torch.testing.assert_close(prior.normalise(prior.denormalise(raw)), raw)
    # batched sampling draws the same numbers in the same order
    chunked = prior.sample(3, steps=4, generator=torch.Generator().manual_seed(2), batch_size=3)
    assert torch.equal(chunked, got)


def test_point_samples_respect_node_counts():
    prior = make_prior("points")
    x = prior.sample(2, sampler="ddpm", steps=3, n_nodes=[4, 7],
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert x.shape == (2, 7, 3)
    assert torch.all(x[0, 4:] == 0) and torch.all(x[0, :4] != 0)
    # zero centre of mass over the real nodes (relative to the cloud's size)
    assert x[0, :4].mean(0).abs().max() <= 1e-5 * x[0].abs().max()
    with pytest.raises(InputError, match="up to 7 points"):
        prior.sample(1, n_nodes=9)


def test_check_compatible_messages():
    prior = make_prior("volume")
    prior.check_compatible(box=4, pixel_size=2.0, representation="volume")
    prior.check_compatible(box=(4, 4, 4), pixel_size=2.0005)
    with pytest.raises(InputError, match=r"4x4x4-pixel volumes .* 8x8x8"):
        prior.check_compatible(box=8)
    with pytest.raises(InputError, match=r"2 Å/px .* 1\.5 Å/px"):
        prior.check_compatible(pixel_size=1.5)
    with pytest.raises(InputError, match="models volumes, the data are images"):
        prior.check_compatible(representation="image")
    with pytest.raises(InputError, match="no box"):
        make_prior("points").check_compatible(box=8)


def test_archives_load(tmp_path):
    prior = make_prior("image")
    folder = save_prior(tmp_path / "prior", prior.denoiser, prior.metadata)
    zpath = tmp_path / "prior.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"prior/{f.name}")
    tpath = tmp_path / "prior.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(folder, arcname="prior")
    x = torch.randn(1, 1, 8, 6)
    ref = load_prior(folder).denoiser(x, 0.5).x0
    for p in (zpath, tpath):
        assert torch.equal(load_prior(p).denoiser(x, 0.5).x0, ref)
    assert read_prior_metadata(zpath).shape == (1, 8, 6)


def test_save_is_atomic_and_overwrites(tmp_path, monkeypatch):
    first = make_prior("image", seed=0)
    folder = save_prior(tmp_path / "p", first.denoiser, first.metadata)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    second = make_prior("image", seed=1)
    original = Path.write_text

    def failing(self, *a, **k):
        if self.name == "prior.json":
            raise OSError("disk full")
        return original(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError):
        save_prior(folder, second.denoiser, second.metadata)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]

    save_prior(folder, second.denoiser, second.metadata)
    x = torch.randn(1, 1, 8, 6)
    assert torch.equal(load_prior(folder).denoiser(x, 0.5).x0, second.denoiser(x, 0.5).x0)
    with pytest.raises(InputError, match="already exists"):
        save_prior(folder, second.denoiser, second.metadata, overwrite=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(InputError, match="not a prior folder"):
        save_prior(tmp_path / "other", second.denoiser, second.metadata)


def test_corrupt_or_foreign_files(tmp_path):
    prior = make_prior("image")
    folder = save_prior(tmp_path / "p", prior.denoiser, prior.metadata)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    w = bytearray((bad / "weights.safetensors").read_bytes())
    w[-1] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(w))
    with pytest.raises(InputError, match="checksum"):
        load_prior(bad)
    meta = json.loads((folder / "prior.json").read_text())
    meta["network"]["base_channels"] = 16
    (bad / "prior.json").write_text(json.dumps(meta))
    shutil.copy(folder / "weights.safetensors", bad / "weights.safetensors")
    with pytest.raises(InputError, match="do not fit"):
        load_prior(bad)
    with pytest.raises(InputError, match="not a prior folder"):
        load_prior(tmp_path)
    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    (tmp_path / "x.pt").write_bytes(buf.getvalue())
    with pytest.raises(InputError):
        load_prior(tmp_path / "x.pt")


def test_metadata_validation():
    with pytest.raises(InputError, match="pixel size"):
        PriorMetadata(representation="image", shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"\(C, D, H, W\)"):
        PriorMetadata(representation="volume", shape=(8, 8, 8), pixel_size=1.0)
    with pytest.raises(InputError, match="scale"):
        PriorMetadata(
            representation="points", shape=(5, 3), normalisation={"scale": 0.0, "offset": 0.0}
        )
    with pytest.raises(InputError, match="not a cryoprior prior"):
        PriorMetadata.from_dict({"format": "other"})


def test_bare_network_needs_diffusion(tmp_path):
    net = randomise(UNet(2, 1, 1, base_channels=8, channel_mults=(1, 2), groups=4), 0)
    meta = PriorMetadata(representation="image", shape=(1, 8, 8), pixel_size=1.0)
    with pytest.raises(InputError, match="diffusion"):
        save_prior(tmp_path / "p", net, meta)
    meta.diffusion = denoiser_config(Denoiser(net, VESchedule(), "x0", precondition=True))
    save_prior(tmp_path / "p", net, meta)
    loaded = load_prior(tmp_path / "p")
    assert loaded.denoiser.precondition and loaded.denoiser.schedule.name == "ve"


def test_shipped_priors_resolve_by_name_and_unknown_names_fail_clearly(tmp_path):
    from cryoprior.priors import read_prior_metadata, resolve_prior, shipped_priors

    shipped = shipped_priors()
    assert {"volume_32", "mnist"} <= set(shipped)
    assert resolve_prior("volume_32") == shipped["volume_32"]
    assert read_prior_metadata("volume_32").spatial_shape == (32, 32, 32)
    # an existing path wins over a shipped name
    (tmp_path / "volume_32").mkdir()
    assert resolve_prior(tmp_path / "volume_32") == tmp_path / "volume_32"
    with pytest.raises(InputError, match="shipped prior.*volume_32"):
        resolve_prior("no_such_prior")


@pytest.mark.parametrize(
    "name", ["volume_32", "calpha_prior", "heat_sr_calpha", "heat_sr_molecules"]
)
def test_shipped_prior_loads_and_its_split_is_disjoint(name):
    """Every shipped structure prior loads, records its command, and its training items
    (proteins or molecules) never appear in its validation or test split; the demo protein
    is held out."""
    from cryoprior.priors import load_prior, read_prior_metadata

    meta = read_prior_metadata(name)
    assert meta.command.startswith("cryoprior train configs/")
    split = meta.data["split"]
    train = set(split["train"])
    assert train and not train & set(split["validation"])
    assert not train & set(split["test"])
    assert "1fki_A" not in train
    assert load_prior(name).metadata.command == meta.command
