"""Sharded reconstruction under ``torchrun``: which particles a process reads, and the sum
of every process's Fourier accumulators.

A direct Fourier reconstruction is a sum over particles: Σᵢ CTFᵢ·F̂ᵢ and Σᵢ CTFᵢ² inserted
into padded grids (:mod:`cryoprior.solvers.backprojection`). Split the particles into
disjoint shards, let each process insert its shard into its own zero grids, sum the grids
over the processes (``all_reduce``), and every process holds what one process would have
accumulated from all the particles (up to the order of the float additions). The pattern
per iteration, for reconstruction or refinement alike::

    rank, world = process_layout()
    mine = shard_indices(n_particles, rank, world)
    halves = split_halves(n_particles, seed)               # global: same in every process
    grids = [new_grids(dp, dtype, device) for _ in halves]
    for g, part in zip(grids, halves):
        ids = np.intersect1d(part, mine)                   # this process's share of a half
        ... insert_images(images[ids], rotations[ids], ctf[ids], dp, kernel, g) ...
    allreduce_accumulators(grids)                          # now the sums over all particles
    ... every process finishes identically; only rank 0 writes files ...

Per-particle statistics that are sums (a pose histogram, a log-likelihood total, counts)
can be summed the same way. The gold-standard half split must come from the global
particle index and the seed (``split_halves``), never from the shard, so that any number
of processes gives the same half maps.

The process group itself (``torchrun``'s environment, gloo on CPU, NCCL on CUDA) is joined
by the entry point (``cryoprior.train.distributed.setup``); these functions only use the
default group when one is initialised and act as a single process otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cryoprior.core.errors import require

Accumulators = torch.Tensor | Sequence["Accumulators"]


def process_layout() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """The particles process ``rank`` of ``world`` reads: the contiguous block
    ``[⌊rank·n/world⌋, ⌊(rank+1)·n/world⌋)`` of ``0 … n-1`` (int64, sorted).

    The blocks are disjoint, cover every particle (none dropped, unlike the trainer's
    ``shard``), differ in size by at most one, and keep each process's reads from a stack
    file contiguous. A block may be empty when ``n < world``.
    """
    require(n >= 0, f"the number of particles must be >= 0, got {n}")
    require(world >= 1 and 0 <= rank < world, f"need 0 <= rank < world, got {rank} of {world}")
    return np.arange(rank * n // world, (rank + 1) * n // world, dtype=np.int64)


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The gold-standard half split of particles ``0 … n-1``: a random permutation from
    ``seed``, its first ⌊n/2⌋ entries to half 1, the rest to half 2 (each sorted).

    Depends only on ``n`` and ``seed``, so every process (and any number of processes)
    draws the same split.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def _tensors(grids: Accumulators) -> Iterator[torch.Tensor]:
    if isinstance(grids, torch.Tensor):
        yield grids
        return
    require(
        isinstance(grids, (list, tuple)),
        f"allreduce_accumulators takes tensors or lists/tuples of them, got {type(grids).__name__}",
    )
    for item in grids:
        yield from _tensors(item)


def allreduce_accumulators(grids: Accumulators) -> Accumulators:
    """Sum accumulators over all processes, in place; returns ``grids``.

    ``grids`` is a tensor or any nesting of lists/tuples of tensors (e.g. the two halves'
    ``(Σ CTF·F̂, Σ CTF²)`` pairs), real or complex. Every process must call this with
    tensors of the same shapes, dtypes and nesting, in the same order. Without an
    initialised process group (or with one process) nothing happens. Under NCCL, CPU
    tensors travel through this process's current CUDA device and back.
    """
    _, world = process_layout()
    tensors = list(_tensors(grids))
    require(
        all(t.is_contiguous() for t in tensors), "allreduce_accumulators needs contiguous tensors"
    )
    if world == 1:
        return grids
    staging = None
    if dist.get_backend() == "nccl":
        staging = torch.device("cuda", torch.cuda.current_device())
    for t in tensors:
        flat = torch.view_as_real(t) if t.is_complex() else t
        if staging is not None and flat.device != staging:
            moved = flat.to(staging)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            flat.copy_(moved)
        else:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return grids
