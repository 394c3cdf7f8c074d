"""Particle sources: stream particle images with their poses and CTFs, in batches.

A RELION particle set on disk and a simulation read back the same way. Images are read
memory-mapped, one batch at a time, so a stack larger than memory is fine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cryoprior.core.errors import InputError
from cryoprior.io.star import (
    Particles,
    check_stack_references,
    read_particle_images,
    read_particles,
)
from cryoprior.physics.ctf import CTFParams
from cryoprior.physics.shifts import shift_images


@dataclass
class ParticleBatch:
    """One batch: 0-based particle indices, images [k, D, D], poses (k,3,3), CTF params."""

    indices: np.ndarray
    images: torch.Tensor
    rotations: torch.Tensor
    ctf: CTFParams | None


class ParticleSource:
    """A particle set (STAR + stacks) that yields batches of centred images.

    ``center=True`` shifts every image by its RELION origin (rlnOriginX/YAngst), moving the
    particle centre from -origin to the box centre, so the images match projections of the
    map at the given poses with no shift.
    """

    def __init__(self, particles: Particles, check: bool = True) -> None:
        if len(particles) == 0:
            raise InputError(f"{particles.star_path or 'particle set'}: no particles")
        if check:
            check_stack_references(particles)
        self.particles = particles
        self.ctf = CTFParams.from_particles(particles) if particles.has_ctf else None
        self.rotations = particles.rotation_matrices().to(torch.float64)

    @classmethod
    def from_star(cls, path: str | os.PathLike) -> ParticleSource:
        """Read a STAR file and check every image it references exists."""
        return cls(read_particles(path))

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def box(self) -> int:
        """Image size in px."""
        return int(self.particles.image_size)

    @property
    def pixel_size(self) -> float:
        """Å/px."""
        return float(self.particles.pixel_size)

    def require_poses(self, what: str) -> None:
        """Raise InputError unless the particles carry poses."""
        if not self.particles.has_poses:
            raise InputError(
                f"{self.particles.star_path}: {what} needs known poses "
                f"(rlnAngleRot/Tilt/Psi columns)"
            )

    def batches(
        self,
        batch_size: int,
        indices: np.ndarray | None = None,
        center: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[ParticleBatch]:
        """Yield batches of at most ``batch_size`` particles, in order of ``indices``."""
        idx_all = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        for start in range(0, idx_all.size, int(batch_size)):
            idx = idx_all[start : start + int(batch_size)]
            images = read_particle_images(self.particles, idx).to(dtype)
            if center:
                shifts = self.particles.shifts[idx] / self.pixel_size
                if np.any(shifts):
                    images = shift_images(images, torch.as_tensor(shifts, dtype=dtype))
            ctf = self.ctf.index(torch.from_numpy(idx)) if self.ctf is not None else None
            yield ParticleBatch(idx, images, self.rotations[torch.from_numpy(idx)], ctf)
