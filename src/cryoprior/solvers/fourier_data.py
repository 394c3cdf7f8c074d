"""The particles' sufficient statistics at known poses, and the likelihood they define.

One streamed pass (:func:`accumulate_particles`) brings the particles to a prior's grid
(:mod:`cryoprior.solvers.grid_plan`), re-centres them for their shifts and inserts
CTF·F̂ and CTF² into padded 3-D Fourier grids (exactly as the Wiener baseline does), and
measures the noise σ (background pixels outside a radius) and each image's pixel sum and
CTF(0). For white Gaussian noise the log-likelihood of the images at known poses is, up
to a constant and within the gridding approximation of the Fourier-slice interpolation,
−κ Σ_k W(k) |X(k) − N(k)/W(k)|² / (2σ²), with X the padded 3-D spectrum of the map, N the
inserted CTF·F̂ and W the inserted CTF² (:class:`FourierLikelihoodOperator`). κ (DFT
normalisation and zero-padding) is calibrated against the exact projection ∘ CTF operator
(:func:`calibrate_fourier_likelihood`). One evaluation costs two FFTs of the padded grid,
whatever the number of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import require
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import complex_dtype
from cryoprior.geometry.fft import fft3_c, ifft3_c
from cryoprior.physics.ctf import compute_ctf
from cryoprior.physics.fourier_slice import Kernel, check_kernel, gridding_correction
from cryoprior.physics.measurement import background_mask
from cryoprior.physics.operators import LinearOperator, ProjectionCTFOperator
from cryoprior.physics.projection import padded_size
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import complete_grids, insert_images
from cryoprior.solvers.grid_plan import GridPlan, grid_plan

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
    plan: GridPlan | None = None,
) -> FourierData:
    """One pass over particles ``indices`` (default all): resample to the prior's grid,
    re-centre for their shifts, insert into the Fourier grids, measure noise and DC terms.

    ``mask_radius`` (px of the target grid; default 0.45 · box) bounds the particle: the
    pixels outside it give the noise σ. ``plan`` (e.g. from
    :func:`~cryoprior.solvers.grid_plan.native_plan`) replaces the fixed-box
    :func:`~cryoprior.solvers.grid_plan.grid_plan` to ``target_box`` /
    ``target_pixel_size``. The first ``calibration_images`` resampled images, poses and
    CTFs are kept in ``info`` for :func:`calibrate_fourier_likelihood`.
    """
    check_kernel(kernel)
    source.require_poses("prior-guided reconstruction")
    if plan is None:
        plan = grid_plan(source.box, source.pixel_size, target_box, target_pixel_size)
    require(
        (plan.box, plan.pixel_size) == (source.box, source.pixel_size),
        f"the grid plan is for {plan.box} px at {plan.pixel_size:g} Å/px, the particles are "
        f"{source.box} px at {source.pixel_size:g} Å/px",
    )
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
    """x (*batch, D, D, D) -> √(κW) · X as real pairs (*batch, Dp, Dp, Dp//2 + 1, 2).

    X = FFT(pad(g · x)) is the map's zero-padded spectrum (g the gridding profile of the
    insertion kernel, so that the Wiener map is g⁻¹ · crop(IFFT(N/W))). With
    :meth:`measurement` ỹ = √κ · N/√W, ‖ỹ − B x‖² = κ Σ W |X − N/W|²: the images' squared
    residual at known poses, up to a constant, in the gridding approximation.

    The measurement space holds the non-redundant half of the Hermitian spectrum in the
    FFT's own (uncentred) order: a real-to-complex FFT of the padded map with no shifts,
    the map's origin (voxel D//2) carried by a phase, and the columns 0 < kₓ < Dp/2 weighted
    by √2 so that the squared norm over the half equals the one over the whole spectrum.
    One forward and one adjoint cost one real FFT each of the padded grid.
    """

    def __init__(self, data: FourierData) -> None:
        self.data = data
        self.size = data.size
        self.dp = data.numerator.shape[-1]
        dp, half = self.dp, self.dp // 2 + 1
        self.domain_shape = (self.size,) * 3
        self.range_shape = (dp, dp, half, 2)
        kx = torch.arange(half)
        interior = (kx >= 1) & (2 * kx != dp)
        self._m2 = torch.where(interior, 2.0, 1.0).to(torch.float64)  # column weights m²
        w_half = self._to_half(data.weight.clamp_min(0.0) * data.kappa)
        self._w_half = w_half
        self._g = gridding_correction(
            self.size, dp, 3, data.kernel, torch.float64, data.weight.device
        )
        # phase of the map's origin (voxel D//2 of a map zero-padded at the end)
        c = self.size // 2
        full = torch.exp(2j * math.pi * c * torch.arange(dp, dtype=torch.float64) / dp)
        phase = full[:, None, None] * full[None, :, None] * full[None, None, :half]
        q = torch.sqrt(w_half) * torch.sqrt(self._m2) * phase
        self._q = q  # forward factor  m · √(κW) · phase
        # adjoint factor: conj(q) · h · Dp³, h = ½ on the doubled columns (irfftn counts them
        # twice), 1 on the self-conjugate planes
        self._qa = torch.conj(q) * (float(dp) ** 3 / self._m2)
        self._nw = w_half * float(dp) ** 3  # q · qa: BᵀB's spectral weight (phases cancel)
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def _to_half(self, full_centred: torch.Tensor) -> torch.Tensor:
        """A centred full (Dp, Dp, Dp) grid in the measurement layout (uncentred half)."""
        return torch.fft.ifftshift(full_centred, dim=(-3, -2, -1))[..., : self.dp // 2 + 1]

    def _cast(self, name: str, like: torch.Tensor, complex_: bool) -> torch.Tensor:
        dtype = complex_dtype(like.dtype) if complex_ else like.dtype
        key = (name, dtype, like.device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=like.device, dtype=dtype)
        return self._cache[key]

    def measurement(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ỹ = √κ · N / √W (0 where W = 0) in the measurement layout, real pairs."""
        w = self.data.weight
        safe = torch.where(w > 0, w, torch.ones_like(w))
        y = torch.where(
            w > 0,
            self.data.numerator * math.sqrt(self.data.kappa) / torch.sqrt(safe),
            torch.zeros_like(self.data.numerator),
        )
        y_half = self._to_half(y) * torch.sqrt(self._m2)
        return torch.view_as_real(y_half.contiguous()).to(dtype)

    def range_normal_diagonal(self) -> torch.Tensor:
        """diag(B Bᵀ) on the real-pair measurement space: m² κW · Σ g²/2.

        Each spectral coefficient sees the whole (gridding-weighted) box, and a real map's
        real and imaginary parts share that energy equally (exact away from the
        self-conjugate frequencies) — the Jacobi preconditioner of Π-GDM's solve."""
        energy = float((self._g**2).sum()) / 2.0
        d = self._w_half * self._m2 * energy
        return torch.stack([d, d], dim=-1)

    def _normal_spectrum(self) -> torch.Tensor:
        """λ(k) on the map's own rfft grid (D, D, D//2 + 1): BᵀB ≈ F⁻¹ diag(λ) F.

        A plane wave of the D-box has its padded spectrum concentrated within ±Dp/D bins of
        frequency k·Dp/D, so λ(k) ≈ Dp³ · mean(g²) · κW averaged over those bins."""
        if "_lam" not in self.__dict__:
            dp, d = self.dp, self.size
            w = torch.fft.ifftshift(self.data.weight.clamp_min(0.0) * self.data.kappa)
            r = max(1, int(math.ceil(dp / d)))
            tri = torch.cat([torch.arange(1, r + 1), torch.arange(r - 1, 0, -1)]).double()
            tri = tri / tri.sum()
            for axis in range(3):
                spec = torch.fft.fft(w, dim=axis)
                kern = torch.zeros(dp, dtype=torch.float64)
                kern[: tri.numel()] = tri
                kern = torch.roll(kern, -(r - 1))
                shape = [1, 1, 1]
                shape[axis] = dp
                w = torch.fft.ifft(spec * torch.fft.fft(kern).reshape(shape), dim=axis).real
            k = torch.fft.fftfreq(d, dtype=torch.float64) * d
            idx = torch.round(k * dp / d).long() % dp
            idx_h = idx[: d // 2 + 1]
            sampled = w[idx][:, idx][:, :, idx_h]
            self._lam = sampled.clamp_min(0.0) * float(dp) ** 3 * float((self._g**2).mean())
        return self._lam

    def approx_normal_inverse(self, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
        """≈ (a I + b BᵀB)⁻¹ v for maps v (*batch, D, D, D): a Fourier-diagonal
        preconditioner on the map's grid (:meth:`_normal_spectrum`)."""
        if "_lam" not in self.__dict__:
            self._normal_spectrum()
        lam = self._cast("_lam", v, False)
        dims = (-3, -2, -1)
        spec = torch.fft.rfftn(v, dim=dims) / (a + b * lam)
        return torch.fft.irfftn(spec, s=v.shape[-3:], dim=dims)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        g = self._cast("_g", x, False)
        spec = torch.fft.rfftn(x * g, s=(self.dp,) * 3, dim=(-3, -2, -1))
        return torch.view_as_real(spec * self._cast("_q", x, True))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """BᵀB x = g · crop(IFFT(κW Dp³ · FFT(pad(g · x)))): the forward and the adjoint
        fused, with no measurement-layout round trip (one real multiply of the spectrum)."""
        g = self._cast("_g", x, False)
        spec = torch.fft.rfftn(x * g, s=(self.dp,) * 3, dim=(-3, -2, -1))
        return cropped_irfftn(spec * self._cast("_nw", x, False), self.dp, self.size) * g

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        spec = torch.view_as_complex(y.contiguous()) * self._cast("_qa", y, True)
        return cropped_irfftn(spec, self.dp, self.size) * self._cast("_g", y, False)


def cropped_irfftn(spec: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """``irfftn(spec, s=(n, n, n))[..., :d, :d, :d]`` for a half spectrum
    (*batch, n, n, n//2 + 1): one axis at a time, each cropped to ``d`` as soon as it is
    transformed, so the later axes see less data (at n = 2d about 3× faster than the
    full inverse on CPU; the same values to float rounding)."""
    h = torch.fft.ifft(spec, dim=-3)[..., :d, :, :].contiguous()
    h = torch.fft.ifft(h, dim=-2)[..., :d, :].contiguous()
    return torch.fft.irfft(h, n=n, dim=-1)[..., :d]


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
