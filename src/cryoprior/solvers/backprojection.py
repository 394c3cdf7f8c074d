"""Baseline reconstruction: Wiener-filtered direct Fourier inversion with known poses.

Each image is zero-padded to Dp = round(pad · D), Fourier transformed, multiplied by its
CTF and inserted as a central slice into a padded 3-D grid (the Fourier slice theorem);
the CTF² weights are inserted with the same kernel. The estimate is the Wiener filter

    V̂(k) = Σᵢ CTFᵢ(k) F̂ᵢ(k) / (Σᵢ CTFᵢ(k)² + 1 / SSNR(|k|))

(e.g. Penczek 2010, Methods Enzymol. 482:1, eq. 43; Scheres 2012, J. Struct. Biol.
180:519, eq. 16 without the iterative terms), followed by the inverse 3-D FT, the gridding
correction for the interpolation kernel and a crop to D³.

CTFs are used on the padded slice grid (frequency step 1/(Dp · pixel size)). They can be
given three ways (``ctf`` argument):

- ``None``: no CTF (CTF = 1);
- a callable ``ctf(indices, shape) -> (n, Dp, Dp)``: the real, centred CTFs of the images
  ``indices`` (a long tensor) evaluated on a grid of ``shape`` = (Dp, Dp). This is exact;
  with ``physics.ctf.compute_ctf(params, shape, pixel_size)`` it is
  ``lambda idx, shape: compute_ctf(params[idx], shape, pixel_size)`` (for parameters
  that index by image);
- a real tensor (N, Dp, Dp) (already on the padded grid), or (N, D, D) on the image's own
  grid, which is resampled bilinearly onto the padded frequencies (approximate at high
  frequency, where the CTF oscillates quickly: prefer the callable).

Only one chunk of images, their spectra and interpolation plan are in memory at a time;
the main cost is the padded grids (a complex and a real Dp³ grid per reconstruction).
:func:`reconstruct_source` streams a particle set from disk in batches and can set a
per-shell SSNR from the FSC of its half maps (:func:`solve_half_maps`). Under ``torchrun``
(``distributed=True``) each process streams its own shard of the particles and the grids
are summed over the processes (:mod:`cryoprior.solvers.distributed_recon`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cryoprior.core.errors import require
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import complex_dtype
from cryoprior.geometry.fft import ifft3_c
from cryoprior.metrics.fsc import FSCResult, fsc
from cryoprior.metrics.fsc_corrected import randomise_phases
from cryoprior.physics.ctf import compute_ctf
from cryoprior.physics.fourier_slice import (
    Kernel,
    check_kernel,
    check_rotations,
    flip_centred,
    full_to_half,
    gridding_correction,
    insert_slices,
    rfft2_c,
)
from cryoprior.physics.projection import crop_centred, pad_centred, padded_size
from cryoprior.solvers.distributed_recon import (
    allreduce_accumulators,
    process_layout,
    shard_indices,
    split_halves,
)

if TYPE_CHECKING:
    from cryoprior.physics.source import ParticleBatch, ParticleSource

CTFSource = torch.Tensor | Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None

# Padded image pixels per chunk (a chunk's spectra, CTFs and plan stay well under 1 GB).
_PIXELS_PER_CHUNK = 2**22


class HalfMaps(NamedTuple):
    """Result of :func:`half_map_reconstruct`: maps (D, D, D) and the image split."""

    full: torch.Tensor
    half1: torch.Tensor
    half2: torch.Tensor
    split: tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------
# inputs


def _check_inputs(
    images: torch.Tensor, rotations: torch.Tensor, ctf: CTFSource, pad: float, kernel: str
) -> int:
    require(
        isinstance(images, torch.Tensor)
        and images.ndim == 3
        and images.shape[-1] == images.shape[-2]
        and images.is_floating_point(),
        f"images must be a real (N, D, D) tensor, got {tuple(getattr(images, 'shape', ()))}",
    )
    check_rotations(rotations)
    require(
        images.shape[0] == rotations.shape[0],
        f"got {images.shape[0]} images but {rotations.shape[0]} rotations",
    )
    require(images.shape[0] > 0, "no images to reconstruct from")
    check_kernel(kernel)
    size = images.shape[-1]
    dp = padded_size(size, pad)
    if isinstance(ctf, torch.Tensor):
        n = images.shape[0]
        require(
            ctf.shape in ((n, size, size), (n, dp, dp)) and not ctf.is_complex(),
            f"a CTF tensor must be real with shape {(n, size, size)} (image grid) or "
            f"{(n, dp, dp)} (padded grid), got {tuple(ctf.shape)}",
        )
    else:
        require(
            ctf is None or callable(ctf),
            "ctf must be None, a tensor of CTFs, or a callable ctf(indices, shape)",
        )
    return dp


def _resample_centred(ctf: torch.Tensor, dp: int) -> torch.Tensor:
    """Bilinear resampling of centred (n, D, D) spectra onto the centred (n, Dp, Dp) grid.

    Padded index j has frequency (j - Dp//2)/Dp cycles/px, i.e. image-grid index
    D//2 + (j - Dp//2)·D/Dp; beyond the image grid's edge the edge value is used.
    """
    size = ctf.shape[-1]
    j = torch.arange(dp, dtype=ctf.dtype, device=ctf.device) - dp // 2
    u = (size // 2 + j * size / dp) * (2.0 / max(size - 1, 1)) - 1.0
    gy, gx = torch.meshgrid(u, u, indexing="ij")
    grid = torch.stack([gx, gy], -1).expand(ctf.shape[0], dp, dp, 2)
    out = F.grid_sample(
        ctf.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return out.squeeze(1)


def _ctf_chunk(
    ctf: CTFSource, ids: torch.Tensor, size: int, dp: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """CTFs of images ``ids`` on the padded grid, half layout (n, Dp, Dp//2+1), or None."""
    if ctf is None:
        return None
    if callable(ctf) and not isinstance(ctf, torch.Tensor):
        full = ctf(ids, (dp, dp))
        require(
            isinstance(full, torch.Tensor)
            and full.shape == (ids.shape[0], dp, dp)
            and not full.is_complex(),
            f"the ctf callable must return a real tensor of shape "
            f"{(ids.shape[0], dp, dp)} for shape=({dp}, {dp}), got "
            f"{tuple(getattr(full, 'shape', ()))}",
        )
    else:
        full = ctf[ids.to(ctf.device)]
        if full.shape[-1] != dp:
            full = _resample_centred(full.to(dtype), dp)
    return full_to_half(full.to(dtype=dtype, device=ids.device))


def _padded_shells(dp: int, size: int, device: torch.device | str | None) -> torch.Tensor:
    """The output-map shell round(|k| · D / Dp) of every voxel of the padded centred
    (Dp, Dp, Dp) grid (long)."""
    k = torch.arange(dp, dtype=torch.float64, device=device) - dp // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return torch.round(r * size / dp).long()


def _inverse_ssnr(
    snr: float | torch.Tensor, size: int, dp: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """1/SSNR on the padded grid (scalar, or (Dp, Dp, Dp) from per-shell values).

    Shell s of the output map (frequency s / (D · pixel size)) holds the padded voxels
    with round(|k| · D / Dp) = s; shells past the end of ``snr`` use its last value.
    """
    if not isinstance(snr, torch.Tensor) or snr.ndim == 0:
        value = float(snr)
        require(0 < value < float("inf"), f"snr must be a finite number > 0, got {value}")
        return torch.tensor(1.0 / value, dtype=dtype, device=device)
    require(
        snr.ndim == 1
        and snr.numel() > 0
        and bool((snr >= 0).all())
        and bool(torch.isfinite(snr).all()),
        f"a per-shell snr must be a 1-D tensor of finite values >= 0 (0 drops a "
        f"shell), got shape {tuple(snr.shape)}",
    )
    shell = _padded_shells(dp, size, device).clamp_(max=snr.numel() - 1)
    return (1.0 / snr.to(device=device, dtype=torch.float64))[shell].to(dtype)


# ---------------------------------------------------------------------------------------
# accumulation and the Wiener step


def _accumulate(
    images: torch.Tensor,
    rotations: torch.Tensor,
    ctf: CTFSource,
    ids: torch.Tensor,
    dp: int,
    kernel: Kernel,
    chunk_size: int | None,
    grids: tuple[torch.Tensor, torch.Tensor],
    show_progress: bool,
) -> None:
    """Insert CTF·F̂ (into grids[0]) and CTF² (into grids[1]) of images ``ids``.

    Only the kx >= 0 half of each (Hermitian) spectrum is inserted, the kx = 0 column at
    weight ½; :func:`_wiener` adds the mirrored half.
    """
    size = images.shape[-1]
    real = images.dtype
    chunk = chunk_size or max(1, _PIXELS_PER_CHUNK // (dp * dp))
    starts = range(0, ids.shape[0], chunk)
    for start in progress(starts, total=len(starts), desc="back-projecting", enabled=show_progress):
        sel = ids[start : start + chunk]
        spectra = rfft2_c(pad_centred(images[sel.to(images.device)], dp, 2))
        c = _ctf_chunk(ctf, sel, size, dp, real)
        if c is None:
            weight = torch.ones(spectra.shape, dtype=real, device=spectra.device)
        else:
            spectra = spectra * c
            weight = c * c
        spectra[..., 0] *= 0.5
        weight[..., 0] *= 0.5
        insert_slices(
            spectra,
            rotations[sel.to(rotations.device)],
            dp,
            weight,
            half=True,
            kernel=kernel,
            out=grids,
        )


def insert_images(
    images: torch.Tensor,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None,
    dp: int,
    kernel: Kernel,
    grids: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Add CTF·F̂ and CTF² of centred images (n, D, D) at poses (n, 3, 3) into ``grids``
    (complex and real (Dp, Dp, Dp), kx >= 0 halves; see :func:`complete_grids`); ``ctf``
    is None or real (n, Dp, Dp) on the padded grid."""
    ids = torch.arange(images.shape[0], device=images.device)
    _accumulate(images, rotations, ctf, ids, dp, kernel, None, grids, False)


def complete_grids(
    grids: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full Hermitian grids (Σ CTF·F̂, Σ CTF²) from the inserted kx >= 0 halves."""
    return _complete(grids)


def _complete(grids: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the mirrored kx < 0 halves: G(k) + conj G(-k) and W(k) + W(-k)."""
    numerator, weight = grids
    dims = (0, 1, 2)
    return (
        numerator + torch.conj(flip_centred(numerator, dims)),
        weight + flip_centred(weight, dims),
    )


def _solve(
    completed: tuple[torch.Tensor, torch.Tensor],
    inv_ssnr: torch.Tensor,
    size: int,
    kernel: Kernel,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divide by CTF² + 1/SSNR, (optionally multiply by ``keep`` on the padded grid),
    inverse 3-D FT, gridding correction, crop."""
    numerator, weight = completed
    dp = numerator.shape[-1]
    estimate = numerator / (weight + inv_ssnr)
    if keep is not None:
        estimate = estimate * keep.to(weight.dtype)
    volume = crop_centred(ifft3_c(estimate).real, size, 3)
    return volume / gridding_correction(size, dp, 3, kernel, volume.dtype, volume.device)


def _wiener(
    grids: tuple[torch.Tensor, torch.Tensor], inv_ssnr: torch.Tensor, size: int, kernel: Kernel
) -> torch.Tensor:
    """Complete the Hermitian halves, then :func:`_solve`."""
    return _solve(_complete(grids), inv_ssnr, size, kernel)


def new_grids(
    dp: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero accumulators for :func:`insert_images`: complex Σ CTF·F̂ and real Σ CTF², each
    (Dp, Dp, Dp), the complex one in the complex dtype matching the real ``dtype``."""
    return (
        torch.zeros((dp,) * 3, dtype=complex_dtype(dtype), device=device),
        torch.zeros((dp,) * 3, dtype=dtype, device=device),
    )


@torch.no_grad()
def wiener_reconstruct(
    images: torch.Tensor,
    rotations: torch.Tensor,
    ctf: CTFSource = None,
    *,
    pad: float = 2.0,
    snr: float | torch.Tensor = 1.0,
    kernel: Kernel = "linear",
    chunk_size: int | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Wiener-filtered Fourier reconstruction (D, D, D) from images with known poses.

    Args:
        images: real (N, D, D) particle images, centred (origin at D//2), already
            re-centred for their shifts.
        rotations: (N, 3, 3) poses (volume -> microscope frame), as for ``project``.
        ctf: None, a callable ``ctf(indices, (Dp, Dp))``, or a tensor (see module notes).
        pad: oversampling of the padded grids, Dp = round(pad · D).
        snr: SSNR of one image's Fourier component (signal power / noise power at CTF = 1):
            a number, or a 1-D tensor per Fourier shell of the output map (index s is
            s / (D · pixel size) cycles/Å; 0 drops a shell). 1/SSNR is added to the CTF²
            sums, so Fourier voxels covered by few images are shrunk towards 0: the
            default 1.0 suits moderately noisy data; for clean data use a large value
            (e.g. 100), for real data an SSNR estimated from half-map FSCs.
        kernel: ``"linear"`` (trilinear, as RELION) or ``"cubic"`` (B-spline) insertion.
        chunk_size: images per chunk (default: about 4 M padded pixels per chunk).
        show_progress: show a progress bar.

    Returns:
        The map (D, D, D) in the units of ``project``'s images per voxel (so that
        ``project(map)`` reproduces the images). float64 images give a float64 map.
    """
    dp = _check_inputs(images, rotations, ctf, pad, kernel)
    grids = new_grids(dp, images.dtype, images.device)
    ids = torch.arange(images.shape[0], device=images.device)
    _accumulate(images, rotations, ctf, ids, dp, kernel, chunk_size, grids, show_progress)
    inv = _inverse_ssnr(snr, images.shape[-1], dp, images.dtype, images.device)
    return _wiener(grids, inv, images.shape[-1], kernel)


@torch.no_grad()
def half_map_reconstruct(
    images: torch.Tensor,
    rotations: torch.Tensor,
    ctf: CTFSource = None,
    *,
    pad: float = 2.0,
    snr: float | torch.Tensor = 1.0,
    seed: int = 0,
    kernel: Kernel = "linear",
    chunk_size: int | None = None,
    show_progress: bool = False,
) -> HalfMaps:
    """Full map and two independent half maps from a random half split of the images.

    The split is a random permutation from ``seed`` (first ⌊N/2⌋ images to half 1); each
    image is inserted once, into its half's grids, and the full map uses their sums.
    Arguments as in :func:`wiener_reconstruct`. Returns ``HalfMaps(full, half1, half2,
    split=(indices1, indices2))`` with sorted index tensors.
    """
    dp = _check_inputs(images, rotations, ctf, pad, kernel)
    require(images.shape[0] >= 2, "half maps need at least 2 images")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(images.shape[0], generator=gen).to(images.device)
    n1 = images.shape[0] // 2
    split = (perm[:n1].sort().values, perm[n1:].sort().values)
    halves = []
    for ids in split:
        grids = new_grids(dp, images.dtype, images.device)
        _accumulate(images, rotations, ctf, ids, dp, kernel, chunk_size, grids, show_progress)
        halves.append(grids)
    size = images.shape[-1]
    inv = _inverse_ssnr(snr, size, dp, images.dtype, images.device)
    half1 = _wiener(halves[0], inv, size, kernel)
    half2 = _wiener(halves[1], inv, size, kernel)
    total = (halves[0][0] + halves[1][0], halves[0][1] + halves[1][1])
    del halves
    return HalfMaps(_wiener(total, inv, size, kernel), half1, half2, split)


# ---------------------------------------------------------------------------------------
# particle sources (streamed from disk) with an FSC-based SSNR


@dataclass(frozen=True)
class SourceReconstruction:
    """Maps from :func:`reconstruct_source` and how they were made.

    full, half1, half2: (D, D, D) maps; fsc_halves: FSC between the final half maps
    (unmasked); ssnr: the per-image SSNR used, per shell of the map (index s is
    s / (D · pixel size) cycles/Å); split: the 0-based particle indices of each half;
    seconds: wall time; randomised: the half maps with phases randomised beyond shell
    ``randomised_from`` (when asked for; see :func:`solve_half_maps`).
    """

    full: torch.Tensor
    half1: torch.Tensor
    half2: torch.Tensor
    fsc_halves: FSCResult
    ssnr: torch.Tensor
    split: tuple[np.ndarray, np.ndarray]
    seconds: float
    randomised: tuple[torch.Tensor, torch.Tensor] | None = None
    randomised_from: int | None = None


def _shell_mean(values: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of a padded (Dp³) grid over each shell s = round(|k| · D / Dp), s <= D//2."""
    shell = _padded_shells(values.shape[-1], size, values.device).reshape(-1)
    n_shells = size // 2 + 1
    keep = shell < n_shells
    sums = torch.zeros(n_shells, dtype=torch.float64, device=values.device)
    sums.index_add_(0, shell[keep], values.reshape(-1)[keep].to(torch.float64))
    counts = torch.bincount(shell[keep], minlength=n_shells).clamp_min(1)
    return sums / counts


def ssnr_from_fsc(fsc_curve: torch.Tensor, mean_weight: torch.Tensor) -> torch.Tensor:
    """Per-image SSNR per shell from a half-map FSC: FSC/(1-FSC) / mean CTF² weight.

    FSC/(1-FSC) is the SSNR of a half map (Penczek 2010, Methods Enzymol. 482:1, eq. 17);
    a half map's Fourier voxel sums the CTF² weights W of its images, so one image's SSNR
    is that divided by the shell's mean W. The Wiener regulariser 1/SSNR_image then equals
    mean W / SSNR_half, RELION's choice (Scheres 2012, J. Struct. Biol. 180:519, eq. 16).
    FSC is clipped to [0, 0.999]; shells with FSC <= 0 get SSNR 0 (dropped).
    """
    f = fsc_curve.to(torch.float64).clamp(0.0, 0.999)
    ssnr_half = f / (1.0 - f)
    return torch.where(mean_weight > 0, ssnr_half / mean_weight.clamp_min(1e-30), 0.0)


class HalfMapSolution(NamedTuple):
    """Result of :func:`solve_half_maps`: the (D, D, D) maps, the FSC of the final half maps
    (unmasked) and the per-image SSNR used, per shell of the map; with ``randomise_from``
    also the half maps with their phases randomised beyond shell ``randomised_from``."""

    full: torch.Tensor
    half1: torch.Tensor
    half2: torch.Tensor
    fsc_halves: FSCResult
    ssnr: torch.Tensor
    randomised: tuple[torch.Tensor, torch.Tensor] | None = None
    randomised_from: int | None = None


def randomisation_shell(unmasked_fsc: np.ndarray, limit: int) -> int:
    """Where phase randomisation starts: the first shell at which the unmasked half-map FSC
    falls below 0.8 (RELION's choice), at most ``limit`` (and at least 1)."""
    below = np.nonzero(np.asarray(unmasked_fsc)[1:] < 0.8)[0]
    first = int(below[0]) + 1 if below.size else int(limit)
    return max(1, min(first, int(limit)))


@torch.no_grad()
def solve_half_maps(
    grids: Sequence[tuple[torch.Tensor, torch.Tensor]],
    size: int,
    pixel_size: float,
    *,
    ssnr: str | float = "fsc",
    kernel: Kernel = "linear",
    randomise_from: int | None = None,
    seed: int = 0,
) -> HalfMapSolution:
    """Half maps and the full map from the two halves' accumulators.

    ``grids`` holds, per half, the kx >= 0 grids ``(Σ CTF·F̂, Σ CTF²)`` filled by
    :func:`insert_images` (summed over processes when sharded); they are not modified.
    ``ssnr`` is a number (constant per-image SSNR) or ``"fsc"``: half maps made with
    SSNR 1 give an FSC that sets a per-shell SSNR (:func:`ssnr_from_fsc`) for the final
    maps. The maps come back on the grids' device, in their real dtype.

    ``randomise_from`` (a shell): also the half maps with their phases randomised beyond
    s = :func:`randomisation_shell` (≤ ``randomise_from``) of the final FSC, for the mask
    correction of :func:`~cryoprior.metrics.fsc_corrected.corrected_fsc`. Each is L + ρ(H −
    L): L the map solved from the padded spectrum's shells ≤ s only (so it carries what the
    crop leaks from them into higher shells, which randomising the cropped map would
    destroy), ρ the phase randomisation beyond s on the output grid (independent per half,
    from ``seed``), which keeps each shell's power.
    """
    require(len(grids) == 2, f"need the accumulators of 2 half sets, got {len(grids)}")
    require(
        ssnr == "fsc" or (not isinstance(ssnr, str) and float(ssnr) > 0),
        f"ssnr must be 'fsc' or a number > 0, got {ssnr!r}",
    )
    check_kernel(kernel)
    dp = grids[0][1].shape[-1]
    dtype, device = grids[0][1].dtype, grids[0][1].device
    halves = [_complete(g) for g in grids]
    if ssnr == "fsc":
        first = _inverse_ssnr(1.0, size, dp, dtype, device)
        curve = fsc(
            _solve(halves[0], first, size, kernel),
            _solve(halves[1], first, size, kernel),
            pixel_size,
        ).fsc
        mean_w = (_shell_mean(halves[0][1], size) + _shell_mean(halves[1][1], size)) / 2
        per_shell = ssnr_from_fsc(torch.as_tensor(curve), mean_w.cpu())
    else:
        per_shell = torch.full((size // 2 + 1,), float(ssnr), dtype=torch.float64)
    inv = _inverse_ssnr(per_shell, size, dp, dtype, device)
    half1 = _solve(halves[0], inv, size, kernel)
    half2 = _solve(halves[1], inv, size, kernel)
    total = (halves[0][0] + halves[1][0], halves[0][1] + halves[1][1])
    full = _solve(total, inv, size, kernel)
    curve = fsc(half1, half2, pixel_size)
    if randomise_from is None:
        return HalfMapSolution(full, half1, half2, curve, per_shell)
    start = randomisation_shell(curve.fsc, randomise_from)
    low = (_padded_shells(dp, size, device) <= start).to(torch.float64)
    randomised = []
    for h, half in enumerate((half1, half2)):
        leak = _solve(halves[h], inv, size, kernel, keep=low)
        randomised.append(leak + randomise_phases(half - leak, start, seed + h).to(half.dtype))
    return HalfMapSolution(full, half1, half2, curve, per_shell, tuple(randomised), start)


@torch.no_grad()
def reconstruct_source(
    source: ParticleSource,
    *,
    ssnr: str | float = "fsc",
    pad: float = 2.0,
    seed: int = 0,
    batch_size: int = 512,
    kernel: Kernel = "linear",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    distributed: bool = False,
    randomise_from: int | None = None,
    show_progress: bool = False,
) -> SourceReconstruction:
    """Half maps and the full map from a particle source, streamed in batches.

    Images are read ``batch_size`` at a time, re-centred for their RELION origins
    (``source.batches(center=True)``) and inserted with their CTFs, evaluated exactly on
    the padded grid (``physics.ctf.compute_ctf``), into grids on ``device``. The random
    half split comes from ``seed``
    (:func:`~cryoprior.solvers.distributed_recon.split_halves`). ``ssnr`` is a number
    (constant per-image SSNR, as in :func:`wiener_reconstruct`) or ``"fsc"`` (per-shell
    SSNR from the half maps' FSC; :func:`solve_half_maps`). Maps are returned on the CPU.

    ``distributed=True`` under an initialised process group (``torchrun``; without one it
    runs as a single process): every process must call this with the same arguments; each
    reads only its shard of the particles
    (:func:`~cryoprior.solvers.distributed_recon.shard_indices`), the grids are summed
    over the processes, and every process returns the maps and split one process would
    (up to the order of the float additions). ``seconds`` is this process's wall time.
    ``randomise_from``: also the phase-randomised half maps (:func:`solve_half_maps`).
    """
    start_time = time.perf_counter()
    n = len(source)
    require(n >= 2, "a reconstruction with half maps needs at least 2 particles")
    require(
        ssnr == "fsc" or (not isinstance(ssnr, str) and float(ssnr) > 0),
        f"ssnr must be 'fsc' or a number > 0, got {ssnr!r}",
    )
    check_kernel(kernel)
    device = torch.device(device)
    size, pixel_size = source.box, source.pixel_size
    dp = padded_size(size, pad)
    split = split_halves(n, seed)
    rank, world = process_layout() if distributed else (0, 1)
    mine = shard_indices(n, rank, world)
    parts = [np.intersect1d(part, mine, assume_unique=True) for part in split]
    grids = [new_grids(dp, dtype, device), new_grids(dp, dtype, device)]

    def batches() -> Iterator[tuple[int, ParticleBatch]]:
        for half, part in enumerate(parts):
            for batch in source.batches(batch_size, indices=part, center=True, dtype=dtype):
                yield half, batch

    n_batches = sum(-(-len(part) // batch_size) for part in parts)
    for half, batch in progress(
        batches(), total=n_batches, desc="back-projecting", enabled=show_progress
    ):
        ctf = None
        if batch.ctf is not None:
            ctf = compute_ctf(batch.ctf, (dp, dp), pixel_size, dtype, device)
        images = batch.images.to(device=device, dtype=dtype)
        rotations = batch.rotations.to(device=device, dtype=dtype)
        _check_inputs(images, rotations, ctf, pad, kernel)
        ids = torch.arange(images.shape[0], device=device)
        _accumulate(images, rotations, ctf, ids, dp, kernel, None, grids[half], False)
    allreduce_accumulators(grids)
    solution = solve_half_maps(
        grids, size, pixel_size, ssnr=ssnr, kernel=kernel, randomise_from=randomise_from, seed=seed
    )
    del grids
    return SourceReconstruction(
        full=solution.full.cpu(),
        half1=solution.half1.cpu(),
        half2=solution.half2.cpu(),
        fsc_halves=solution.fsc_halves,
        ssnr=solution.ssnr,
        split=split,
        seconds=time.perf_counter() - start_time,
        randomised=None
        if solution.randomised is None
        else (solution.randomised[0].cpu(), solution.randomised[1].cpu()),
        randomised_from=solution.randomised_from,
    )
