"""Half maps from soft pose assignments: each particle at its K most likely poses.

RELION's expectation step inserts every particle at every pose, weighted by the pose's
posterior probability; here that sum is truncated to each particle's K best poses of a
global search (:func:`~cryoprior.solvers.poses.global_search` with ``top_k``), their
weights renormalised over the K. An image X at pose k with weight w adds w·CTF·X̂ and
w·CTF² to the Fourier accumulators (the image and its CTF each scaled by √w), so the
Wiener solution is the weighted average the expectation asks for. At low SNR, where the
best pose of most particles is wrong, a hard assignment stacks each particle's noise at
one pose and builds a structure out of noise (Einstein from noise); spread over K
poses, a particle whose poses are not told apart adds a blur, not a false feature.

Units: shifts are RELION origins in Å (the image is moved by +origin/pixel size to
centre it, as :class:`~cryoprior.physics.source.ParticleSource` does); rotations map the
map's frame to the microscope's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from cryoprior.core.errors import require
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.projection import padded_size
from cryoprior.physics.shifts import shift_images
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import (
    SourceReconstruction,
    insert_images,
    new_grids,
    solve_half_maps,
)
from cryoprior.solvers.distributed_recon import (
    allreduce_accumulators,
    process_layout,
    shard_indices,
    split_halves,
)


@dataclass(frozen=True)
class SoftPoses:
    """Each particle's K candidate poses: ``rotations`` (n, K, 3, 3), ``shifts`` (n, K, 2)
    RELION origins in Å, ``weights`` (n, K) ≥ 0 summing to 1 per particle."""

    rotations: torch.Tensor
    shifts: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        n, k = self.weights.shape
        require(
            tuple(self.rotations.shape) == (n, k, 3, 3) and tuple(self.shifts.shape) == (n, k, 2),
            "soft poses need rotations (n, K, 3, 3), shifts (n, K, 2) and weights (n, K)",
        )

    def __len__(self) -> int:
        return int(self.weights.shape[0])


def insert_soft(
    images: torch.Tensor,
    ctf: torch.Tensor | None,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    weights: torch.Tensor,
    pixel_size: float,
    grids: tuple[torch.Tensor, torch.Tensor],
    min_weight: float = 1e-4,
) -> None:
    """Add images (b, D, D; not centred) at each of their K poses (b, K, 3, 3) and origins
    (b, K, 2) Å into ``grids`` with ``weights`` (b, K): √w·CTF·X̂ against √w·CTF
    (:func:`~cryoprior.solvers.backprojection.insert_images`); ``ctf`` None or real
    (b, Dp, Dp) on the padded grid. Poses below ``min_weight`` are skipped."""
    dp = int(grids[1].shape[-1])
    for k in range(int(weights.shape[1])):
        keep = weights[:, k] > min_weight
        if not bool(keep.any()):
            continue
        root = weights[keep, k].to(images.dtype).sqrt()[:, None, None]
        centred = shift_images(images[keep], (shifts[keep, k] / pixel_size).to(images.dtype))
        # the CTF (1 without one) carries √w too, so the weights accumulate w·CTF²
        c = (ctf[keep] if ctf is not None else images.new_ones(1, dp, dp)) * root
        rot = rotations[keep, k].to(images.dtype)
        insert_images(centred * root, rot, c, dp, "linear", grids)


def reconstruct_soft(
    source: ParticleSource,
    poses: SoftPoses,
    *,
    pad: float = 2.0,
    seed: int = 0,
    batch_size: int = 512,
    distributed: bool = False,
    randomise_from: int | None = None,
) -> SourceReconstruction:
    """Both half maps (the gold-standard split of ``seed``) and the full map from every
    particle at its K weighted poses, Wiener-solved with the per-shell SSNR from the half
    maps' FSC (as :func:`~cryoprior.solvers.backprojection.reconstruct_source`, whose
    sharding under ``torchrun``, split and ``randomise_from`` it shares)."""
    start = time.perf_counter()
    n = len(source)
    require(len(poses) == n, f"{len(poses)} soft poses for {n} particles")
    require(n >= 2, "a reconstruction with half maps needs at least 2 particles")
    size, px = source.box, source.pixel_size
    dp = padded_size(size, pad)
    split = split_halves(n, seed)
    rank, world = process_layout() if distributed else (0, 1)
    mine = shard_indices(n, rank, world)
    grids = [new_grids(dp, torch.float32), new_grids(dp, torch.float32)]
    for half, part in enumerate(split):
        idx = np.intersect1d(part, mine, assume_unique=True)
        for batch in source.batches(batch_size, indices=idx, center=False):
            ids = torch.from_numpy(batch.indices)
            ctf = _padded_ctf(batch.ctf, dp, px)
            insert_soft(
                batch.images,
                ctf,
                poses.rotations[ids],
                poses.shifts[ids],
                poses.weights[ids],
                px,
                grids[half],
            )
    allreduce_accumulators(grids)
    solution = solve_half_maps(
        grids, size, px, ssnr="fsc", randomise_from=randomise_from, seed=seed
    )
    return SourceReconstruction(
        full=solution.full,
        half1=solution.half1,
        half2=solution.half2,
        fsc_halves=solution.fsc_halves,
        ssnr=solution.ssnr,
        split=split,
        seconds=time.perf_counter() - start,
        randomised=solution.randomised,
        randomised_from=solution.randomised_from,
    )


def _padded_ctf(ctf: CTFParams | None, dp: int, pixel_size: float) -> torch.Tensor | None:
    return None if ctf is None else compute_ctf(ctf, (dp, dp), pixel_size, torch.float32)


__all__ = ["SoftPoses", "insert_soft", "reconstruct_soft"]
