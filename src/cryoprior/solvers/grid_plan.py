"""How particles reach a volume prior's grid, and how its maps go back to theirs.

A prior is trained at one pixel size. Two kinds of prior, two plans:

- a **fixed-box** prior (trained on whole maps of one box, e.g. ``volume_32``):
  :func:`grid_plan` crops the particles in real space to the prior's physical box and
  Fourier-crops them to its box; coarser particles or a smaller box are refused.
- a **fully convolutional** prior (trained on patches, any box; e.g. ``volume_native``):
  :func:`native_plan` keeps the particles' own physical box (cropped by at most a few
  pixels so that the prior's box is a multiple of the network's downsampling factor) and
  Fourier-crops or -pads them to the prior's pixel size. Finer particles lose the
  frequencies beyond the prior's Nyquist, so more than ``max_down`` × finer is refused;
  coarser particles would have the prior invent detail beyond the data's Nyquist, so
  more than ``max_up`` × coarser is refused. The message says what to do.

:meth:`GridPlan.map_back` takes a map on the prior's grid back to the particles' box and
pixel size (Fourier resize, then zero-pad to the box), so results are written on the
user's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoprior.core.errors import InputError, require_positive
from cryoprior.physics.degrade import fourier_resize
from cryoprior.physics.projection import crop_centred, pad_centred


@dataclass(frozen=True)
class GridPlan:
    """Particle images of ``box`` px at ``pixel_size`` Å/px reach the prior's grid by a
    real-space crop to ``crop`` px around the centre and a Fourier crop or pad to
    ``target_box`` px at ``target_pixel_size`` Å/px (= crop · pixel_size / target_box)."""

    box: int
    pixel_size: float
    crop: int
    target_box: int
    target_pixel_size: float

    @property
    def identity(self) -> bool:
        """True when the images are already on the prior's grid."""
        return self.crop == self.box == self.target_box

    def describe(self) -> str:
        """One line for reports."""
        if self.identity:
            return f"{self.box} px at {self.pixel_size:g} Å/px (the prior's grid)"
        crop = f", cropped to {self.crop} px" if self.crop != self.box else ""
        how = "Fourier-cropped" if self.target_box <= self.crop else "Fourier-padded"
        return (
            f"{self.box} px at {self.pixel_size:g} Å/px{crop}, {how} to "
            f"{self.target_box} px at {self.target_pixel_size:.4g} Å/px"
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Images (..., box, box) -> (..., target_box, target_box)."""
        if self.crop != self.box:
            images = crop_centred(images, self.crop, 2)
        if self.crop != self.target_box:
            images = fourier_resize(images, (self.target_box,) * 2, ndim=2)
        return images

    def map_back(self, volume: torch.Tensor) -> torch.Tensor:
        """A map (..., T, T, T) on the prior's grid -> (..., box, box, box) at the
        particles' pixel size (Fourier resize to the crop, zero-pad to the box)."""
        if self.crop != self.target_box:
            volume = fourier_resize(volume, (self.crop,) * 3, ndim=3)
        if self.crop != self.box:
            volume = pad_centred(volume, self.box, 3)
        return volume


def grid_plan(
    box: int, pixel_size: float, target_box: int, target_pixel_size: float, rtol: float = 0.01
) -> GridPlan:
    """The resampling from particles to a fixed-box prior's grid, or an InputError.

    Allowed: same pixel size and box; a finer pixel size whose box, cropped to the
    prior's physical box (box · pixel size, within ``rtol``), Fourier-crops to the
    prior's box. Refused: coarser pixel sizes (their images have no information at the
    prior's finer frequencies) and physical boxes smaller than the prior's.
    """
    px = require_positive(pixel_size, "particle pixel size (Å/px)")
    tpx = require_positive(target_pixel_size, "prior pixel size (Å/px)")
    box, target_box = int(box), int(target_box)
    if px > tpx * (1 + rtol):
        raise InputError(
            f"the particles are at {px:g} Å/px, coarser than the prior's {tpx:g} Å/px: "
            f"use a prior trained at {px:g} Å/px or coarser, or reconstruct without --prior"
        )
    physical = target_box * tpx
    crop = int(round(physical / px))
    if crop > box or abs(crop * px - physical) > rtol * physical:
        raise InputError(
            f"the prior's box is {target_box} px at {tpx:g} Å/px = {physical:g} Å, but the "
            f"particles' {box} px at {px:g} Å/px span {box * px:g} Å"
            + (" (too small)" if crop > box else " (no whole number of pixels matches)")
            + "; re-extract the particles with a box of at least "
            f"{physical:g} Å or use a prior trained for this box"
        )
    return GridPlan(box, px, crop, target_box, tpx)


def native_plan(
    box: int,
    pixel_size: float,
    target_pixel_size: float,
    multiple: int = 1,
    max_down: float = 2.0,
    max_up: float = 1.2,
    rtol: float = 0.02,
    min_box: int = 16,
) -> GridPlan:
    """The resampling from particles to a fully convolutional prior's pixel size.

    The prior's box T is the largest multiple of ``multiple`` for which a real-space crop
    of C ≤ ``box`` pixels spans T pixels of the prior within ``rtol`` (C · pixel_size =
    T · t, t within ``rtol`` of the prior's pixel size; t is then the exact pixel size of
    the prior's grid). Refused (InputError, with the fix): particles more than
    ``max_down`` × finer than the prior (binning would discard their high-resolution
    signal) or more than ``max_up`` × coarser (the prior would invent detail beyond
    their Nyquist), and boxes that give fewer than ``min_box`` prior pixels.
    """
    px = require_positive(pixel_size, "particle pixel size (Å/px)")
    tpx = require_positive(target_pixel_size, "prior pixel size (Å/px)")
    box, m = int(box), max(1, int(multiple))
    if px * max_down < tpx:
        raise InputError(
            f"the particles are at {px:g} Å/px, more than {max_down:g}× finer than the "
            f"prior's {tpx:g} Å/px: bringing them to the prior's grid would discard their "
            f"signal between {2 * px:.2g} and {2 * tpx:.2g} Å. Use a prior trained nearer "
            f"{px:g} Å/px, or bin the particles to {tpx / max_down:.3g} Å/px or coarser "
            "first if that resolution is not needed"
        )
    if px > tpx * max_up:
        raise InputError(
            f"the particles are at {px:g} Å/px, more than {max_up:g}× coarser than the "
            f"prior's {tpx:g} Å/px: the prior would invent detail beyond the data's Nyquist "
            f"({2 * px:.3g} Å). Use a prior trained at {px:g} Å/px or coarser, or "
            "reconstruct without --prior"
        )
    t_max = int(math.floor(box * px / tpx * (1 + rtol)))
    for t in range(t_max - t_max % m, min_box - 1, -m):
        crop = int(round(t * tpx / px))
        if 1 <= crop <= box and abs(crop * px / t - tpx) <= rtol * tpx:
            return GridPlan(box, px, crop, t, crop * px / t)
    raise InputError(
        f"a box of {box} px at {px:g} Å/px ({box * px:g} Å) gives no prior box of at "
        f"least {min_box} px that is a multiple of {m} at {tpx:g} Å/px (within "
        f"{rtol:.1%}): re-extract the particles with a larger box, or one whose size in Å "
        f"is a multiple of {m * tpx:g} Å"
    )


__all__ = ["GridPlan", "grid_plan", "native_plan"]
