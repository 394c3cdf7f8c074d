"""Fourier shell (3-D) and ring (2-D) correlation, resolution estimates, FSC plots.

FSC(k) = Re sum_{shell k} F1 F2* / sqrt(sum |F1|^2 sum |F2|^2) (Harauz & van Heel 1986;
Saxton & Baumeister 1982 for the FRC). Shell k holds the Fourier voxels whose radius in
index units rounds to k, i.e. shells of width 1/(D px) at frequency k/(D px) cycles/Å,
for k = 0 .. D//2 (Nyquist). The resolution at a threshold (0.143: Rosenthal & Henderson
2003; 0.5) is read where the curve FIRST falls below it, by linear interpolation in
frequency between the last shell at or above the threshold and the first one below.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.files import atomic_path
from cryoprior.geometry.fft import fftn_c
from cryoprior.geometry.grids import centered_indices, shell_indices


def resolution_from_curve(
    frequency: np.ndarray, fsc: np.ndarray, threshold: float
) -> tuple[float, bool]:
    """Resolution in Å where ``fsc`` first falls below ``threshold``, and a Nyquist flag.

    Shells are scanned from k = 1 (the DC shell is skipped). At the first shell k with
    fsc[k] < threshold the crossing frequency is interpolated linearly between shells k-1
    and k, and the resolution is its inverse. If the curve never falls below, the result
    is the last shell's (Nyquist) resolution and the flag is True. If the DC shell is
    already below the threshold the result is 1/frequency[1] (the box size).
    """
    f = np.asarray(frequency, dtype=np.float64)
    c = np.asarray(fsc, dtype=np.float64)
    require(
        f.ndim == 1 and f.shape == c.shape and f.size >= 2,
        "frequency and fsc must be 1-D arrays of the same length (>= 2 shells)",
    )
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return float(1.0 / f[-1]), True
    k = int(below[0]) + 1
    c0, c1 = c[k - 1], c[k]
    if c0 < threshold:
        return float(1.0 / f[k]), False
    t = (c0 - threshold) / (c0 - c1)
    crossing = f[k - 1] + t * (f[k] - f[k - 1])
    return float(1.0 / crossing), False


@dataclass(frozen=True)
class FSCResult:
    """An FSC (or FRC) curve and the resolutions read from it.

    frequency: cycles/Å per shell (k / (D px), k = 0 .. D//2); fsc: correlation per shell;
    n_voxels: Fourier voxels per shell; resolution_0143 / resolution_05 in Å where the
    curve first falls below 0.143 / 0.5 (linear interpolation between shells); the
    ``*_at_nyquist`` flags say the curve never fell below, so the value is the Nyquist
    limit 2 px (a lower bound on the true resolution's quality).
    """

    frequency: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    pixel_size: float
    box: int
    ndim: int
    resolution_0143: float
    resolution_05: float
    nyquist_0143: bool
    nyquist_05: bool

    @classmethod
    def from_curve(
        cls,
        frequency: np.ndarray,
        curve: np.ndarray,
        n_voxels: np.ndarray,
        pixel_size: float,
        box: int,
        ndim: int = 3,
    ) -> FSCResult:
        """The result for a curve per shell (k = 0 .. D//2 at ``frequency`` cycles/Å) of
        a ``box`` grid, its resolutions read at 0.143 and 0.5."""
        r0143, cap0143 = resolution_from_curve(frequency, curve, 0.143)
        r05, cap05 = resolution_from_curve(frequency, curve, 0.5)
        return cls(
            frequency=frequency,
            fsc=curve,
            n_voxels=n_voxels,
            pixel_size=pixel_size,
            box=box,
            ndim=ndim,
            resolution_0143=r0143,
            resolution_05=r05,
            nyquist_0143=cap0143,
            nyquist_05=cap05,
        )

    def resolution(self, threshold: float) -> tuple[float, bool]:
        """Resolution in Å at any threshold, and whether it is capped at Nyquist."""
        return resolution_from_curve(self.frequency, self.fsc, threshold)

    def describe(self) -> str:
        """One line stating both resolutions and how they were read."""
        kind = "FSC" if self.ndim == 3 else "FRC"

        def fmt(res: float, capped: bool) -> str:
            return f">= Nyquist ({res:.2f} Å)" if capped else f"{res:.2f} Å"

        return (
            f"{kind} resolution: {fmt(self.resolution_0143, self.nyquist_0143)} at 0.143, "
            f"{fmt(self.resolution_05, self.nyquist_05)} at 0.5 (first crossing below "
            f"the threshold, linear interpolation between shells; box {self.box} px, "
            f"{self.pixel_size:g} Å/px)"
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists for the curves)."""
        return {
            "kind": "FSC" if self.ndim == 3 else "FRC",
            "box": self.box,
            "pixel_size": self.pixel_size,
            "frequency_per_angstrom": [float(v) for v in self.frequency],
            "fsc": [float(v) for v in self.fsc],
            "n_voxels": [int(v) for v in self.n_voxels],
            "resolution_0143_angstrom": self.resolution_0143,
            "resolution_05_angstrom": self.resolution_05,
            "resolution_0143_at_nyquist": self.nyquist_0143,
            "resolution_05_at_nyquist": self.nyquist_05,
            "method": "first crossing below threshold, linear interpolation between shells",
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The curve and resolutions as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)


def spherical_mask(
    shape: tuple[int, ...],
    radius_px: float,
    soft_edge_px: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Spherical (3-D) or circular (2-D) mask centred on index N//2 of every axis.

    1 within ``radius_px`` (pixels from the centre), 0 beyond ``radius_px +
    soft_edge_px``, and a raised-cosine fall-off in between.
    """
    require(len(shape) >= 1, "mask shape must have at least one dimension")
    require(radius_px >= 0, f"mask radius must be >= 0 px, got {radius_px}")
    require(soft_edge_px >= 0, f"mask soft edge must be >= 0 px, got {soft_edge_px}")
    axes = [centered_indices(n, torch.float64, device) for n in shape]
    r = torch.sqrt(sum(a**2 for a in torch.meshgrid(*axes, indexing="ij")))
    if soft_edge_px > 0:
        t = ((r - radius_px) / soft_edge_px).clamp(0.0, 1.0)
        mask = 0.5 * (1.0 + torch.cos(math.pi * t))
    else:
        mask = (r <= radius_px).to(torch.float64)
    return mask.to(dtype)


def fsc(
    map1: torch.Tensor,
    map2: torch.Tensor,
    pixel_size: float,
    mask: torch.Tensor | None = None,
    fourier_mask: torch.Tensor | None = None,
) -> FSCResult:
    """Fourier shell correlation of two cubic maps (or ring correlation of square images).

    Rank-agnostic: 3-D maps [z, y, x] give an FSC, 2-D images [y, x] an FRC. ``mask``
    (same shape, soft values allowed) multiplies both inputs in real space first;
    ``fourier_mask`` (bool, the centred spectrum's shape) keeps only those Fourier voxels
    in every shell (e.g. a cone: :func:`cone_fsc`). Computed in float64.
    """
    pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
    a = torch.as_tensor(map1).to(torch.float64)
    b = torch.as_tensor(map2).to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise InputError(
            f"FSC needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.ndim not in (2, 3) or len(set(a.shape)) != 1:
        raise InputError(f"FSC needs a square image or a cubic map, got shape {tuple(a.shape)}")
    if mask is not None:
        m = torch.as_tensor(mask).to(device=a.device, dtype=torch.float64)
        if m.shape != a.shape:
            raise InputError(f"mask shape {tuple(m.shape)} differs from the maps' {tuple(a.shape)}")
        a, b = a * m, b * m
    n = a.shape[0]
    fa, fb = fftn_c(a, a.ndim), fftn_c(b, b.ndim)
    shells = shell_indices(tuple(a.shape), device=a.device).reshape(-1)
    n_shells = n // 2 + 1
    keep = shells < n_shells
    if fourier_mask is not None:
        fm = torch.as_tensor(fourier_mask, device=a.device)
        if tuple(fm.shape) != tuple(a.shape):
            raise InputError(
                f"fourier_mask shape {tuple(fm.shape)} differs from the maps' {tuple(a.shape)}"
            )
        keep = keep & fm.reshape(-1).bool()
    idx = shells[keep]

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_shells, dtype=torch.float64, device=a.device)
        return out.index_add_(0, idx, values.reshape(-1)[keep])

    num = shell_sum((fa * fb.conj()).real)
    den = torch.sqrt(shell_sum(fa.abs() ** 2) * shell_sum(fb.abs() ** 2))
    curve = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).cpu().numpy()
    counts = torch.bincount(idx, minlength=n_shells).cpu().numpy()
    frequency = np.arange(n_shells, dtype=np.float64) / (n * pixel_size)
    return FSCResult.from_curve(frequency, curve, counts, pixel_size, n, a.ndim)


def cone_mask(size: int, half_angle: float, axis: int = 0) -> torch.Tensor:
    """Fourier voxels (centred D³ grid) within ``half_angle`` (radians) of the ±``axis``
    direction (0 = z, the array's first axis), DC included."""
    c = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt(k[0] ** 2 + k[1] ** 2 + k[2] ** 2)
    return (k[axis].abs() >= r * math.cos(half_angle)) | (r == 0)


def cone_fsc(
    map1: torch.Tensor,
    map2: torch.Tensor,
    pixel_size: float,
    half_angle: float,
    axis: int = 0,
    mask: torch.Tensor | None = None,
) -> FSCResult:
    """Directional FSC: :func:`fsc` over the Fourier voxels within ``half_angle``
    (radians) of the ±``axis`` direction only (e.g. the missing cone of a preferred
    orientation)."""
    return fsc(map1, map2, pixel_size, mask, cone_mask(int(map1.shape[-1]), half_angle, axis))


def plot_fsc(
    results: Mapping[str, FSCResult], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write a PNG of one or more FSC curves with the 0.143 and 0.5 thresholds marked.

    The x axis is spatial frequency (1/Å), labelled with the resolution in Å on top; the
    legend gives each curve's 0.143 resolution. The file is written atomically. Uses the
    Agg canvas directly, so no global matplotlib backend is changed.
    """
    require(len(results) > 0, "plot_fsc needs at least one FSC curve")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fmax = 0.0
    for label, res in results.items():
        tag = (
            f">= {res.resolution_0143:.2f} Å (Nyquist)"
            if res.nyquist_0143
            else f"{res.resolution_0143:.2f} Å"
        )
        ax.plot(res.frequency[1:], res.fsc[1:], lw=1.5, label=f"{label}: {tag} at 0.143")
        fmax = max(fmax, float(res.frequency[-1]))
    for thr, style in ((0.143, "--"), (0.5, ":")):
        ax.axhline(thr, color="0.4", ls=style, lw=1.0)
        ax.text(fmax, thr, f" {thr:g}", va="center", ha="left", fontsize=8, color="0.3")
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.set_xlim(0.0, fmax)
    ax.set_ylim(-0.1, 1.05)
    kind = "FSC" if next(iter(results.values())).ndim == 3 else "FRC"
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel(kind)
    ticks = [t for t in ax.get_xticks() if 0 < t <= fmax]
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1.0 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
