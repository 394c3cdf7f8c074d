"""Atoms and Gaussian blobs -> maps and images.

Two operators live here:

* :func:`atoms_to_map` -- the electrostatic potential of an atomic model from five-Gaussian
  electron scattering factors (see :mod:`cryoprior.physics.scattering`), computed
  **band-limited**: the map is the inverse centred DFT of the analytic structure factor
  sampled on the box's frequency grid, so coarse pixels (2-3 Å/px) give no aliasing.
* :func:`gaussians_to_map` / :func:`gaussians_to_images` -- isotropic Gaussian blobs (e.g.
  one per Cα), differentiable with respect to the coordinates, batched; the 3-D map and its
  projections are built from 1-D factors, one per axis, since a 3-D Gaussian is the product
  of three 1-D Gaussians.

Frames: coordinates are (x, y, z) in Å in the box frame, with coordinate 0 at index D//2
of every axis; maps are indexed [z, y, x]. A pose R maps volume coordinates to the
microscope frame (r_mic = R r_vol) and an image is the integral of the rotated map along z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.tensors import as_tensor, complex_dtype
from cryoprior.geometry.fft import ifftn_c
from cryoprior.geometry.grids import centered_indices
from cryoprior.physics.scattering import VOLT_ANGSTROM2_PER_SCATTERING_UNIT, form_factor_table


def _check_coords(coords: torch.Tensor, name: str = "coords") -> None:
    if coords.ndim < 2 or coords.shape[-1] != 3:
        raise InputError(f"{name} must have shape (..., N, 3) in Å, got {tuple(coords.shape)}")


def _check_inside_box(coords: torch.Tensor, box: int, pixel_size: float) -> None:
    half = box * pixel_size / 2
    extent = float(coords.abs().max()) if coords.numel() else 0.0
    if extent > half:
        raise InputError(
            f"atoms reach {extent:.1f} Å from the box centre along an axis, but the box "
            f"({box} px x {pixel_size} Å/px) only reaches {half:.1f} Å: use a larger box, a "
            "larger pixel size, or center=True"
        )


def _bandlimited_gaussian_1d(
    centres: torch.Tensor, beta: torch.Tensor, box: int, pixel_size: float
) -> torch.Tensor:
    """Band-limited periodic 1-D Gaussians on the box's axis, shape (M, 3, D), in 1/Å.

    For a term with Fourier transform exp(-beta q^2 / 4) exp(-2 pi i q c) (q in cycles/Å),
    the value at x_n is (1/(D px)) sum_q exp(-beta q^2/4) cos(2 pi q (x_n - c)) over the
    centred grid q = (k - D//2)/(D px); for even D the unpaired Nyquist term contributes a
    cosine, which keeps the map real. Each factor sums to 1/px over the axis.
    ``centres`` is (M, 3), ``beta`` (M,) in Å².
    """
    q = centered_indices(box, centres.dtype, centres.device) / (box * pixel_size)
    amp = torch.exp(-beta[:, None] * q**2 / 4.0)  # (M, D)
    phase = torch.exp(
        -2j * math.pi * centres[..., None].to(complex_dtype(centres.dtype)) * q
    )  # (M, 3, D)
    spectrum = amp[:, None, :] * phase
    return ifftn_c(spectrum, 1).real / pixel_size


def atoms_to_map(
    coords: np.ndarray | torch.Tensor,
    elements: Sequence[str | int],
    box: int,
    pixel_size: float,
    bfactors: np.ndarray | torch.Tensor | None = None,
    center: bool = False,
    volts: bool = False,
    dtype: torch.dtype = torch.float32,
    chunk: int = 4096,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Electrostatic potential of an atomic model on a (D, D, D) grid [z, y, x].

    The potential of atom j is sum_k a_k (4 pi / (b_k + B_j))^{3/2}
    exp(-4 pi^2 r^2 / (b_k + B_j)), the inverse Fourier transform of its scattering factor
    sum_k a_k exp(-(b_k + B_j) q^2 / 4) times the Debye-Waller factor (Peng et al. 1996;
    B_j is the atom's B-factor in Å²). The map is computed band-limited and periodic: the
    analytic structure factor sampled on the centred frequency grid of the box, inverse
    DFT'd. Because the 3-D Gaussians and the phase factor are products over the axes, this
    is a sum of separable terms, built from 1-D inverse DFTs and one matrix product per chunk
    of ``chunk`` Gaussian terms (no FFT of a D^3 structure factor, no per-atom D^3 tensor).
    ``device`` selects where it is computed.

    Units: Å^-2 ("scattering-factor units"): sum(map) * pixel_size^3 equals
    sum_j sum_k a_jk in Å exactly. With ``volts=True`` the map is multiplied by
    h^2/(2 pi m0 e) = 47.878 V·Å² and is the potential in volts (its integral in V·Å³).

    ``coords`` (N, 3) in Å are (x, y, z) in the box frame, coordinate 0 at index D//2;
    ``center=True`` first subtracts their centroid. Atoms must lie inside the box. Being
    band-limited, the map has small negative lobes (up to ~2 % of an atom's peak) where the
    envelope exp(-(b_k + B) q^2 / 4) is still large at Nyquist q = 1/(2 px); they fade for
    B >~ 30 px^2. That is the exact band-limited potential, not an error.
    """
    box = int(box)
    require(box >= 1, f"box must be a positive number of voxels, got {box}")
    pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
    require(chunk >= 1, f"chunk must be >= 1, got {chunk}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    xyz = as_tensor(coords, torch.float64).to(device)
    _check_coords(xyz)
    require(xyz.ndim == 2, f"coords must have shape (N, 3), got {tuple(xyz.shape)}")
    n_atoms = xyz.shape[0]
    require(
        len(elements) == n_atoms,
        f"got {len(elements)} elements for {n_atoms} atoms: give one element per atom",
    )
    if bfactors is None:
        bfac = torch.zeros(n_atoms, dtype=torch.float64, device=xyz.device)
    else:
        bfac = as_tensor(bfactors, torch.float64).to(xyz.device).reshape(-1)
        require(
            bfac.shape[0] == n_atoms,
            f"got {bfac.shape[0]} B-factors for {n_atoms} atoms: give one per atom",
        )
        require(bool((bfac >= 0).all()), "B-factors must be >= 0 Å^2: fix the model's B column")
    if center and n_atoms:
        xyz = xyz - xyz.mean(0, keepdim=True)
    _check_inside_box(xyz, box, pixel_size)

    a_np, b_np = form_factor_table(list(elements))
    a = torch.from_numpy(a_np).to(xyz.device).reshape(-1)  # (M,) with M = 5 N, atom-major
    beta = (torch.from_numpy(b_np).to(xyz.device) + bfac[:, None]).reshape(-1)
    centres = xyz.repeat_interleave(a_np.shape[1], dim=0)  # (M, 3)

    out = torch.zeros(box * box, box, dtype=work, device=xyz.device)
    for start in range(0, a.shape[0], chunk):
        sl = slice(start, start + chunk)
        g = _bandlimited_gaussian_1d(centres[sl].to(work), beta[sl].to(work), box, pixel_size)
        gx, gy, gz = g.unbind(1)  # (m, D) each; coordinate order (x, y, z)
        zy = (a[sl].to(work)[:, None, None] * gz[:, :, None] * gy[:, None, :]).reshape(
            -1, box * box
        )
        out += zy.T @ gx
    volume = out.reshape(box, box, box)
    if volts:
        volume = volume * VOLT_ANGSTROM2_PER_SCATTERING_UNIT
    return volume.to(dtype)


def _integrated_gaussian_1d(
    centres: torch.Tensor, sigma: torch.Tensor, box: int, pixel_size: float
) -> torch.Tensor:
    """Pixel-averaged unit 1-D Gaussians: (..., N) centres -> (..., N, D) in 1/Å.

    Value at pixel n: (Phi((x_n + px/2 - c)/sigma) - Phi((x_n - px/2 - c)/sigma)) / px, the
    mean of the normal density over the pixel; the values sum to 1/px for a blob inside the
    axis, so every blob integrates exactly to its amplitude, however small sigma is.
    """
    x = centered_indices(box, centres.dtype, centres.device) * pixel_size
    scale = 1.0 / (math.sqrt(2.0) * sigma[..., None])
    d = x - centres[..., None]
    upper = torch.special.erf((d + pixel_size / 2) * scale)
    lower = torch.special.erf((d - pixel_size / 2) * scale)
    return 0.5 * (upper - lower) / pixel_size


def _blob_weights(
    coords: torch.Tensor,
    sigma: float | torch.Tensor,
    amplitudes: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch_n = coords.shape[:-1]
    sig = torch.as_tensor(sigma, dtype=coords.dtype, device=coords.device)
    if not bool((sig > 0).all()):
        raise InputError(f"sigma must be > 0 Å, got {sigma!r}")
    sig = sig.expand(batch_n) if sig.ndim == 0 else torch.broadcast_to(sig, batch_n)
    w = torch.ones(batch_n, dtype=coords.dtype, device=coords.device)
    if amplitudes is not None:
        w = w * torch.as_tensor(amplitudes, dtype=coords.dtype, device=coords.device)
    if mask is not None:
        w = w * torch.as_tensor(mask, dtype=coords.dtype, device=coords.device)
    return torch.broadcast_to(w, batch_n), sig


def gaussians_to_map(
    coords: torch.Tensor,
    box: int,
    pixel_size: float,
    sigma: float | torch.Tensor,
    amplitudes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of isotropic 3-D Gaussian blobs on a (..., D, D, D) grid [z, y, x], differentiable.

    ``coords`` (..., N, 3) are blob centres (x, y, z) in Å, origin at index D//2; ``sigma``
    (Å, scalar or broadcastable to (..., N)) the standard deviation; ``amplitudes`` and
    ``mask`` (..., N) multiply each blob (mask 0 removes padding atoms). Each voxel holds the
    blob's mean density over the voxel (pixel-averaged, via erf differences), so a blob
    inside the box integrates exactly to its amplitude: sum(map) * pixel_size^3 = amplitude.
    Units: amplitude per Å^3.

    Separable: the (..., N, D) factors of the three axes are contracted with one batched
    matrix product, O(N D^3) work and an (..., N, D^2) intermediate, no per-blob D^3 tensor.
    Gradients flow to ``coords``, ``sigma`` and ``amplitudes``.
    """
    box = int(box)
    require(box >= 1, f"box must be a positive number of voxels, got {box}")
    pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
    _check_coords(coords)
    w, sig = _blob_weights(coords, sigma, amplitudes, mask)
    gx, gy, gz = (_integrated_gaussian_1d(coords[..., i], sig, box, pixel_size) for i in range(3))
    zy = (w[..., None, None] * gz[..., :, None] * gy[..., None, :]).flatten(-2)  # (..., N, D²)
    out = zy.transpose(-1, -2) @ gx  # (..., D², D)
    return out.unflatten(-2, (box, box))


def gaussians_to_images(
    coords: torch.Tensor,
    rotations: torch.Tensor,
    box: int,
    pixel_size: float,
    sigma: float | torch.Tensor,
    amplitudes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact projections of Gaussian blobs: images (..., D, D) [y, x], differentiable.

    Each blob centre is rotated into the microscope frame (r_mic = R r_vol), its z dropped,
    and a pixel-averaged 2-D Gaussian of the same sigma drawn at (x, y): the line integral
    along z of an isotropic Gaussian is the 2-D Gaussian of the same sigma. For the identity
    pose the image equals ``gaussians_to_map(...).sum(-3) * pixel_size`` (blobs inside the
    box). Units: amplitude per Å^2.

    ``coords`` (..., N, 3) in Å and ``rotations`` (..., 3, 3) broadcast against each other
    (e.g. one cloud (N, 3) and B poses (B, 3, 3) give (B, D, D)). ``sigma``, ``amplitudes``,
    ``mask`` as in :func:`gaussians_to_map`. Gradients flow to coords and rotations.
    """
    box = int(box)
    require(box >= 1, f"box must be a positive number of voxels, got {box}")
    pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
    _check_coords(coords)
    if rotations.shape[-2:] != (3, 3):
        raise InputError(f"rotations must have shape (..., 3, 3), got {tuple(rotations.shape)}")
    rotated = coords @ rotations.to(coords.dtype).transpose(-1, -2)  # r_mic = R r_vol
    w, sig = _blob_weights(rotated, sigma, amplitudes, mask)
    gx = _integrated_gaussian_1d(rotated[..., 0], sig, box, pixel_size)
    gy = _integrated_gaussian_1d(rotated[..., 1], sig, box, pixel_size)
    return (w[..., None] * gy).transpose(-1, -2) @ gx
