"""Data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node W ...`` starts ``W`` processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup` reads
them and joins the process group (gloo on CPU, NCCL on CUDA). Each process holds a full
copy of the model; :func:`wrap_model` wraps it in DistributedDataParallel, which averages
gradients across processes during ``backward``. Every process draws the same per-epoch
permutation (same seed) and keeps the items ``rank, rank + W, rank + 2W, ...``
(:func:`shard`), so one optimiser step sees the same ``batch_size`` items, split over the
processes, as a single process would; with a mean loss, the averaged gradient equals the
full-batch gradient. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cryoprior.core.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``; ``local_rank`` picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when setup() created the process group

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0)."""
        return self.rank == 0


def detect() -> DistEnv:
    """Read the process layout from an existing process group, else from torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device: torch.device) -> DistEnv:
    """Join the process group when launched with ``WORLD_SIZE > 1``; returns the layout.

    Uses NCCL when ``device`` is CUDA and gloo otherwise. A group that already exists
    (created by the caller) is used as it is and left for the caller to destroy.
    """
    env = detect()
    if not env.distributed or dist.is_initialized():
        return env
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(env.rank, env.world_size, env.local_rank, owns_group=True)


def training_device(requested: str, env: DistEnv) -> torch.device:
    """The device for this process: ``"auto"`` picks CUDA when available; under DDP on CUDA
    each process takes GPU ``LOCAL_RANK``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f'train.device is "{requested}" but CUDA is not available')
        if device.index is None:
            device = torch.device("cuda", env.local_rank if env.distributed else 0)
    return device


def wrap_model(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """Wrap ``model`` (already on ``device``) in DistributedDataParallel under DDP."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def shard(indices: Sequence[T], env: DistEnv) -> list[T]:
    """This process's share of a permutation: items ``rank::world_size`` of its first
    ``world_size * floor(len / world_size)`` entries, so every process gets as many."""
    n = (len(indices) // env.world_size) * env.world_size
    return list(indices[:n][env.rank :: env.world_size])


def all_mean(value: float, env: DistEnv, device: torch.device) -> float:
    """Mean of a Python number over all processes (the number itself without DDP)."""
    if not env.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` without DDP)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    """Wait for every process (no-op without DDP)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    """Leave the process group if :func:`setup` created it (no barrier: safe after an
    error on one process)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
