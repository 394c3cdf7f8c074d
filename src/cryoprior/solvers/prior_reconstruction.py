"""Prior-guided 3-D reconstruction: particles at known poses + a density-map diffusion prior.

Pipeline (:func:`reconstruct_with_prior`):

1. **Grid.** The particles are brought to the prior's sampling (:func:`grid_plan`): the
   same physical box is required; images at a finer pixel size are Fourier-cropped to
   the prior's (a larger physical box is first cropped in real space around the centre);
   coarser images, or a box that cannot hold the prior's, are refused with an error
   that says what to do. Never a silent mis-scaling.
2. **Sufficient statistics.** One streamed pass over the particles
   (:func:`accumulate_particles`) re-centres them for their shifts and inserts CTF·F̂
   and CTF² into padded 3-D Fourier grids (exactly as the Wiener baseline does), and
   measures the noise σ (background pixels outside a radius) and each image's pixel
   sum and CTF(0). For white Gaussian noise the log-likelihood of the images at known
   poses is, up to a constant and within the gridding approximation of the
   Fourier-slice interpolation, −κ Σ_k W(k) |X(k) − N(k)/W(k)|² / (2σ²), with X the
   padded 3-D spectrum of the map, N the inserted CTF·F̂ and W the inserted CTF². The
   constant κ (DFT normalisation and zero-padding) is calibrated numerically against
   the exact projection ∘ CTF operator on a subset of the images
   (:func:`calibrate_fourier_likelihood`), so the likelihood has the right weight
   against the prior. Its cost per evaluation is two FFTs of the padded grid, whatever
   the number of images: 1000 images cost what 3 do.
3. **Scale.** The measurement's intensity unit is fixed from the measurement
   (:func:`~cryoprior.physics.operators.estimate_map_integral`, the images' DC terms)
   and the molecule's mass (:mod:`cryoprior.physics.composition`), never from a ground
   truth; an explicit ``intensity_scale`` can be given instead.
4. **Posterior sampling.** :func:`cryoprior.solvers.dps.dps_sample` with the Fourier
   likelihood as its linear operator: ``"pigdm"`` (default; Π-GDM's Gaussian
   likelihood through the network's Jacobian, Jacobi-preconditioned CG in the
   measurement space, the correction's norm capped near t = 1 — see
   :mod:`cryoprior.solvers.dps`), ``"dps_x0"`` (a proximal data step on x̂0 by CG, no
   back-propagation; cheaper, but it lets the prior override the data at 10–100 images)
   or ``"dps"`` (Chung et al. 2023), DDIM or DDPM steps. Several samples give the
   posterior mean and the per-voxel standard deviation.

Returned maps are in the measurement's units per voxel at the prior's pixel size, the
same units as the Wiener map of the same (resampled) particles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import complex_dtype
from cryoprior.geometry.fft import fft3_c, ifft3_c
from cryoprior.physics.composition import potential_integral_from_mass
from cryoprior.physics.ctf import compute_ctf
from cryoprior.physics.degrade import fourier_downsample
from cryoprior.physics.fourier_slice import Kernel, check_kernel, gridding_correction
from cryoprior.physics.operators import (
    LinearOperator,
    ProjectionCTFOperator,
    background_mask,
    estimate_map_integral,
)
from cryoprior.physics.projection import crop_centred, pad_centred, padded_size
from cryoprior.physics.source import ParticleSource
from cryoprior.priors import Prior
from cryoprior.solvers.backprojection import complete_grids, insert_images
from cryoprior.solvers.dps import GUIDANCES, DPSResult, dps_sample

# ---------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class GridPlan:
    """How particle images of ``box`` px at ``pixel_size`` Å/px reach the prior's grid:
    crop to ``crop`` px in real space (around the centre), then Fourier-crop to
    ``target_box`` px at ``target_pixel_size`` Å/px."""

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
        return (
            f"{self.box} px at {self.pixel_size:g} Å/px{crop}, Fourier-cropped to "
            f"{self.target_box} px at {self.target_pixel_size:g} Å/px"
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Images (..., box, box) -> (..., target_box, target_box)."""
        if self.crop != self.box:
            images = crop_centred(images, self.crop, 2)
        if self.crop != self.target_box:
            images = fourier_downsample(images, self.crop / self.target_box, ndim=2)
        return images


def grid_plan(
    box: int, pixel_size: float, target_box: int, target_pixel_size: float, rtol: float = 0.01
) -> GridPlan:
    """The resampling from particles to the prior's grid, or an InputError saying why not.

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


# ---------------------------------------------------------------------------------------
# sufficient statistics of the particles


@dataclass
class FourierData:
    """The particles' sufficient statistics at known poses on a padded Fourier grid.

    ``numerator`` (Dp, Dp, Dp) complex: Σᵢ CTFᵢ F̂ᵢ inserted (both Hermitian halves);
    ``weight`` (Dp, Dp, Dp): Σᵢ CTFᵢ² inserted; ``size`` D and ``pixel_size`` of the
    map grid; ``noise_sigma``: white-noise σ per pixel of the resampled images (from
    background pixels); ``image_sums`` and ``ctf_at_zero`` (K,): each image's pixel sum
    and CTF(0) (for the intensity scale); ``kappa``: likelihood calibration
    (:func:`calibrate_fourier_likelihood`; 1 until calibrated); ``sum_sq``: Σ of the
    squared pixels of all resampled images (for the discrepancy principle).
    """

    numerator: torch.Tensor
    weight: torch.Tensor
    size: int
    pixel_size: float
    pad: float
    kernel: str
    noise_sigma: float
    image_sums: torch.Tensor
    ctf_at_zero: torch.Tensor
    plan: GridPlan
    sum_sq: float = 0.0
    kappa: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        """Number of images accumulated."""
        return int(self.image_sums.numel())


def _ctf0(ctf: torch.Tensor) -> torch.Tensor:
    """CTF at zero frequency of centred CTF images (n, H, W)."""
    return ctf[:, ctf.shape[-2] // 2, ctf.shape[-1] // 2].to(torch.float64)


@torch.no_grad()
def accumulate_particles(
    source: ParticleSource,
    target_box: int,
    target_pixel_size: float,
    *,
    indices: np.ndarray | None = None,
    pad: float = 2.0,
    kernel: Kernel = "linear",
    mask_radius: float | None = None,
    batch_size: int = 256,
    calibration_images: int = 32,
    show_progress: bool = False,
) -> FourierData:
    """One pass over particles ``indices`` (default all): resample to the prior's grid,
    re-centre for their shifts, insert into the Fourier grids, measure noise and DC terms.

    ``mask_radius`` (px of the target grid; default 0.45 · box) bounds the particle: the
    pixels outside it give the noise σ. The first ``calibration_images`` resampled
    images, poses and CTFs are kept in ``info`` for :func:`calibrate_fourier_likelihood`.
    """
    check_kernel(kernel)
    source.require_poses("prior-guided reconstruction")
    plan = grid_plan(source.box, source.pixel_size, target_box, target_pixel_size)
    size, px = plan.target_box, plan.target_pixel_size
    dp = padded_size(size, pad)
    radius = 0.45 * size if mask_radius is None else float(mask_radius)
    bg = background_mask((size, size), radius)
    n_bg = int(bg.sum())
    require(
        n_bg >= 16,
        f"only {n_bg} background pixels outside {radius:g} px in {size}² images: "
        "use a smaller mask radius",
    )
    dtype = torch.float64
    grids = (
        torch.zeros((dp,) * 3, dtype=complex_dtype(dtype)),
        torch.zeros((dp,) * 3, dtype=dtype),
    )
    idx_all = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    require(idx_all.size >= 1, "no particles selected")
    sums, ctf0s = [], []
    sum_sq = 0.0
    var_sum, var_count = 0.0, 0
    keep: dict[str, list[torch.Tensor]] = {"images": [], "rotations": [], "ctf": []}
    n_kept = 0
    n_batches = -(-idx_all.size // int(batch_size))
    batches = source.batches(int(batch_size), indices=idx_all, center=True, dtype=dtype)
    for batch in progress(batches, total=n_batches, desc="reading", enabled=show_progress):
        images = plan.apply(batch.images.to(dtype))
        pixels = images[:, bg]
        centred = pixels - pixels.mean(dim=-1, keepdim=True)
        var_sum += float((centred**2).sum())
        var_count += pixels.shape[0] * (n_bg - 1)
        sums.append(images.sum(dim=(-2, -1)))
        sum_sq += float((images**2).sum())
        ctf = None
        if batch.ctf is not None:
            ctf = compute_ctf(batch.ctf, (dp, dp), px, dtype)
            ctf0s.append(_ctf0(ctf))
        else:
            ctf0s.append(torch.ones(images.shape[0], dtype=dtype))
        rotations = batch.rotations.to(dtype)
        insert_images(images, rotations, ctf, dp, kernel, grids)
        if n_kept < calibration_images:
            take = min(calibration_images - n_kept, images.shape[0])
            keep["images"].append(images[:take])
            keep["rotations"].append(rotations[:take])
            if ctf is not None:
                keep["ctf"].append(ctf[:take])
            n_kept += take
    numerator, weight = complete_grids(grids)
    sigma = math.sqrt(var_sum / max(var_count, 1))
    require(sigma > 0, "the images' background is constant: cannot measure the noise level")
    info = {
        "calibration": {
            "images": torch.cat(keep["images"]),
            "rotations": torch.cat(keep["rotations"]),
            "ctf": torch.cat(keep["ctf"]) if keep["ctf"] else None,
        },
        "mask_radius_px": radius,
    }
    return FourierData(
        numerator=numerator,
        weight=weight,
        size=size,
        pixel_size=px,
        pad=float(pad),
        kernel=kernel,
        noise_sigma=sigma,
        image_sums=torch.cat(sums),
        ctf_at_zero=torch.cat(ctf0s),
        plan=plan,
        sum_sq=sum_sq,
        info=info,
    )


# ---------------------------------------------------------------------------------------
# the Fourier likelihood as a linear operator


class FourierLikelihoodOperator(LinearOperator):
    """x (*batch, D, D, D) -> √(κW) · X as real pairs (*batch, Dp, Dp, Dp, 2).

    X = FFT(pad(g · x)) is the map's padded, centred spectrum (g the gridding profile of
    the insertion kernel, so that the Wiener map is g⁻¹ · crop(IFFT(N/W))). With
    :meth:`measurement` ỹ = √κ · N/√W, ‖ỹ − B x‖² = κ Σ W |X − N/W|²: the images' squared
    residual at known poses, up to a constant, in the gridding approximation.
    """

    def __init__(self, data: FourierData) -> None:
        self.data = data
        self.size = data.size
        self.dp = data.numerator.shape[-1]
        self.domain_shape = (self.size,) * 3
        self.range_shape = (self.dp,) * 3 + (2,)
        self._sqrt_w = torch.sqrt(data.weight.clamp_min(0.0) * data.kappa)
        self._g = gridding_correction(
            self.size, self.dp, 3, data.kernel, torch.float64, data.weight.device
        )

    def measurement(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ỹ = √κ · N / √W (0 where W = 0), real pairs (Dp, Dp, Dp, 2)."""
        w = self.data.weight
        safe = torch.where(w > 0, w, torch.ones_like(w))
        y = torch.where(
            w > 0,
            self.data.numerator * math.sqrt(self.data.kappa) / torch.sqrt(safe),
            torch.zeros_like(self.data.numerator),
        )
        return torch.view_as_real(y).to(dtype)

    def range_normal_diagonal(self) -> torch.Tensor:
        """diag(B Bᵀ) on the real-pair measurement space, (Dp, Dp, Dp, 2): κW · Σ g²/2.

        Each spectral coefficient sees the whole (gridding-weighted) box, and a real map's
        real and imaginary parts share that energy equally (exact away from the
        self-conjugate frequencies) — the Jacobi preconditioner of Π-GDM's solve."""
        energy = float((self._g**2).sum()) / 2.0
        d = (self._sqrt_w**2) * energy
        return torch.stack([d, d], dim=-1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        g = self._g.to(device=x.device, dtype=x.dtype)
        spec = fft3_c(pad_centred(x * g, self.dp, 3))
        out = spec * self._sqrt_w.to(device=x.device, dtype=x.dtype)
        return torch.view_as_real(out.contiguous())

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        spec = torch.view_as_complex(y.contiguous()) * self._sqrt_w.to(y.device, y.dtype)
        back = ifft3_c(spec).real * float(self.dp**3)
        return crop_centred(back, self.size, 3) * self._g.to(device=y.device, dtype=y.dtype)


@torch.no_grad()
def calibrate_fourier_likelihood(data: FourierData, n_probe: int = 4, seed: int = 0) -> float:
    """Set ``data.kappa`` so that ‖B x‖² matches the exact ‖A x‖² (projection ∘ CTF at the
    kept calibration images' poses, the particle simulator's model), for smooth random
    probe maps x; the weights W of only those images are used here. Returns κ."""
    cal = data.info["calibration"]
    rot, ctf = cal["rotations"], cal["ctf"]
    size, dp = data.size, padded_size(data.size, data.pad)
    exact = ProjectionCTFOperator(rot, size, ctf, pad=data.pad)
    sub_grids = (
        torch.zeros((dp,) * 3, dtype=torch.complex128),
        torch.zeros((dp,) * 3, dtype=torch.float64),
    )
    insert_images(cal["images"], rot, ctf, dp, data.kernel, sub_grids)
    _, w_sub = complete_grids(sub_grids)
    probe_data = FourierData(
        numerator=torch.zeros_like(w_sub, dtype=torch.complex128),
        weight=w_sub,
        size=size,
        pixel_size=data.pixel_size,
        pad=data.pad,
        kernel=data.kernel,
        noise_sigma=data.noise_sigma,
        image_sums=data.image_sums,
        ctf_at_zero=data.ctf_at_zero,
        plan=data.plan,
    )
    approx = FourierLikelihoodOperator(probe_data)
    g = torch.Generator().manual_seed(int(seed))
    ratios = []
    for _ in range(int(n_probe)):
        x = torch.randn((size,) * 3, generator=g, dtype=torch.float64)
        x = fourier_smooth(x, 0.15)
        ratios.append(float((exact.forward(x) ** 2).sum() / (approx.forward(x) ** 2).sum()))
    data.kappa = float(np.mean(ratios))
    data.info["kappa_spread"] = float(np.std(ratios) / np.mean(ratios))
    return data.kappa


def fourier_smooth(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Gaussian low-pass of a (D, D, D) map: spectrum × exp(−|k|²/(2 (cutoff·D)²))."""
    d = x.shape[-1]
    k = torch.arange(d, dtype=x.dtype) - d // 2
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return ifft3_c(fft3_c(x) * torch.exp(-r2 / (2 * (cutoff * d) ** 2))).real


# ---------------------------------------------------------------------------------------
# the classical baseline: smoothness-regularised least squares


@dataclass(frozen=True)
class RegularizedMap:
    """A smoothness-regularised least-squares map (D, D, D), its weight μ and residual."""

    map: torch.Tensor
    mu: float
    residual_ratio: float
    converged: bool


@torch.no_grad()
def smoothness_regularized(data: FourierData, tau: float = 1.0, n_iter: int = 60) -> RegularizedMap:
    """argmin_x ‖y − A x‖² + μ ‖∇x‖² in the Fourier-slice (gridding) approximation, μ by
    the discrepancy principle ‖y − A x_μ‖ = τ σ √M (Morozov; M = number of pixels).

    On the padded grid the normal equations are diagonal: X = N / (W + μ' |k|²) (|k| in
    cycles per box, μ' = μ/κ), so each μ costs one division; the residual is
    ‖y‖² − 2κ Re⟨X, N⟩ + κ Σ W|X|² (κ from :func:`calibrate_fourier_likelihood`). μ is
    found by bisection in log μ (the residual grows with μ). ``converged`` is False when
    the target is out of reach (then the nearest end of the range is used).
    """
    dp, size = data.numerator.shape[-1], data.size
    k = (torch.arange(dp, dtype=torch.float64) - dp // 2) * size / dp
    lap = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    n_pixels = data.n_images * size * size
    target = (tau * data.noise_sigma) ** 2 * n_pixels
    mean_w = float(data.weight.mean())

    def solve(mu: float) -> tuple[torch.Tensor, float]:
        spec = data.numerator / (data.weight + mu * mean_w * lap + 1e-12 * mean_w)
        cross = float((torch.conj(spec) * data.numerator).real.sum())
        quad = float((data.weight * spec.abs() ** 2).sum())
        return spec, data.sum_sq - 2 * data.kappa * cross + data.kappa * quad

    lo, hi = -8.0, 4.0
    _, r_lo = solve(10**lo)
    _, r_hi = solve(10**hi)
    converged = r_lo <= target <= r_hi
    if converged:
        for _ in range(int(n_iter)):
            mid = 0.5 * (lo + hi)
            if solve(10**mid)[1] < target:
                lo = mid
            else:
                hi = mid
        log_mu = 0.5 * (lo + hi)
    else:
        log_mu = lo if target < r_lo else hi
    spec, resid = solve(10**log_mu)
    g = gridding_correction(size, dp, 3, data.kernel, torch.float64)
    volume = crop_centred(ifft3_c(spec).real, size, 3) / g
    return RegularizedMap(volume, 10**log_mu, math.sqrt(max(resid, 0.0) / target), converged)


# ---------------------------------------------------------------------------------------
# the intensity scale


@dataclass(frozen=True)
class IntensityScale:
    """c in "measurement = c · A(map in the prior's physical units)", and how it was set."""

    value: float
    source: str
    integral: float | None = None
    integral_stderr: float | None = None
    reference_integral: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def intensity_scale(
    data: FourierData, mass_kda: float | None = None, value: float | None = None
) -> IntensityScale:
    """c from the images' DC terms and the molecule's mass, or the ``value`` given.

    ∫V d³r of the imaged map comes from the images alone
    (:func:`~cryoprior.physics.operators.estimate_map_integral` on the pixel sums of all
    accumulated images); the prior's units give a protein of ``mass_kda`` kDa the
    integral :func:`~cryoprior.physics.composition.potential_integral_from_mass`.
    """
    if value is not None:
        return IntensityScale(require_positive(value, "intensity scale"), "given")
    if mass_kda is None:
        raise InputError(
            "the prior needs the measurement's intensity scale: give the molecule's mass "
            "(--mass-kda, or --sequence) so that it can be estimated from the images, or "
            "--intensity-scale"
        )
    sums = data.image_sums[:, None, None]
    est = estimate_map_integral(sums, data.ctf_at_zero, data.pixel_size)
    ref = potential_integral_from_mass(mass_kda)
    if not est.integral > 0:
        raise InputError(
            f"the images' DC terms give a non-positive map integral ({est.integral:.3g}); "
            "the images may be background-normalised or too few: give --intensity-scale"
        )
    return IntensityScale(
        est.integral / ref, "images' DC terms / mass", est.integral, est.stderr, ref
    )


# ---------------------------------------------------------------------------------------
# the reconstruction


@dataclass
class PriorReconstruction:
    """Posterior mean and spread maps (D, D, D) in measurement units per voxel at
    ``pixel_size``; ``samples`` (n, D, D, D); the DPS record and timings."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor
    pixel_size: float
    scale: IntensityScale
    dps: DPSResult
    seconds: dict[str, float]
    info: dict[str, Any]


def check_volume_prior(prior: Prior) -> None:
    """Raise InputError unless ``prior`` is a single-channel cubic density-map prior."""
    meta = prior.metadata
    if meta.representation != "volume":
        raise InputError(
            f"--prior must be a density-map (volume) prior, this one models {meta.representation}s"
        )
    spatial = meta.spatial_shape
    require(
        len(spatial) == 3 and len(set(spatial)) == 1 and meta.shape[0] == 1,
        f"the prior's maps must be single-channel cubes, got shape {meta.shape}",
    )
    require(meta.pixel_size is not None, "the prior file records no pixel size")


def reconstruct_with_prior(
    source: ParticleSource,
    prior: Prior,
    *,
    mass_kda: float | None = None,
    intensity: float | None = None,
    indices: np.ndarray | None = None,
    guidance: str = "pigdm",
    sampler: str = "ddim",
    n_steps: int = 50,
    n_samples: int = 1,
    eta: float = 0.5,
    zeta: float = 1.0,
    n_inner: int = 10,
    pad: float = 2.0,
    seed: int = 0,
    data: FourierData | None = None,
    show_progress: bool = False,
) -> PriorReconstruction:
    """Posterior samples of the map given particles at known poses and a volume prior.

    ``mass_kda`` (or ``intensity``, the scale c itself) sets the measurement's units;
    ``guidance``/``sampler``/``n_steps``/``eta``/``zeta``/``n_inner`` are those of
    :func:`~cryoprior.solvers.dps.dps_sample`. ``data`` reuses statistics from
    :func:`accumulate_particles` (e.g. the same particles with several priors).
    """
    check_volume_prior(prior)
    require(guidance in GUIDANCES, f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    t0 = time.perf_counter()
    box, px = prior.metadata.spatial_shape[0], float(prior.metadata.pixel_size)
    if data is None:
        data = accumulate_particles(
            source, box, px, indices=indices, pad=pad, show_progress=show_progress
        )
    if data.kappa == 1.0:
        calibrate_fourier_likelihood(data, seed=seed)
    scale = intensity_scale(data, mass_kda, intensity)
    t1 = time.perf_counter()
    op = FourierLikelihoodOperator(data)
    y = op.measurement(torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    result = dps_sample(
        prior,
        op,
        y,
        noise_sigma=data.noise_sigma,
        n_steps=n_steps,
        zeta=zeta,
        guidance=guidance,
        sampler=sampler,
        eta=eta,
        n_samples=n_samples,
        generator=gen,
        intensity_scale=scale.value,
        n_inner=n_inner,
        show_progress=show_progress,
    )
    t2 = time.perf_counter()
    samples = result.samples[:, 0] * scale.value
    return PriorReconstruction(
        mean=samples.mean(dim=0),
        std=samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0]),
        samples=samples,
        pixel_size=px,
        scale=scale,
        dps=result,
        seconds={"statistics": t1 - t0, "sampling": t2 - t1, "total": t2 - t0},
        info={
            "grid": data.plan.describe(),
            "n_images": data.n_images,
            "noise_sigma": data.noise_sigma,
            "kappa": data.kappa,
            "kappa_spread": data.info.get("kappa_spread"),
        },
    )


__all__ = [
    "FourierData",
    "FourierLikelihoodOperator",
    "GridPlan",
    "IntensityScale",
    "PriorReconstruction",
    "accumulate_particles",
    "calibrate_fourier_likelihood",
    "check_volume_prior",
    "grid_plan",
    "intensity_scale",
    "reconstruct_with_prior",
    "smoothness_regularized",
]
