"""Calibration of a posterior spread map: does the spread mean what it says?

Given the truth x, the mean m of K posterior samples and their per-voxel standard
deviation s, :func:`spread_calibration` reports the fraction of voxels inside a mask with
|x − m| ≤ k·s (k = 2 by default), and the same per resolution shell for the real and
imaginary parts of the (masked) Fourier coefficients, with the per-coefficient spread of
the samples' coefficients.

What a calibrated posterior gives: if x and the K samples are independent draws from
the same Gaussian, (x − m)/(s·√(1 + 1/K)) follows Student's t with K − 1 degrees of
freedom, so the expected fraction is P(|T_{K−1}| ≤ k/√(1 + 1/K)) (:func:`expected_coverage`;
0.83 for K = 4, 0.94 for K = 32, 0.954 as K → ∞). Below it the spread is too narrow
(over-confident); above it, too wide.

Antithetic pairs (:func:`~cryoprior.solvers.dps.dps_sample` with ``antithetic=True``):
the K samples are K/2 independent pairs whose deviations from the mean are opposite.
For a Gaussian posterior the pairs' mean is then the posterior mean itself, x − m is
N(0, σ²) and the sample variance (divisor K − 1) is 2σ²·χ²_{K/2}/(K − 1), so
(x − m)/s · √((K − 1)/K) follows Student's t with K/2 degrees of freedom: the expected
fraction is P(|T_{K/2}| ≤ k·√(K/(K − 1))) (0.85 for K = 4).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from cryoprior.core.errors import InputError, require
from cryoprior.geometry.fft import fft3_c
from cryoprior.geometry.grids import shell_indices


def expected_coverage(n_samples: int, k: float = 2.0, antithetic: bool = False) -> float:
    """P(|x − m| ≤ k·s) for a calibrated Gaussian posterior sampled ``n_samples`` times
    (independently, or in ``antithetic`` pairs: module doc)."""
    n = int(n_samples)
    require(n >= 2, f"a spread needs at least 2 samples, got {n}")
    if antithetic:
        require(n % 2 == 0, f"antithetic samples come in pairs, got {n}")
        return float(2 * stats.t.cdf(k * math.sqrt(n / (n - 1)), df=n // 2) - 1)
    return float(2 * stats.t.cdf(k / math.sqrt(1 + 1 / n), df=n - 1) - 1)


def spread_calibration(
    truth: torch.Tensor,
    samples: torch.Tensor,
    mask: torch.Tensor,
    pixel_size: float,
    k: float = 2.0,
    antithetic: bool = False,
) -> dict:
    """Coverage of |truth − mean| ≤ k·std inside ``mask`` (voxels) and per Fourier shell.

    ``truth`` (D, D, D) in the samples' units; ``samples`` (K, D, D, D), K ≥ 2; ``mask``
    (D, D, D) soft or binary: voxels with mask > 0.5 are counted, and the shells are
    computed on the maps multiplied by the mask. Returns ``{"voxels": fraction,
    "expected": calibrated value, "shells": {"frequency": 1/Å, "coverage": fractions},
    "n_samples": K, "k": k}``; ``antithetic``: the samples are antithetic pairs (only the
    expected value changes).
    """
    x = torch.as_tensor(truth).double()
    s = torch.as_tensor(samples).double()
    m = torch.as_tensor(mask).double()
    if s.ndim != 4 or s.shape[0] < 2 or tuple(s.shape[1:]) != tuple(x.shape):
        raise InputError(
            f"need samples (K >= 2, *truth.shape) for a spread; got {tuple(s.shape)} "
            f"for a truth of {tuple(x.shape)}"
        )
    require(tuple(m.shape) == tuple(x.shape), "mask and truth differ in shape")
    n = s.shape[0]
    mean, std = s.mean(0), s.std(0)
    inside = m > 0.5
    require(bool(inside.any()), "the mask selects no voxel")
    voxels = float(((x - mean).abs() <= k * std)[inside].double().mean())

    fx, fs = fft3_c(x * m), fft3_c(s * m)
    fm = fs.mean(0)
    err = torch.stack([(fx - fm).real, (fx - fm).imag])
    spread = torch.stack([fs.real.std(0), fs.imag.std(0)])
    ok = (err.abs() <= k * spread) & (spread > 0)
    d = x.shape[-1]
    shells = shell_indices(tuple(x.shape)).reshape(-1)
    n_shells = d // 2 + 1
    coverage = []
    for r in range(1, n_shells):
        sel = shells == r
        valid = (spread > 0).reshape(2, -1)[:, sel]
        hits = ok.reshape(2, -1)[:, sel]
        coverage.append(float(hits.sum() / valid.sum().clamp_min(1)))
    return {
        "voxels": voxels,
        "expected": expected_coverage(n, k, antithetic),
        "n_samples": int(n),
        "k": float(k),
        "shells": {
            "frequency": (np.arange(1, n_shells) / (d * pixel_size)).tolist(),
            "coverage": coverage,
        },
    }


__all__ = ["expected_coverage", "spread_calibration"]
