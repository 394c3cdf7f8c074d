"""Two half maps -> the noise of their average, and the Gaussian likelihood it defines.

A refinement's half maps h₁ = x + n₁ and h₂ = x + n₂ hold the same map x with
independent noise of (nearly) the same spectrum. Their average a = (h₁ + h₂)/2 carries
the noise (n₁ + n₂)/2, whose power per Fourier shell equals that of the half difference
(h₁ − h₂)/2 = (n₁ − n₂)/2, which holds no signal: :func:`half_map_noise` measures it per
shell (with the half maps' FSC and the signal power from their cross-spectrum).

For noise that is Gaussian and stationary in real space (each Fourier coefficient
independent, variance S(k) set by its shell) the log-likelihood of x is, up to a
constant, −½ Σ_k |A(k) − X(k)|² / S(k) over the whole spectrum (orthonormal DFT):
:class:`HalfMapLikelihood` writes it as ‖ỹ − B x‖²/2 with B x the whitened half spectrum
of x, so that the diffusion posterior samplers of :mod:`cryoprior.solvers.dps` use it as
they use the particles' likelihood. Its normal operator is Fourier-diagonal, so the
preconditioner of the guidance solves is exact.

Units: maps in their own units per voxel; frequencies in shells of 1/(D · pixel size) Å⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryoprior.core.errors import InputError, require
from cryoprior.physics.operators import LinearOperator

_DIMS = (-3, -2, -1)


def rfft_shells(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer shell index round(|k|) (Fourier pixels) on the rfft grid (D, D, D//2 + 1)."""
    k = torch.fft.fftfreq(size, device=device, dtype=torch.float64) * size
    kh = k[: size // 2 + 1].abs()
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kh[None, None, :] ** 2)
    return torch.round(r).long()


def rfft_multiplicity(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """m (D//2 + 1,): how often each rfft column occurs in the whole spectrum (2 for
    0 < kₓ < D/2, whose Hermitian mirror is left out; 1 on the self-conjugate planes)."""
    kx = torch.arange(size // 2 + 1, device=device)
    return torch.where((kx >= 1) & (2 * kx != size), 2.0, 1.0).to(torch.float64)


def _shell_mean(values: torch.Tensor, shells: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (rfft layout) per shell over the whole spectrum (m-weighted)."""
    n = int(shells.max()) + 1
    w = m.expand_as(values)
    num = torch.zeros(n, dtype=torch.float64, device=values.device)
    den = torch.zeros_like(num)
    num.index_add_(0, shells.reshape(-1), (values * w).reshape(-1))
    den.index_add_(0, shells.reshape(-1), w.reshape(-1))
    return num / den.clamp_min(1e-30)


@dataclass
class HalfMapNoise:
    """Per-shell spectra of two half maps (orthonormal DFT, shells 0 … ⌈√3·D/2⌉).

    ``noise_power`` E|N(k)|² of the *average* map's noise; ``signal_power`` E|X(k)|²
    (the half maps' cross-spectrum, ≥ 0); ``fsc`` the half maps' FSC (whole box);
    ``frequency`` each shell's spatial frequency (1/Å)."""

    noise_power: torch.Tensor
    signal_power: torch.Tensor
    fsc: torch.Tensor
    frequency: torch.Tensor
    size: int
    pixel_size: float

    def resolution(self, threshold: float = 0.143) -> float:
        """Å where the half maps' FSC first falls below ``threshold`` (Nyquist if never)."""
        nyq = self.size // 2
        below = (self.fsc[1 : nyq + 1] < threshold).nonzero()
        shell = int(below[0]) + 1 if below.numel() else nyq
        return float(self.size * self.pixel_size / max(shell, 1))


def check_half_maps(h1: torch.Tensor, h2: torch.Tensor) -> None:
    """InputError unless the half maps are finite cubes of the same shape."""
    if h1.shape != h2.shape:
        raise InputError(
            f"the half maps differ in shape, {tuple(h1.shape)} and {tuple(h2.shape)}: "
            "give the two halves of one refinement"
        )
    if h1.ndim != 3 or len(set(h1.shape)) != 1:
        raise InputError(
            f"the half maps must be cubic 3-D maps, got {tuple(h1.shape)}: pad them to a "
            "cube first (e.g. relion_image_handler --new_box)"
        )
    for name, h in (("first", h1), ("second", h2)):
        if not bool(torch.isfinite(h).all()):
            raise InputError(f"the {name} half map has NaN or infinite voxels")
    if float((h1 - h2).abs().max()) == 0.0:
        raise InputError(
            "the two half maps are identical, so their noise cannot be measured: give the "
            "two independently refined halves (e.g. run_half1_class001_unfil.mrc and _half2_)"
        )


def half_map_noise(
    h1: torch.Tensor,
    h2: torch.Tensor,
    pixel_size: float,
    measured: torch.Tensor | None = None,
) -> HalfMapNoise:
    """The average's noise power, the signal power and the FSC per shell (see module).

    ``measured`` (rfft layout (D, D, D//2 + 1), values in [0, 1]; e.g. from
    :func:`measured_fourier_mask`) weights each Fourier voxel in the shell means, so that
    an unmeasured region (a missing cone, where both halves are ~0) does not pass for a
    noise-free one."""
    check_half_maps(h1, h2)
    size = int(h1.shape[-1])
    f1 = torch.fft.rfftn(h1.to(torch.float64), dim=_DIMS, norm="ortho")
    f2 = torch.fft.rfftn(h2.to(torch.float64), dim=_DIMS, norm="ortho")
    shells = rfft_shells(size, f1.device)
    m = rfft_multiplicity(size, f1.device)
    if measured is not None:
        require(
            tuple(measured.shape) == tuple(shells.shape),
            f"measured must have the rfft shape {tuple(shells.shape)}",
        )
        m = m * measured.to(device=f1.device, dtype=torch.float64)
    noise = _shell_mean(((f1 - f2).abs() / 2) ** 2, shells, m)
    cross = _shell_mean((f1 * f2.conj()).real, shells, m)
    p1, p2 = _shell_mean(f1.abs() ** 2, shells, m), _shell_mean(f2.abs() ** 2, shells, m)
    fsc = cross / torch.sqrt(p1 * p2).clamp_min(1e-30)
    freq = torch.arange(noise.numel(), dtype=torch.float64) / (size * pixel_size)
    return HalfMapNoise(noise, cross.clamp_min(0.0), fsc, freq, size, float(pixel_size))


class HalfMapLikelihood(LinearOperator):
    """x (*batch, D, D, D) -> the whitened half spectrum √m · X(k)/√S(k), real pairs.

    With :meth:`measurement` ỹ from the average map, ‖ỹ − B x‖² = Σ_k |A(k) − X(k)|²/S(k)
    over the whole spectrum: the noise σ of the likelihood is 1. ``measured`` (optional,
    rfft layout, values in [0, 1]) scales the weights, e.g. 0 in a missing cone."""

    def __init__(
        self,
        average: torch.Tensor,
        noise: HalfMapNoise,
        measured: torch.Tensor | None = None,
        floor: float = 1e-6,
    ) -> None:
        size = int(average.shape[-1])
        require(noise.size == size, f"noise spectrum of a {noise.size}³ map, map is {size}³")
        self.size = size
        self.domain_shape = (size,) * 3
        self.range_shape = (size, size, size // 2 + 1, 2)
        shells = rfft_shells(size)
        power = noise.noise_power.clamp_min(floor * float(noise.noise_power.max()))
        inv = 1.0 / power[shells]
        if measured is not None:
            require(
                tuple(measured.shape) == tuple(shells.shape),
                f"measured must have the rfft shape {tuple(shells.shape)}",
            )
            inv = inv * measured.to(torch.float64)
        self._lam = inv  # BᵀB = F⁻¹ diag(λ) F
        m = rfft_multiplicity(size)
        self._w = torch.sqrt(inv * m)  # forward weight √m/√S
        self._wa = self._w / m  # adjoint weight (irfftn counts the doubled columns twice)
        self._avg = average.to(torch.float64)
        self._cache: dict[tuple[object, ...], torch.Tensor] = {}

    def _cast(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def measurement(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ỹ = B a for the average map a."""
        with torch.no_grad():
            return self.apply(self._avg).to(dtype)

    def approx_normal_inverse(self, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
        """(a I + b BᵀB)⁻¹ v, exactly (BᵀB is Fourier-diagonal)."""
        spec = torch.fft.rfftn(v, dim=_DIMS) / (a + b * self._cast("_lam", v))
        return torch.fft.irfftn(spec, s=v.shape[-3:], dim=_DIMS)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfftn(x, dim=_DIMS, norm="ortho") * self._cast("_w", x)
        return torch.view_as_real(spec)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        spec = torch.view_as_complex(y.contiguous()) * self._cast("_wa", y)
        return torch.fft.irfftn(spec, s=self.domain_shape, dim=_DIMS, norm="ortho")


def measured_fourier_mask(
    rotations: torch.Tensor, size: int, thickness: float = 1.0, max_views: int = 4000
) -> torch.Tensor:
    """1 where a Fourier voxel of the rfft grid (D, D, D//2 + 1) of a [z, y, x] map lies
    within ``thickness``/2 voxels of some view's central plane, else 0.

    ``rotations`` (n, 3, 3) are the particles' poses (microscope = R · map coordinates,
    so the view direction in the map is d = Rᵀẑ, the plane k · d = 0); at most
    ``max_views`` of them, evenly spaced, are used. DC is always measured."""
    require(rotations.ndim == 3 and tuple(rotations.shape[1:]) == (3, 3), "need (n, 3, 3) poses")
    step = max(1, int(rotations.shape[0]) // int(max_views))
    d = rotations[::step, 2, :].to(torch.float64)  # (v, 3) as (x, y, z)
    k = torch.fft.fftfreq(size, dtype=torch.float64) * size
    kz, ky = k[:, None, None], k[None, :, None]
    kx = k[None, None, : size // 2 + 1].abs()
    measured = torch.zeros(size, size, size // 2 + 1, dtype=torch.bool)
    for view in d:
        dist = (kx * view[0] + ky * view[1] + kz * view[2]).abs()
        measured |= dist <= 0.5 * thickness
    return measured.to(torch.float64)


def shell_filter(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x (*batch, D, D, D) with its spectrum multiplied by ``weights`` per shell."""
    size = int(x.shape[-1])
    shells = rfft_shells(size, x.device).clamp_max(weights.numel() - 1)
    w = weights.to(device=x.device, dtype=x.dtype)[shells]
    spec = torch.fft.rfftn(x, dim=_DIMS) * w
    return torch.fft.irfftn(spec, s=x.shape[-3:], dim=_DIMS)


__all__ = [
    "HalfMapLikelihood",
    "HalfMapNoise",
    "check_half_maps",
    "half_map_noise",
    "measured_fourier_mask",
    "rfft_multiplicity",
    "rfft_shells",
    "shell_filter",
]
