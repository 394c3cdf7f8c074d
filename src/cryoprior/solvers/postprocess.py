"""Classical post-processing of two half maps: the baselines of ``cryoprior denoise``.

- :func:`fsc_lowpass`: the half maps' average low-passed where their FSC falls below
  0.143 (a cosine edge of ``edge`` shells).
- :func:`fsc_weighted_sharpened`: RELION-postprocess style. Each shell of the average
  is weighted by √(2·FSC/(1 + FSC)) (Rosenthal & Henderson 2003, "Optimal determination
  of particle orientation, absolute hand, and contrast loss in single-particle electron
  cryomicroscopy", JMB 333: the FSC of the full map against the truth), then sharpened
  by exp(B·s²/4) with B from a Guinier fit of ln|F(s)| against s² between 10 Å and the
  FSC 0.143 resolution, then low-passed there.

The spectra come from :func:`cryoprior.solvers.halfmap.half_map_noise`; the Guinier fit
uses the half maps' cross-spectrum (the signal's power, free of the noise bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoprior.solvers.halfmap import HalfMapNoise, shell_filter


def _resolution_shell(noise: HalfMapNoise, threshold: float) -> int:
    nyq = noise.size // 2
    below = (noise.fsc[1 : nyq + 1] < threshold).nonzero()
    return int(below[0]) + 1 if below.numel() else nyq


def _lowpass_weights(n_shells: int, cutoff: int, edge: int) -> torch.Tensor:
    """Per-shell weights: 1 up to shell ``cutoff`` − ``edge``, a cosine fall to 0 at
    ``cutoff``, 0 beyond (``n_shells`` values)."""
    s = torch.arange(n_shells, dtype=torch.float64)
    w = 0.5 * (1 + torch.cos(math.pi * ((s - (cutoff - edge)) / max(edge, 1)).clamp(0, 1)))
    return torch.where(s <= cutoff - edge, torch.ones_like(s), w)


def fsc_lowpass(
    average: torch.Tensor, noise: HalfMapNoise, threshold: float = 0.143, edge: int = 2
) -> torch.Tensor:
    """The average (D, D, D) low-passed at the half maps' FSC ``threshold`` crossing."""
    cut = _resolution_shell(noise, threshold)
    return shell_filter(average, _lowpass_weights(noise.fsc.numel(), cut, edge))


@dataclass(frozen=True)
class Sharpened:
    """The FSC-weighted, sharpened map; ``bfactor`` the fitted decay B (Å², > 0 = the
    map falls off; the map is sharpened by −B, RELION's sign), ``resolution`` (Å)."""

    map: torch.Tensor
    bfactor: float
    resolution: float


def guinier_bfactor(noise: HalfMapNoise, low: float = 10.0, high: float | None = None) -> float:
    """B (Å²) with |F(s)| ∝ exp(−B s²/4) fitted between ``low`` and ``high`` Å (default
    the FSC 0.143 resolution) on the signal's amplitude; a nearly flat or too short
    range gives 0."""
    high = high if high is not None else noise.resolution(0.143)
    s = noise.frequency
    sel = (s >= 1.0 / low) & (s <= 1.0 / high) & (noise.signal_power > 0)
    if int(sel.sum()) < 3:
        return 0.0
    x = s[sel] ** 2
    y = 0.5 * torch.log(noise.signal_power[sel])
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum().clamp_min(1e-30))
    return -4.0 * slope


def fsc_weighted_sharpened(average: torch.Tensor, noise: HalfMapNoise, edge: int = 2) -> Sharpened:
    """RELION-postprocess-style map of the half maps' ``average`` (see the module)."""
    fsc = noise.fsc.clamp(0.0, 1.0)
    weight = torch.sqrt(2 * fsc / (1 + fsc))
    bfac = guinier_bfactor(noise)
    cut = _resolution_shell(noise, 0.143)
    s = noise.frequency
    sharpen = torch.exp(max(bfac, 0.0) * s**2 / 4.0)  # undo the fitted decay only
    w = weight * sharpen * _lowpass_weights(fsc.numel(), cut, edge)
    return Sharpened(shell_filter(average, w), bfac, noise.resolution(0.143))


__all__ = ["Sharpened", "fsc_lowpass", "fsc_weighted_sharpened", "guinier_bfactor"]
