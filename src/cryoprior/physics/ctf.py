"""Contrast transfer function in RELION's convention.

RELION (src/ctf.h ``CTF::getCTF``, src/ctf.cpp ``CTF::initialise``, versions 3.1-5.0)
computes, for a spatial frequency (X, Y) in cycles/Å with u^2 = X^2 + Y^2,

    deltaf   = -[(DefocusU + DefocusV)/2 + (DefocusU - DefocusV)/2 cos(2(atan2(Y, X) - az))]
    argument = K1 deltaf u^2 + K2 u^4 - K5 - K3
    CTF      = -sin(argument) * exp(K4 u^2)

with K1 = pi lambda, K2 = (pi/2) Cs lambda^3 (Cs in Å = mm * 1e7), K3 = atan(Q0/sqrt(1-Q0^2))
(Q0 = amplitude contrast), K4 = -B/4 and K5 = phase shift. Writing
Δf(θ) = ½[(U+V) + (U−V) cos 2(θ − az)] (underfocus positive) this is

    gamma = pi lambda Δf u^2 - (pi/2) Cs lambda^3 u^4 + phase_shift + K3
    CTF   = sin(gamma) exp(-B u^2 / 4)
          = [sqrt(1 - Q0^2) sin(chi) + Q0 cos(chi)] exp(-B u^2 / 4),  chi = gamma - K3,

which is what :func:`evaluate_ctf` computes. Signs: CTF(u -> 0) = +Q0 and, under focus,
the first lobe is positive. This is the convention of RELION-extracted particles, whose
contrast is inverted so that particles (positive potential) look white; cryoDRGN's CTF is
the negative of this one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.tensors import expand_like
from cryoprior.geometry.fft import fft2_c, ifft2_c
from cryoprior.geometry.grids import frequency_grid

_FIELDS = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "cs",
    "amplitude_contrast",
    "phase_shift",
    "bfactor",
)


def electron_wavelength(voltage_kv: float | torch.Tensor) -> float | torch.Tensor:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV.

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)), V in volts (RELION ctf.cpp,
    ``CTF::initialise``). 300 kV -> 0.019687 Å.
    """
    if isinstance(voltage_kv, torch.Tensor):
        v = voltage_kv * 1e3
        return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))
    v = float(voltage_kv) * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, every field a float64 tensor of shape (N,).

    defocus_u, defocus_v: Å, underfocus positive; defocus_angle: radians, the azimuth of
    the U axis from the x axis (RELION rlnDefocusAngle, converted to radians); voltage: kV;
    cs: mm; amplitude_contrast: fraction in [0, 1]; phase_shift: radians (phase plate);
    bfactor: Å² of the envelope exp(-B s^2/4). Scalars and (N,) values broadcast to a
    common length N on construction.
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    voltage: torch.Tensor
    cs: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift: torch.Tensor | float = 0.0
    bfactor: torch.Tensor | float = 0.0

    def __post_init__(self) -> None:
        values = {}
        for name in _FIELDS:
            v = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            if v.ndim > 1:
                raise InputError(f"CTF {name} must be a scalar or shape (N,), got {tuple(v.shape)}")
            values[name] = v.reshape(-1)
        try:
            shape = torch.broadcast_shapes(*(v.shape for v in values.values()))
        except RuntimeError:
            lengths = {k: v.shape[0] for k, v in values.items()}
            raise InputError(f"CTF parameters have different lengths: {lengths}") from None
        for name, v in values.items():
            if not bool(torch.isfinite(v).all()):
                raise InputError(f"CTF {name} has non-finite values")
            object.__setattr__(self, name, v.expand(shape).contiguous())
        require(bool((self.voltage > 0).all()), "CTF voltage must be > 0 kV")
        require(bool((self.cs >= 0).all()), "CTF spherical aberration Cs must be >= 0 mm")
        q0 = self.amplitude_contrast
        require(
            bool(((q0 >= 0) & (q0 <= 1)).all()),
            "CTF amplitude contrast must be a fraction in [0, 1] (e.g. 0.1)",
        )

    def __len__(self) -> int:
        return int(self.defocus_u.shape[0])

    @classmethod
    def from_particles(cls, particles: Mapping[str, Any] | Any, degrees: bool = False) -> CTFParams:
        """Build from per-particle arrays named like the fields (a mapping or attributes).

        ``particles`` holds numpy arrays (or anything array-like) under the names defocus_u,
        defocus_v, defocus_angle, voltage, cs, amplitude_contrast and optionally
        phase_shift and bfactor (default 0). Angles are in radians unless ``degrees`` is
        True (RELION STAR files store rlnDefocusAngle and rlnPhaseShift in degrees).
        """

        def get(name: str) -> Any:
            if isinstance(particles, Mapping):
                return particles.get(name)
            return getattr(particles, name, None)

        values: dict[str, Any] = {}
        for name in _FIELDS:
            v = get(name)
            if v is None:
                if name in ("phase_shift", "bfactor"):
                    continue
                raise InputError(f"particles have no '{name}' values, needed for the CTF")
            v = torch.as_tensor(np.array(v, dtype=np.float64))  # a copy: inputs may be read-only
            if degrees and name in ("defocus_angle", "phase_shift"):
                v = torch.deg2rad(v)
            values[name] = v
        return cls(**values)

    def index(self, idx: int | slice | np.ndarray | torch.Tensor) -> CTFParams:
        """The parameters of a subset of particles (an int keeps a length-1 batch)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return CTFParams(**{name: getattr(self, name)[idx] for name in _FIELDS})

    def to(self, device: torch.device | str) -> CTFParams:
        """A copy on ``device``."""
        return CTFParams(**{name: getattr(self, name).to(device) for name in _FIELDS})


def evaluate_ctf(
    params: CTFParams, freqs: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """CTF of every particle at frequencies ``freqs`` (..., 2) = (fx, fy) in cycles/Å.

    Returns (N, ...) real values, RELION's convention (see the module docstring):
    CTF = sin(pi lambda Δf(θ) s^2 - (pi/2) Cs lambda^3 s^4 + phase_shift
    + atan(Q0/sqrt(1-Q0^2))) exp(-B s^2/4), θ = atan2(fy, fx).
    """
    if freqs.shape[-1] != 2:
        raise InputError(f"frequencies must have last dim (fx, fy), got {tuple(freqs.shape)}")
    device = freqs.device
    f = freqs.to(dtype).unsqueeze(0)  # (1, ..., 2)
    fx, fy = f[..., 0], f[..., 1]
    s2 = fx * fx + fy * fy
    theta = torch.atan2(fy, fx)

    def p(v: torch.Tensor) -> torch.Tensor:
        return expand_like(v.to(device=device, dtype=dtype), s2)

    lam = electron_wavelength(params.voltage)
    cs_angstrom = params.cs * 1e7
    q0 = params.amplitude_contrast
    k3 = torch.atan2(q0, torch.sqrt(1.0 - q0 * q0))  # RELION ctf.cpp: K3 = atan(Q0/sqrt(1-Q0^2))
    d_avg = p((params.defocus_u + params.defocus_v) / 2)
    d_dev = p((params.defocus_u - params.defocus_v) / 2)
    defocus = d_avg + d_dev * torch.cos(2.0 * (theta - p(params.defocus_angle)))
    gamma = (
        math.pi * p(lam) * defocus * s2
        - (math.pi / 2) * p(cs_angstrom * lam**3) * s2 * s2
        + p(params.phase_shift + k3)
    )
    return torch.sin(gamma) * torch.exp(-p(params.bfactor) / 4.0 * s2)


def compute_ctf(
    params: CTFParams,
    shape: tuple[int, int],
    pixel_size: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """CTF images (N, H, W) on the centred 2-D frequency grid of ``shape`` = (H, W).

    The DC term sits at index (H//2, W//2); frequencies come from
    :func:`cryoprior.geometry.grids.frequency_grid` with ``pixel_size`` in Å/px.
    """
    require(len(shape) == 2, f"CTF shape must be (H, W), got {shape}")
    pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
    freqs = frequency_grid(tuple(shape), pixel_size, dtype, device)
    return evaluate_ctf(params, freqs, dtype)


def _check_pair(images: torch.Tensor, ctf: torch.Tensor) -> None:
    if images.ndim < 2 or ctf.shape[-2:] != images.shape[-2:]:
        raise InputError(
            f"CTF of shape {tuple(ctf.shape)} does not match images of shape "
            f"{tuple(images.shape)}: both need the same last two dims (H, W)"
        )


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Real images (..., H, W) convolved with the CTF: real(iFT(FT(images) * ctf)).

    ``ctf`` (..., H, W) is on the centred grid (from :func:`compute_ctf`) and broadcasts
    against ``images``. The CTF is even in frequency, so the product stays Hermitian and
    the imaginary part dropped here is round-off only -- except, for even sizes, on the
    unpaired Nyquist row and column, where taking the real part applies the mean of the
    CTF at (fx, -f_N) and (-fx, -f_N) (they differ when the CTF is astigmatic).
    """
    _check_pair(images, ctf)
    spectrum = fft2_c(images) * ctf.to(images.dtype)
    return ifft2_c(spectrum).real


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Phase-flipped images: the image spectrum times sign(CTF) (zeros count as +1)."""
    _check_pair(images, ctf)
    sign = torch.where(ctf < 0, -1.0, 1.0).to(images.dtype)
    return ifft2_c(fft2_c(images) * sign).real


def ctf_zero_frequencies(
    defocus: float,
    voltage: float,
    n: int,
    cs: float = 0.0,
    amplitude_contrast: float = 0.0,
    phase_shift: float = 0.0,
) -> np.ndarray:
    """Spatial frequencies (cycles/Å) of the first ``n`` CTF zeros, non-astigmatic case.

    Zeros are where gamma = k pi (k = 1, 2, ...), with gamma as in :func:`evaluate_ctf`:
    pi lambda Δf s^2 - (pi/2) Cs lambda^3 s^4 + phase_shift + K3 = k pi, a quadratic in s^2
    whose smaller positive root is taken (zeros before the Cs turning point). For Cs = 0,
    no amplitude contrast and no phase shift: s_k^2 = k / (lambda Δf). Returns fewer than
    ``n`` values when Cs bends gamma back first. Units: defocus Å, voltage kV, Cs mm.
    """
    require(defocus > 0, f"defocus must be > 0 Å (underfocus) for CTF zeros, got {defocus}")
    lam = float(electron_wavelength(voltage))
    k3 = math.atan2(amplitude_contrast, math.sqrt(1 - amplitude_contrast**2))
    c0 = phase_shift + k3
    a1 = math.pi * lam * defocus
    a2 = (math.pi / 2) * cs * 1e7 * lam**3
    out = []
    k = max(1, math.floor(c0 / math.pi) + 1)
    while len(out) < n:
        rhs = k * math.pi - c0  # a1 x - a2 x^2 = rhs, x = s^2
        if a2 == 0:
            x = rhs / a1
        else:
            disc = a1 * a1 - 4 * a2 * rhs
            if disc < 0:
                break
            x = (a1 - math.sqrt(disc)) / (2 * a2)
        out.append(math.sqrt(x))
        k += 1
    return np.asarray(out, dtype=np.float64)
