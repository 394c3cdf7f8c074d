"""DDP: two CPU processes (gloo) stay in step and match single-process full-batch training."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cryoprior.train import TrainConfig, Trainer
from cryoprior.train import distributed as ddp


class Pairs:
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.sin(self.x.sum(-1, keepdim=True))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def mse(model: nn.Module, batch, g: torch.Generator) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean(-1)


CFG = dict(
    steps=6, batch_size=8, lr=5e-2, warmup_steps=2, ema_decay=0.8, grad_clip=0.5,
    val_every=3, ckpt_every=3, log_every=1, seed=11, threads=1, device="cpu", progress=False,
)  # fmt: skip


def run(out_dir: Path) -> Trainer:
    trainer = Trainer(make_model(), mse, Pairs(20, 0), Pairs(5, 1), TrainConfig(**CFG), out_dir)
    trainer.fit()
    return trainer


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # What torchrun sets; Trainer joins the group itself (gloo on CPU).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    trainer = run(Path(out_dir))
    assert trainer.env.world_size == world and trainer.env.owns_group
    assert trainer.local_batch_size == CFG["batch_size"] // world
    torch.save(
        {"model": trainer.model.state_dict(), "ema": trainer.ema_model.state_dict()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    trainer.close()
    assert not dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_takes_rank_stride():
    perm = [5, 3, 9, 0, 7, 1, 4]
    assert ddp.shard(perm, ddp.DistEnv(0, 2)) == [5, 9, 7]
    assert ddp.shard(perm, ddp.DistEnv(1, 2)) == [3, 0, 1]
    assert ddp.shard(perm, ddp.DistEnv(0, 1)) == perm


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_match_single_process(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, value in r0[part].items():
            assert torch.equal(value, r1[part][name]), f"ranks differ in {part}.{name}"

    single = run(tmp_path / "single")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(r0["model"][name], value, rtol=1e-5, atol=1e-6)
    for name, value in single.ema_model.state_dict().items():
        torch.testing.assert_close(r0["ema"][name], value, rtol=1e-5, atol=1e-6)

    # rank 0 alone wrote the logs (one record per step) and a checkpoint with both ranks' RNG
    steps = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, CFG["steps"] + 1))
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
    val = [json.loads(s).get("val_loss") for s in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [
        json.loads(s).get("val_loss")
        for s in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [v is None for v in val] == [v is None for v in ref]
    assert [v for v in val if v is not None] == pytest.approx([v for v in ref if v is not None])
