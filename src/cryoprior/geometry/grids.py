"""Centred real-space and Fourier-space grids.

The origin of every axis is index ``N // 2`` (even and odd N alike), the DC term of a
centred transform sits at the same index. Coordinate vectors are ordered (x, y, z) while
arrays are indexed [z, y, x], so the last array axis is x.
"""

from __future__ import annotations

import torch


def centered_indices(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Index offsets from the centre of an axis of length ``n``: ``arange(n) - n // 2``."""
    return torch.arange(n, dtype=dtype, device=device) - (n // 2)


def coordinate_grid(
    shape: tuple[int, ...],
    pixel_size: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Real-space coordinates of every voxel in Å, shape (*shape, ndim), last dim (x, y[, z]).

    ``shape`` is the array shape ([z,] y, x). Coordinate 0 is at index N//2.
    """
    axes = [centered_indices(n, dtype, device) * pixel_size for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)


def frequency_grid(
    shape: tuple[int, ...],
    pixel_size: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Centred spatial frequencies in cycles/Å, shape (*shape, ndim), last dim (fx, fy[, fz]).

    The frequency at index k of an axis of length N is (k - N//2) / (N * pixel_size).
    """
    axes = [centered_indices(n, dtype, device) / (n * pixel_size) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)


def radial_frequency(
    shape: tuple[int, ...],
    pixel_size: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """|f| in cycles/Å on the centred grid of ``shape``."""
    return frequency_grid(shape, pixel_size, dtype, device).norm(dim=-1)


def shell_indices(shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer Fourier shell of every voxel of a cubic/square centred grid.

    Shell k holds the voxels whose radius in index units rounds to k; shell k has
    frequency k / (N * pixel_size) cycles/Å. Requires all sides equal.
    """
    if len(set(shape)) != 1:
        raise ValueError(f"shell_indices needs a cubic or square grid, got shape {shape}")
    r = frequency_grid(shape, 1.0 / shape[0], torch.float64, device).norm(dim=-1)
    return torch.round(r).long()
