"""The MFN fit's forward model on a stage's working grid, and the fitted map in any frame.

A stage compares images only up to its band b (cycles per box), so it works on the
smallest grid D' = 2⌈b⌉ + 2 of the same physical box (:class:`WorkingGrid`,
:func:`working_grid`): the network is rendered where it does not alias and
Fourier-cropped to D' (:func:`render_volume`, :func:`fourier_crop`); the images' spectra
are cropped and masked to the band (:func:`data_spectra`) and compared with the model's
(:func:`model_spectra`: projection, CTF, shift, crop, as the simulator renders), scaled by
(D/D')³. :func:`render_aligned` renders the fitted network in a reference frame exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryoprior.geometry.fft import fft2_c, fft3_c, ifft3_c
from cryoprior.geometry.grids import frequency_grid
from cryoprior.networks.mfn import MultiplicativeFilterNetwork, render_grid
from cryoprior.physics.projection import Projector, crop_centred
from cryoprior.physics.shifts import shift_spectra
from cryoprior.solvers.pose_reference import band_box

# ---------------------------------------------------------------------------------------
# the fitted map in a reference frame


def render_aligned(
    net: MultiplicativeFilterNetwork,
    box: int,
    pixel_size: float,
    amplitude: float,
    rotation: torch.Tensor | None = None,
    translation: torch.Tensor | None = None,
    scale: int | None = None,
) -> torch.Tensor:
    """The fitted map (D, D, D) moved into a reference frame: a · y(Aᵀ(r - c)).

    ``rotation`` A and ``translation`` c (Å) as returned by
    :func:`cryoprior.solvers.pose_frames.global_alignment`;
    None renders the map in its own frame. Exact (the network is evaluated at the moved
    coordinates).
    """
    ref = net.filters[0].frequency
    shift = None
    if translation is not None:
        shift = torch.as_tensor(translation, dtype=ref.dtype) / (box * pixel_size)
    rot = None if rotation is None else torch.as_tensor(rotation, dtype=ref.dtype)
    with torch.no_grad():
        return amplitude * render_grid(net, box, scale=scale, rotation=rot, shift=shift)


# ---------------------------------------------------------------------------------------
# the forward model on a stage's working grid


@dataclass(frozen=True)
class WorkingGrid:
    """A stage's working grid: the same physical box sampled by D' ≤ D voxels.

    full: the data's box D; box: D', where maps are projected; render_box: where the
    network is evaluated (its Nyquist exceeds the network output's band, so sampling does
    not alias; the map is then Fourier-cropped to D'); pixel_size: Å/px of the working grid
    (p·D/D'); band: the loss band in cycles per box; mask: (D', D') bool, the centred
    frequencies with |k| ≤ band; spectral_scale: (D/D')³, which makes spectra of D'-grid
    projections comparable with the D-grid images' spectra.
    """

    full: int
    box: int
    render_box: int
    pixel_size: float
    band: float  # cycles per box
    mask: torch.Tensor  # (D', D') bool: |k| <= band
    spectral_scale: float  # (D / D')^3


def working_grid(full: int, pixel_size: float, band: float, net_band: float) -> WorkingGrid:
    """The working grid of a stage: projections on D' = 2⌈band⌉ + 2 (at most D), whose
    Nyquist exceeds the loss band, and the network rendered on a grid whose Nyquist exceeds
    the output's band ``net_band`` (cycles per box), so neither aliases."""
    box = band_box(full, band)
    render_box = max(box, band_box(full, net_band))
    k = frequency_grid((box, box), 1.0 / box, torch.float64).norm(dim=-1)  # cycles/box
    return WorkingGrid(
        full=full,
        box=box,
        render_box=render_box,
        pixel_size=pixel_size * full / box,
        band=band,
        mask=k <= band + 1e-9,
        spectral_scale=(full / box) ** 3,
    )


def fourier_crop(volume: torch.Tensor, box: int) -> torch.Tensor:
    """A (D, D, D) map resampled on a coarser (box,)*3 grid of the same physical box by
    cropping its centred spectrum (voxel values kept: scaled by (box/D)³)."""
    size = volume.shape[-1]
    if box == size:
        return volume
    spectrum = crop_centred(fft3_c(volume), box, 3) * (box / size) ** 3
    return ifft3_c(spectrum).real.to(volume.dtype)


def render_volume(
    net: MultiplicativeFilterNetwork, grid: WorkingGrid, amplitude: float, scale: int
) -> torch.Tensor:
    """Output ``scale`` of the network times ``amplitude`` on the working grid (D'³):
    rendered on ``grid.render_box`` and Fourier-cropped to D'. Differentiable."""
    volume = amplitude * render_grid(net, grid.render_box, scale=scale)
    return fourier_crop(volume, grid.box)


def data_spectra(images: torch.Tensor, grid: WorkingGrid) -> torch.Tensor:
    """Observed spectra in the band, (B, n_mask) complex: the centred 2-D FTs of the (B, D, D)
    images, cropped to the working grid's D' × D' frequencies and masked to the band."""
    spec = crop_centred(fft2_c(images), grid.box, 2)
    return spec[:, grid.mask]


def model_spectra(
    projector: Projector,
    rotations: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    ctf_padded: torch.Tensor | None,
    grid: WorkingGrid,
) -> torch.Tensor:
    """Model spectra in the band (B, n_mask), comparable with :func:`data_spectra`.

    ``projector`` holds the map sampled on the working grid (D'³, voxel values as on the
    full grid). Slices of its padded FT at poses ``rotations`` are multiplied by
    ``ctf_padded`` (the CTFs on the padded working grid, or None), moved so the particle
    centre sits at -``shifts_angstrom`` (RELION origins, Å), cropped to D' × D', Fourier
    transformed, masked to the band and scaled by (D/D')³: the simulator's images
    (:class:`cryoprior.physics.simulator.ParticleRenderer`) low-passed to the band.
    """
    spec = projector.project_ft(rotations)
    if ctf_padded is not None:
        spec = spec * ctf_padded
    spec = shift_spectra(spec, -shifts_angstrom / grid.pixel_size)
    images = projector.images_from_ft(spec)
    return fft2_c(images)[:, grid.mask] * grid.spectral_scale


__all__ = [
    "WorkingGrid",
    "data_spectra",
    "fourier_crop",
    "model_spectra",
    "render_aligned",
    "render_volume",
    "working_grid",
]
