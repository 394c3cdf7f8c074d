"""Masked FSC corrected for the mask's correlation by phase randomisation.

A real-space mask multiplies both half maps, so each masked spectrum is the true one
convolved with the mask's: content that both halves share at low frequency (the common
reference's imprint, or a large low-resolution blob) leaks into every higher shell and
raises the FSC there. Chen et al. (2013, Ultramicroscopy 135:24) measure that leak with
half maps whose phases beyond a shell s_r are randomised (their true correlation there
is then 0) and correct the masked FSC beyond s_r:

    FSC_true(k) = (FSC_t(k) − FSC_n(k)) / (1 − FSC_n(k)),   k > s_r,

FSC_t the masked FSC, FSC_n that of the phase-randomised maps under the same mask (RELION
``relion_postprocess``). At and below s_r, FSC_true = FSC_t.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoprior.core.errors import InputError, require
from cryoprior.geometry.grids import shell_indices
from cryoprior.metrics.fsc import FSCResult, fsc


def randomise_phases(volume: torch.Tensor, from_shell: int, seed: int) -> torch.Tensor:
    """``volume`` (D, D, D) with the phases of every Fourier voxel beyond shell
    ``from_shell`` (index units, shells as :func:`~cryoprior.metrics.fsc.fsc`) replaced by
    random ones (those of a white-noise map from ``seed``, so the result stays real);
    amplitudes kept."""
    v = torch.as_tensor(volume).to(torch.float64)
    require(v.ndim == 3 and len(set(v.shape)) == 1, f"need a cubic map, got {tuple(v.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    f = torch.fft.fftn(v)
    phase = torch.fft.fftn(noise)
    phase = phase / phase.abs().clamp_min(1e-300)
    shells = torch.fft.ifftshift(shell_indices(tuple(v.shape)))  # to the uncentred layout
    out = torch.where(shells > int(from_shell), f.abs() * phase, f)
    return torch.fft.ifftn(out).real


def corrected_fsc(
    map1: torch.Tensor,
    map2: torch.Tensor,
    pixel_size: float,
    mask: torch.Tensor,
    randomise_from: int,
    seed: int = 0,
    randomised: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> FSCResult:
    """The masked FSC of two half maps corrected for the mask by phase randomisation
    beyond shell ``randomise_from`` (see the module docstring); resolutions read from the
    corrected curve as in :func:`~cryoprior.metrics.fsc.fsc`. ``randomised``: the half
    maps already phase-randomised beyond that shell (e.g. by the reconstruction, before
    its crop: :func:`~cryoprior.solvers.backprojection.solve_half_maps`), else the maps
    given are randomised here."""
    a = torch.as_tensor(map1).to(torch.float64)
    if not 0 <= int(randomise_from) < a.shape[-1] // 2:
        raise InputError(
            f"randomise_from must be a shell in [0, {a.shape[-1] // 2}), got {randomise_from}"
        )
    measured = fsc(map1, map2, pixel_size, mask=mask)
    if randomised is None:
        randomised = (
            randomise_phases(map1, randomise_from, seed),
            randomise_phases(map2, randomise_from, seed + 1),
        )
    noise = fsc(randomised[0], randomised[1], pixel_size, mask=mask)
    t, n = measured.fsc, noise.fsc
    shell = np.arange(t.size)
    curve = np.where(shell > randomise_from, (t - n) / np.clip(1.0 - n, 1e-6, None), t)
    return FSCResult.from_curve(
        measured.frequency, curve, measured.n_voxels, measured.pixel_size, measured.box
    )
