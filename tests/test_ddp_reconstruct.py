"""Sharded Wiener reconstruction: two CPU processes (gloo) give the maps of one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cryoprior.cli.main import main as cli
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.io.mrc import read_map
from cryoprior.physics.projection import gaussian_blobs
from cryoprior.physics.simulator import SimulationConfig, simulate_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import reconstruct_source
from cryoprior.solvers.distributed_recon import (
    allreduce_accumulators,
    process_layout,
    shard_indices,
    split_halves,
)
from cryoprior.train import distributed as ddp

needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
MAPS = ("full", "half1", "half2")


@pytest.fixture(scope="module")
def star(tmp_path_factory) -> str:
    """200 noisy particles with CTFs and shifts, box 24 (an asymmetric blob map)."""
    box = 24
    centres = torch.tensor(
        [[3.0, 0.0, 0.0], [-2.0, 4.0, 1.0], [0.0, -3.0, -4.0], [2.0, 2.0, 3.0]],
        dtype=torch.float64,
    ) * (box / 16)
    vol = Volume(gaussian_blobs(centres, 1.2 * box / 16, box, dtype=torch.float64).float(), 2.0)
    cfg = SimulationConfig(n_particles=200, snr=2.0, max_shift=4.0, seed=4, snr_pilot=200)
    res = simulate_particles(vol, cfg, tmp_path_factory.mktemp("sim"), show_progress=False)
    return str(res.paths["star"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, world: int, port: int) -> None:
    """What torchrun sets for each process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)


class _CountingSource(ParticleSource):
    """A particle source that records which particles it was asked for."""

    read: list[np.ndarray]

    def batches(self, batch_size, indices=None, **kwargs):
        self.read.append(np.asarray(indices))
        return super().batches(batch_size, indices=indices, **kwargs)


def _library_worker(rank: int, world: int, port: int, star: str, out: str) -> None:
    _torchrun_env(rank, world, port)
    env = ddp.setup(torch.device("cpu"))
    try:
        assert process_layout() == (rank, world)
        source = _CountingSource(ParticleSource.from_star(star).particles)
        source.read = []
        rec = reconstruct_source(source, seed=7, distributed=True)
    finally:
        ddp.cleanup(env)
    torch.save(
        {name: getattr(rec, name) for name in MAPS}
        | {
            "split0": torch.from_numpy(rec.split[0]),
            "read": torch.from_numpy(np.sort(np.concatenate(source.read))),
        },
        Path(out) / f"rank{rank}.pt",
    )


def _cli_worker(rank: int, world: int, port: int, star: str, out: str) -> None:
    _torchrun_env(rank, world, port)  # the CLI joins (and leaves) the group itself
    assert cli(["reconstruct", star, "-o", out, "--seed", "7", "--quiet"]) == 0
    assert not dist.is_initialized()


def _assert_maps_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_shards_are_disjoint_contiguous_and_cover_everything():
    for n, world in ((10, 3), (7, 2), (2, 4), (0, 2)):
        shards = [shard_indices(n, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(shards), np.arange(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_indices(10, 1, 3).tolist() == [3, 4, 5]
    with pytest.raises(InputError):
        shard_indices(10, 3, 3)


def test_split_and_reduce_without_a_group():
    a, b = split_halves(9, seed=1)
    assert len(a) == 4 and np.array_equal(np.sort(np.concatenate([a, b])), np.arange(9))
    assert all(np.array_equal(x, y) for x, y in zip(split_halves(9, 1), (a, b), strict=True))
    grids = [(torch.ones(2, dtype=torch.complex64), torch.ones(2))]
    assert process_layout() == (0, 1)
    assert allreduce_accumulators(grids) is grids and bool((grids[0][1] == 1).all())
    with pytest.raises(InputError):
        allreduce_accumulators([3.0])


@needs_dist
def test_two_ranks_give_the_single_process_maps(tmp_path, star):
    mp.spawn(_library_worker, args=(2, _free_port(), star, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = reconstruct_source(ParticleSource.from_star(star), seed=7)
    assert torch.equal(ranks[0]["split0"], torch.from_numpy(single.split[0]))
    # each process read only its own shard
    for r in range(2):
        assert torch.equal(ranks[r]["read"], torch.from_numpy(shard_indices(200, r, 2)))
    for name in MAPS:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ in {name}"
        _assert_maps_close(ranks[0][name], getattr(single, name))


@needs_dist
def test_cli_under_two_ranks_writes_the_single_process_maps(tmp_path, star, monkeypatch, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    mp.spawn(_cli_worker, args=(2, _free_port(), star, str(two)), nprocs=2, join=True)
    assert cli(["reconstruct", star, "-o", str(one), "--seed", "7", "--quiet"]) == 0
    for name in ("map", "half1", "half2"):
        _assert_maps_close(read_map(two / f"{name}.mrc").data, read_map(one / f"{name}.mrc").data)
    assert json.loads((two / "reconstruct.json").read_text())["processes"] == 2
    assert json.loads((one / "reconstruct.json").read_text())["processes"] == 1
    # The other methods would run whole on every process: refused under torchrun.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(["reconstruct", star, "--method", "mfn", "-o", str(tmp_path / "m")]) == 2
    assert "runs under torchrun" in capsys.readouterr().err
