"""The generic trainer: LR schedule, EMA, exact resume, atomic checkpoints, logs, config."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from cryoprior.core.errors import InputError
from cryoprior.train import EMA, TrainConfig, Trainer, lr_factor
from cryoprior.train.config import (
    apply_overrides,
    load_run_config,
    parse_override,
    resolve_config,
    save_run_config,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and immune to a busy machine; restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class NoisyData:
    """Regression pairs; each read jitters x with NumPy's and Python's global generators,
    so exact resume needs those states restored too."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        noise = np.random.normal(0, 0.01, 3)  # noqa: NPY002 (the global generator on purpose)
        jitter = torch.from_numpy(noise).float() * random.random()
        return {"x": self.x[i] + jitter, "y": self.y[i]}


class CleanData(NoisyData):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))


def noisy_loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
    """Per-sample loss that draws from the trainer's generator (like a diffusion loss)."""
    noise = torch.randn(batch["x"].shape, generator=g, device=batch["x"].device)
    return ((model(batch["x"] + 0.05 * noise) - batch["y"]) ** 2).squeeze(-1)


def config(**kw) -> TrainConfig:
    base = dict(
        steps=20, batch_size=4, lr=1e-2, warmup_steps=3, ema_decay=0.9, grad_clip=1.0,
        val_every=5, ckpt_every=5, log_every=2, seed=7, threads=1, device="cpu", progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


def test_lr_factor_values():
    # warm-up: (s+1)/w
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    # cosine from 1 at the end of warm-up to min ratio at the last step
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, min_lr_ratio=0.2) == pytest.approx(0.6)
    assert lr_factor(32, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    # no warm-up
    assert lr_factor(0, 50, 0) == pytest.approx(1.0)


def test_trainer_applies_schedule(tmp_path):
    cfg = config(steps=12, log_every=1, val_every=0, ckpt_every=0, warmup_steps=4)
    Trainer(make_model(0), noisy_loss, CleanData(16), config=cfg, out_dir=tmp_path).fit()
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    for r in recs:
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(r["step"] - 1, 12, 4))
        assert {"train_loss", "grad_norm", "time"} <= set(r)


def test_ema_math():
    m = nn.Linear(2, 1, bias=False)
    m.register_buffer("count", torch.tensor(0))
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, decay=0.9, warmup=False)
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.count.fill_(5)
    for k in range(1, 4):
        ema.update(m)
        # constant target c: θ_k = c + (θ_0 - c) d^k
        expected = 3.0 + (1.0 - 3.0) * 0.9**k
        assert torch.allclose(ema.model.weight, torch.full((1, 2), expected))
    assert int(ema.model.count) == 5  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.model.parameters())

    warm = EMA(m, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1+0)/(10+0)
    with torch.no_grad():
        m.weight.fill_(1.0)
    warm.update(m)  # 0.1 * 3 + 0.9 * 1
    assert torch.allclose(warm.model.weight, torch.full((1, 2), 1.2))
    assert warm.current_decay() == pytest.approx(2 / 11)

    restored = EMA(nn.Linear(2, 1, bias=False).requires_grad_(False), 0.5)
    restored.model.register_buffer("count", torch.tensor(0))
    restored.load_state_dict(warm.state_dict())
    assert restored.num_updates == 1 and restored.decay == 0.999
    assert torch.equal(restored.model.weight, warm.model.weight)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _metrics(folder) -> list[dict]:
    """metrics.jsonl records without the wall-clock time."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(s).items() if k != "time"} for s in lines]


def test_resume_is_bit_exact(tmp_path):
    cfg = config()
    full = Trainer(make_model(1), noisy_loss, NoisyData(18), CleanData(6, seed=3), cfg,
                   tmp_path / "full")  # fmt: skip
    full.fit()

    calls = {"n": 0}

    def dying_loss(model, batch, g):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 13:  # killed during step 13; the last checkpoint is step 10
                raise Interrupt
        return noisy_loss(model, batch, g)

    killed = Trainer(make_model(1), dying_loss, NoisyData(18), CleanData(6, seed=3), cfg,
                     tmp_path / "cut")  # fmt: skip
    with pytest.raises(Interrupt):
        killed.fit()
    # Disturb every global generator, as a new process would.
    torch.manual_seed(999)
    np.random.seed(999)  # noqa: NPY002
    random.seed(999)

    resumed = Trainer(make_model(2), noisy_loss, NoisyData(18), CleanData(6, seed=3), cfg,
                      tmp_path / "cut")  # fmt: skip
    assert resumed.resume()
    assert resumed.step == 10
    resumed.fit()

    for name, ref in _params(full.model).items():
        assert torch.equal(resumed.model.state_dict()[name], ref), name
    for name, ref in _params(full.ema_model).items():
        assert torch.equal(resumed.ema_model.state_dict()[name], ref), name
    # the log of the interrupted run was cut back to step 10 and continued identically
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "full")
    assert any("val_loss" in r for r in _metrics(tmp_path / "full"))


def test_checkpoint_contents_load_weights_only(tmp_path):
    t = Trainer(make_model(0), noisy_loss, CleanData(8), None, config(steps=5), tmp_path)
    t.fit()
    state = torch.load(t.checkpoint_path, weights_only=True)
    assert state["step"] == 5
    assert set(state) >= {"model", "ema", "optimizer", "scheduler", "data", "rng", "config"}
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python", "generator"}
    assert state["data"]["epoch"] == 2 and state["data"]["batch_in_epoch"] == 1
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    t = Trainer(make_model(0), noisy_loss, CleanData(8), None, config(steps=5), tmp_path)
    t.fit()
    good = t.checkpoint_path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint()
    assert t.checkpoint_path.read_bytes() == good
    assert sorted(p.name for p in t.checkpoint_path.parent.iterdir()) == ["last.pt"]

    fresh = tmp_path / "fresh" / "checkpoints" / "last.pt"
    with pytest.raises(OSError):
        t.save_checkpoint(fresh)
    assert not fresh.exists() and list(fresh.parent.iterdir()) == []


def test_resume_rejects_other_data_order(tmp_path):
    t = Trainer(make_model(0), noisy_loss, CleanData(8), None, config(steps=5), tmp_path)
    t.fit()
    other = Trainer(make_model(0), noisy_loss, CleanData(8), None, config(steps=5, seed=8),
                    tmp_path)  # fmt: skip
    with pytest.raises(InputError, match="seed"):
        other.resume()


def test_validation_is_repeatable_and_uses_ema(tmp_path):
    t = Trainer(make_model(0), noisy_loss, CleanData(8), CleanData(5, seed=1), config(steps=4),
                tmp_path)  # fmt: skip
    t.fit()
    a, b = t.validate(), t.validate()
    assert a == b
    # the EMA weights, not the live ones: changing the live model does not change it
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(1.0)
    assert t.validate() == a


def test_batches_cover_epoch_without_repeats(tmp_path):
    t = Trainer(make_model(0), noisy_loss, CleanData(10), None, config(batch_size=3), tmp_path)
    e0, e1 = t.epoch_batches(0), t.epoch_batches(1)
    assert len(e0) == 3 and all(len(b) == 3 for b in e0)
    flat = [i for b in e0 for i in b]
    assert len(set(flat)) == 9 and e0 != e1
    assert t.epoch_batches(0) == e0  # a function of (seed, epoch) only


def test_custom_collate_and_workers_match(tmp_path):
    class Collating(CleanData):
        used = 0

        def collate(self, items):
            Collating.used += 1
            return {k: torch.stack([i[k] for i in items]) for k in ("x", "y")}

    cfg = config(steps=3, ckpt_every=0, val_every=0)
    a = Trainer(make_model(0), noisy_loss, Collating(8), None, cfg, tmp_path / "a")
    a.fit()
    assert Collating.used == 3
    cfg_w = config(steps=3, ckpt_every=0, val_every=0, num_workers=1)
    b = Trainer(make_model(0), noisy_loss, CleanData(8), None, cfg_w, tmp_path / "b")
    b.fit()
    for name, ref in _params(a.model).items():
        assert torch.equal(b.model.state_dict()[name], ref), name


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="fewer than train.batch_size"):
        Trainer(make_model(0), noisy_loss, CleanData(3), None, config(batch_size=4), tmp_path)
    with pytest.raises(InputError, match="train.lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(InputError, match="unknown key train.learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})

    def nan_loss(model, batch, g):
        return model(batch["x"]).squeeze(-1) * float("nan")

    with pytest.raises(InputError, match="non-finite|became nan"):
        Trainer(make_model(0), nan_loss, CleanData(8), None, config(steps=2), tmp_path).fit()


def test_run_config_resolution_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[data]\nkind = "synthetic-gaussian-images"\nn_train = 10\n'
        '[network]\nkind = "mlp"\n[train]\nsteps = 3\nlr = 1e-3\n'
    )
    cfg = load_run_config(toml, ["train.lr=5e-4", "train.device=cpu", "data.n_train=12",
                                 "diffusion.schedule_params.s=0.01"])  # fmt: skip
    assert cfg["train"]["lr"] == 5e-4 and cfg["train"]["device"] == "cpu"
    assert cfg["train"]["batch_size"] == TrainConfig().batch_size  # default filled in
    assert cfg["data"]["n_train"] == 12
    assert cfg["diffusion"]["schedule_params"] == {"s": 0.01}
    assert cfg["output"]["prior"] == "prior"
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=hello") == (["a", "b"], "hello")
    with pytest.raises(InputError, match="unknown key train.lrr"):
        load_run_config(toml, ["train.lrr=1"])
    with pytest.raises(InputError, match="unknown section"):
        apply_overrides({}, ["model.x=1"])
    data = {"kind": "synthetic-chains"}
    with pytest.raises(InputError, match="unknown config section 'extra'"):
        resolve_config({"data": data, "extra": {}})
    with pytest.raises(InputError, match="unknown key diffusion.sched"):
        resolve_config({"data": data, "diffusion": {"sched": "linear"}})
    with pytest.raises(InputError, match="kind"):
        resolve_config({"data": {}})
    with pytest.raises(InputError, match="unknown data kind 'x'"):
        resolve_config({"data": {"kind": "x"}})
    with pytest.raises(InputError, match="unknown key data.size for data kind 'synthetic-c"):
        resolve_config({"data": {"kind": "synthetic-chains", "size": 3}})

    path = save_run_config(tmp_path / "run", cfg, command="cryoprior train run.toml")
    saved = json.loads(path.read_text())
    assert saved["config"] == json.loads(json.dumps(cfg))
    assert saved["command"] == "cryoprior train run.toml"
    assert {"cryoprior_version", "created", "host"} <= set(saved)
    # a saved config.json reads back as the same resolved config
    assert load_run_config(path) == saved["config"]
    save_run_config(tmp_path / "run", cfg, command="cryoprior train run.toml --resume")
    again = json.loads(path.read_text())
    assert again["command"] == "cryoprior train run.toml"
    assert again["resumed"][0]["command"].endswith("--resume")
