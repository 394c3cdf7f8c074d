"""Ab initio: a low-resolution initial model from particles without poses.

Stochastic EM at low resolution (in the spirit of cryoSPARC's SGD): a map from random
poses, then rounds of global search (:func:`~cryoprior.solvers.poses.global_search`) on
random subsets of the particles against the current map and a reconstruction from each
particle's K best poses weighted by their likelihood (:func:`soft_reconstruct`), the band
tightening from ``bands[0]`` to ``bands[-1]``, the map kept inside the refinement's soft
solvent mask. The result (in an arbitrary hand) is the initial model of
:func:`~cryoprior.solvers.refine.refine`.

Units: Å, Å/px, degrees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from cryoprior.core.errors import require
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.projection import padded_size
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import new_grids, reconstruct_source, solve_half_maps
from cryoprior.solvers.poses import PoseAssignment, global_search
from cryoprior.solvers.refine import Log, lowpass, solvent_mask, with_poses
from cryoprior.solvers.soft_reconstruction import insert_soft


def soft_reconstruct(
    images: torch.Tensor,
    ctf: CTFParams | None,
    assignment: PoseAssignment,
    pixel_size: float,
    pad: float = 2.0,
) -> torch.Tensor:
    """The Wiener map (D, D, D) from images (n, D, D; not centred) inserted at each of
    their K poses with the assignment's weights (RELION's expectation, truncated to the
    top K; :func:`~cryoprior.solvers.soft_reconstruction.insert_soft`); per-shell SSNR
    from the FSC of the even and odd images' half maps."""
    n, d = images.shape[0], images.shape[-1]
    dp = padded_size(d, pad)
    c = None if ctf is None else compute_ctf(ctf, (dp, dp), pixel_size, torch.float32)
    grids = [new_grids(dp, torch.float32), new_grids(dp, torch.float32)]
    half = torch.arange(n) % 2
    for h in (0, 1):
        sel = half == h
        insert_soft(
            images[sel],
            None if c is None else c[sel],
            assignment.top_rotations[sel],
            assignment.top_shifts[sel],
            assignment.weights[sel],
            pixel_size,
            grids[h],
        )
    return solve_half_maps(grids, d, pixel_size, ssnr="fsc").full


@dataclass
class AbInitioConfig:
    """Settings of :func:`ab_initio`: the bands (Å) of its rounds, the particles per round,
    the SO(3) grid step (degrees), the poses per particle in the soft assignment
    (``top_k``) and the largest origin (Å, default 4 px)."""

    bands: tuple[float, ...] = (
        *(40.0, 40.0, 35.0, 35.0, 30.0, 30.0, 25.0, 25.0),
        *(22.0, 22.0, 20.0, 20.0, 18.0, 18.0, 15.0, 15.0),
    )
    subset: int = 1000
    step: float = 10.0
    top_k: int = 8
    max_shift: float | None = None
    seed: int = 0


def ab_initio(
    source: ParticleSource,
    config: AbInitioConfig | None = None,
    *,
    log: Log | None = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """A low-resolution initial model (D, D, D) from particles without poses (see the
    module docstring), and a record per round. Its hand is arbitrary."""
    config = config or AbInitioConfig()
    require(len(config.bands) >= 1, "ab initio needs at least one band")
    log = log or (lambda _msg: None)
    n, px = len(source), source.pixel_size
    max_shift = 4 * px if config.max_shift is None else float(config.max_shift)
    gen = torch.Generator().manual_seed(int(config.seed))
    k = min(int(config.subset), n)
    idx = np.sort(torch.randperm(n, generator=gen)[:k].numpy())
    start = with_poses(
        source.particles.subset(idx),
        random_rotations(k, gen, dtype=torch.float64),
        torch.zeros(k, 2, dtype=torch.float64),
    )
    volume = reconstruct_source(ParticleSource(start, check=False), ssnr=1.0).full.double()
    volume = lowpass(volume, px, config.bands[0])
    mask = solvent_mask(source.box, px, None)
    volume = volume * mask
    records = []
    for r, band in enumerate(config.bands):
        t0 = time.perf_counter()
        idx = np.sort(torch.randperm(n, generator=gen)[:k].numpy())
        subset = ParticleSource(source.particles.subset(idx), check=False)
        batch = next(subset.batches(k, center=False))
        found = global_search(
            volume.to(torch.float32),
            batch.images,
            batch.ctf,
            px,
            band=band,
            step_deg=config.step,
            max_shift=max_shift,
            top_k=config.top_k,
            score="correlation",
            show_progress=show_progress,
        )
        volume = soft_reconstruct(batch.images, batch.ctf, found, px).double()
        volume = lowpass(volume, px, band) * mask
        records.append({"round": r, "band": band, "seconds": time.perf_counter() - t0})
        log(
            f"ab initio round {r}: {k} particles, band {band:.0f} Å, {records[-1]['seconds']:.0f} s"
        )
    return volume, records


__all__ = ["AbInitioConfig", "ab_initio", "soft_reconstruct"]
