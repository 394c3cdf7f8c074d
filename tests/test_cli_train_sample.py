"""End to end: `cryoprior train` on tiny synthetic configs, then `cryoprior sample`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryoprior.cli import sample as sample_cli
from cryoprior.cli import train as train_cli
from cryoprior.core.errors import InputError
from cryoprior.io.structure import read_structure
from cryoprior.networks import NETWORKS
from cryoprior.priors import load_prior
from cryoprior.train.config import DATA_KINDS, load_run_config


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(module, argv: list) -> int:
    """Call a subcommand as `cryoprior <name> ARGS` would (sys.argv is what gets recorded)."""
    argv = [str(a) for a in argv]
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    saved = sys.argv
    sys.argv = ["cryoprior", module.__name__.rsplit(".", 1)[-1], *argv]
    try:
        return module.main(parser.parse_args(argv))
    finally:
        sys.argv = saved


TRAIN = """
[train]
steps = {steps}
batch_size = 8
lr = 2e-3
warmup_steps = 2
log_every = 5
val_every = 10
ckpt_every = 5
threads = 1
device = "cpu"
progress = false
"""

CONFIGS = {
    "image": """
[data]
kind = "synthetic-gaussian-images"
n_train = 32
n_val = 8
size = 8
pixel_size = 2.5
[network]
name = "unet"
base_channels = 8
channel_mults = [1, 2]
groups = 4
[diffusion]
schedule = "cosine"
prediction = "eps"
""",
    "volume": """
[data]
kind = "synthetic-gaussian-volumes"
n_train = 16
n_val = 0
size = 4
[network]
name = "unet"
base_channels = 4
channel_mults = [1, 2]
groups = 2
[diffusion]
schedule = "linear"
prediction = "v"
""",
    "points": """
[data]
kind = "synthetic-chains"
n_train = 16
n_val = 8
max_nodes = 8
min_nodes = 5
[network]
name = "egnn"
hidden_features = 16
num_layers = 2
checkpoint = false
[diffusion]
schedule = "polynomial_2"
prediction = "x0"
""",
}


def write_config(tmp_path, kind: str, steps: int = 20):
    path = tmp_path / f"{kind}.toml"
    path.write_text(CONFIGS[kind] + TRAIN.format(steps=steps))
    return path


def test_image_prior_end_to_end(tmp_path, capsys):
    cfg = write_config(tmp_path, "image")
    out = tmp_path / "run"
    assert run(train_cli, [cfg, "--out", out, "--set", "train.seed=3"]) == 0
    assert "prior:" in capsys.readouterr().out
    for name in (
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "checkpoints/last.pt",
        "prior/prior.json",
        "prior/weights.safetensors",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["train"]["seed"] == 3
    assert saved["config"]["network"]["in_channels"] == 1  # completed from the data
    assert saved["config"]["data"]["max_blobs"] == 3  # builder default recorded
    assert saved["command"].startswith("cryoprior train ") and "train.seed=3" in saved["command"]
    assert saved["cryoprior_version"] and saved["host"]
    meta = json.loads((out / "prior" / "prior.json").read_text())
    assert meta["shape"] == [1, 8, 8] and meta["pixel_size"] == 2.5
    assert meta["representation"] == "image"
    assert len(meta["data"]["split"]["train"]) == 32
    assert set(meta["data"]["split"]["train"]).isdisjoint(meta["data"]["split"]["validation"])
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    assert "val_loss" in records[1]

    png = tmp_path / "s.png"
    assert run(sample_cli, [out / "prior", "-n", 4, "--steps", 5, "--quiet", "-o", png]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["sampler"] == "ddim" and side["steps"] == 5 and side["files"] == [str(png)]
    stack = tmp_path / "s.mrcs"
    assert run(sample_cli, [out / "prior", "-n", 3, "--steps", 4, "--sampler", "ddpm",
                            "--seed", 1, "-o", stack]) == 0  # fmt: skip
    with mrcfile.open(stack) as m:
        assert m.data.shape == (3, 8, 8)
        assert float(m.voxel_size.x) == pytest.approx(2.5)
    # same seed, same samples; the prior reproduces the stack
    prior = load_prior(out / "prior")
    again = prior.sample(3, sampler="ddpm", steps=4, generator=torch.Generator().manual_seed(1))
    with mrcfile.open(stack) as m:
        np.testing.assert_allclose(m.data, again[:, 0].numpy(), rtol=1e-6, atol=1e-6)


def test_training_is_reproducible(tmp_path):
    cfg = write_config(tmp_path, "image", steps=6)
    run(train_cli, [cfg, "--out", tmp_path / "a", "--quiet"])
    run(train_cli, [cfg, "--out", tmp_path / "b"])
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["config"]["train"]["progress"] is False
    wa = (tmp_path / "a" / "prior" / "weights.safetensors").read_bytes()
    wb = (tmp_path / "b" / "prior" / "weights.safetensors").read_bytes()
    assert wa == wb


def test_volume_prior_writes_maps(tmp_path):
    cfg = write_config(tmp_path, "volume", steps=6)
    out = tmp_path / "run"
    run(train_cli, [cfg, "--out", out])
    assert run(sample_cli, [out / "prior", "-n", 2, "--steps", 3, "--sampler", "ode",
                            "-o", tmp_path / "map.mrc"]) == 0  # fmt: skip
    for i in range(2):
        with mrcfile.open(tmp_path / f"map_{i:03d}.mrc") as m:
            assert m.data.shape == (4, 4, 4)
            assert np.isfinite(m.data).all()
    with pytest.raises(InputError, match=r"\.mrc"):
        run(sample_cli, [out / "prior", "-n", 1, "--steps", 2, "-o", tmp_path / "x.png"])


def test_point_prior_writes_pdb(tmp_path):
    cfg = write_config(tmp_path, "points", steps=6)
    out = tmp_path / "run"
    run(train_cli, [cfg, "--out", out])
    meta = json.loads((out / "prior" / "prior.json").read_text())
    assert meta["shape"] == [8, 3] and meta["pixel_size"] is None
    assert meta["normalisation"]["scale"] > 1.0  # Å per unit: about the chains' Rg
    assert run(sample_cli, [out / "prior", "-n", 2, "--steps", 4, "--n-nodes", 5,
                            "-o", tmp_path / "c.pdb"]) == 0  # fmt: skip
    for i in range(2):
        s = read_structure(tmp_path / f"c_{i:03d}.pdb")
        xyz = np.asarray(s.coords).reshape(-1, 3)
        assert xyz.shape == (5, 3)
        assert np.abs(xyz.mean(0)).max() < 1e-2  # zero centre of mass (PDB keeps 3 decimals)


def test_resume_and_config_checks(tmp_path):
    cfg = write_config(tmp_path, "image", steps=10)
    out = tmp_path / "run"
    run(train_cli, [cfg, "--out", out])
    with pytest.raises(InputError, match="--resume"):
        run(train_cli, [cfg, "--out", out])
    with pytest.raises(InputError, match="data.size"):
        run(train_cli, [cfg, "--out", out, "--resume", "--set", "data.size=16"])
    assert run(train_cli, [cfg, "--out", out, "--resume", "--set", "train.steps=15"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["train"]["steps"] == 15 and len(saved["resumed"]) == 1
    assert json.loads((out / "prior" / "prior.json").read_text())["training"]["steps"] == 15
    steps = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]
    with pytest.raises(InputError, match="unknown key train.stepz"):
        run(train_cli, [cfg, "--out", tmp_path / "x", "--set", "train.stepz=3"])
    with pytest.raises(InputError, match="unknown key data.bogus"):
        run(train_cli, [cfg, "--out", tmp_path / "x", "--set", "data.bogus=3"])
    with pytest.raises(InputError, match="unknown option"):
        run(train_cli, [cfg, "--out", tmp_path / "x", "--set", "network.bogus=3"])


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_resolve(path):
    cfg = load_run_config(path)
    assert cfg["data"]["kind"] in DATA_KINDS
    assert cfg["network"]["name"] in NETWORKS
    assert cfg["output"]["dir"].startswith("runs/")


def test_synthetic_example_config_runs(tmp_path):
    out = tmp_path / "run"
    argv = [CONFIG_DIR / "synthetic.toml", "--out", out, "--set", "train.steps=3",
            "--set", "data.n_train=32", "--set", "train.progress=false"]  # fmt: skip
    assert run(train_cli, argv) == 0
    assert load_prior(out / "prior").shape == (1, 16, 16)
