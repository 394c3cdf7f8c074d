"""Random patches of density maps: training data for box-size-independent volume priors.

A fully convolutional prior (``UNet(norm="pixel")``, no attention) learns the local
statistics of protein density at one pixel size; it is trained on cubic patches and then
applies unchanged to any box. :class:`MapPatchDataset` cuts the patches from whole maps
(a :class:`~cryoprior.data.volumes.MapDataset`, rendered once; each map a structure in a
uniformly random orientation):

- the patch's corner is uniform over every position that keeps it inside the map, so
  patches cut through the molecule, catch its surface and fall into solvent, as windows
  of a reconstruction do;
- one of the 24 proper rotations of the cube (never a reflection: proteins are chiral);
- an extra B-factor blur, B uniform in ``bfactor_extra`` Å² (on top of the maps' own
  rendering B), multiplying the map's spectrum by exp(−B q²/4), so the prior knows maps
  as sharp as the data allow and as blurred as a measured envelope makes them.

Item ``i`` is drawn from its own generator seeded by ``(seed, i)``: an index always gives
the same patch (stable validation), and different indices differ.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from cryoprior.core.errors import require
from cryoprior.data.volumes import item_generator
from cryoprior.geometry.fft import fft3_c, ifft3_c


@lru_cache(maxsize=1)
def cube_rotations() -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The 24 proper rotations of a cube as (axis permutation, axes to flip) of a
    (D, D, D) array: the signed permutation matrices of determinant +1."""
    out = []
    for perm in itertools.permutations(range(3)):
        parity = sum(1 for i in range(3) for j in range(i + 1, 3) if perm[i] > perm[j]) % 2
        for signs in itertools.product((1, -1), repeat=3):
            det = (-1) ** parity * signs[0] * signs[1] * signs[2]
            if det == 1:
                out.append((perm, tuple(a for a in range(3) if signs[a] < 0)))
    assert len(out) == 24
    return tuple(out)


def rotate_cube(x: torch.Tensor, k: int) -> torch.Tensor:
    """Proper cube rotation ``k`` (0..23, 0 = identity) of the last three axes of ``x``."""
    perm, flips = cube_rotations()[int(k) % 24]
    lead = x.ndim - 3
    y = x.permute(*range(lead), *(lead + p for p in perm))
    return torch.flip(y, [lead + a for a in flips]) if flips else y


def bfactor_blur(x: torch.Tensor, bfactor: float, pixel_size: float) -> torch.Tensor:
    """A (..., D, D, D) map times exp(−B q²/4) in Fourier space (q in 1/Å, B in Å²)."""
    if bfactor == 0:
        return x
    d = x.shape[-1]
    q = (torch.arange(d, dtype=torch.float64) - d // 2) / (d * pixel_size)
    q2 = q[:, None, None] ** 2 + q[None, :, None] ** 2 + q[None, None, :] ** 2
    env = torch.exp(-float(bfactor) * q2 / 4).to(x.dtype)
    return ifft3_c(fft3_c(x) * env).real.to(x.dtype)


class MapPatchDataset(Dataset):
    """``n_items`` cubic patches (1, P, P, P) float32 cut from whole maps.

    Args:
        maps: an indexable set of maps (1, D, D, D) in network units (e.g. a precomputed
            :class:`~cryoprior.data.volumes.MapDataset`), D >= ``patch``.
        patch: patch side P in voxels.
        pixel_size: Å/px of the maps (for the B-factor blur).
        n_items: the data set's length (patches are drawn, not enumerated).
        bfactor_extra: (low, high) Å² of the uniform extra blur; (0, 0) for none.
        seed: seed of the per-item draws.
        cube_rotations: apply a random proper cube rotation.
    """

    def __init__(
        self,
        maps: Dataset,
        patch: int,
        pixel_size: float,
        n_items: int,
        bfactor_extra: Sequence[float] = (0.0, 120.0),
        seed: int = 0,
        cube_rotations: bool = True,
    ) -> None:
        require(len(maps) >= 1, "no maps to cut patches from")  # type: ignore[arg-type]
        self.maps = maps
        self.box = int(maps[0].shape[-1])
        self.patch = int(patch)
        require(
            8 <= self.patch <= self.box,
            f"patch must be between 8 and the maps' box {self.box}, got {patch}",
        )
        require(int(n_items) >= 1, f"n_items must be >= 1, got {n_items}")
        lo, hi = (float(b) for b in bfactor_extra)
        require(
            0 <= lo <= hi,
            f"bfactor_extra must be (low, high) with 0 <= low <= high, got {bfactor_extra}",
        )
        self.pixel_size = float(pixel_size)
        self.n_items = int(n_items)
        self.bfactor_extra = (lo, hi)
        self.seed = int(seed)
        self.rotate = bool(cube_rotations)

    def __len__(self) -> int:
        return self.n_items

    def draw(self, index: int) -> dict[str, float | int]:
        """The random choices of item ``index``: map, corner (z, y, x), rotation, B."""
        g = item_generator(self.seed, index)
        n_maps = len(self.maps)  # type: ignore[arg-type]
        span = self.box - self.patch + 1
        m, z, y, x, k = (
            int(torch.randint(hi, (1,), generator=g)) for hi in (n_maps, span, span, span, 24)
        )
        lo, hi = self.bfactor_extra
        b = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
        return {"map": m, "z": z, "y": y, "x": x, "rotation": k if self.rotate else 0, "bfactor": b}

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n_items:
            raise IndexError(f"index {index} out of range for {self.n_items} patches")
        d = self.draw(index)
        full = self.maps[d["map"]]
        full = bfactor_blur(full, float(d["bfactor"]), self.pixel_size)
        p = self.patch
        z, y, x = int(d["z"]), int(d["y"]), int(d["x"])
        out = full[..., z : z + p, y : y + p, x : x + p]
        return rotate_cube(out, int(d["rotation"])).contiguous().to(torch.float32)


__all__ = ["MapPatchDataset", "bfactor_blur", "cube_rotations", "rotate_cube"]
