"""Typed containers that carry physics with the array (STYLE.md point 5).

Arrays are torch tensors; volumes are [z, y, x], image stacks [n, y, x]. The pixel size is
in Å/px. Transforms return new objects instead of mutating.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cryoprior.core.errors import require_positive


@dataclass(frozen=True)
class Volume:
    """A 3D density map: ``data`` [z, y, x] with cubic voxels of ``pixel_size`` Å."""

    data: torch.Tensor
    pixel_size: float

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3-D [z, y, x], got {tuple(self.data.shape)}")
        require_positive(self.pixel_size, "pixel size (Å/px)")

    @property
    def box(self) -> int:
        """Side length in voxels (the largest dimension)."""
        return int(max(self.data.shape))

    def with_data(self, data: torch.Tensor) -> Volume:
        """A copy with new data and the same pixel size."""
        return replace(self, data=data)


@dataclass(frozen=True)
class ImageStack:
    """A stack of 2D images: ``data`` [n, y, x] with square pixels of ``pixel_size`` Å."""

    data: torch.Tensor
    pixel_size: float

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"ImageStack data must be 3-D [n, y, x], got {tuple(self.data.shape)}")
        require_positive(self.pixel_size, "pixel size (Å/px)")

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def with_data(self, data: torch.Tensor) -> ImageStack:
        """A copy with new data and the same pixel size."""
        return replace(self, data=data)
