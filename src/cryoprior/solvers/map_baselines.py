"""Classical and learned-denoiser baselines of prior-guided reconstruction, on the same
sufficient statistics (:mod:`cryoprior.solvers.fourier_data`).

- :func:`smoothness_regularized`: argmin ‖y − A x‖² + μ‖∇x‖², μ by the discrepancy
  principle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoprior.geometry.fft import ifft3_c
from cryoprior.physics.fourier_slice import gridding_correction
from cryoprior.physics.projection import crop_centred
from cryoprior.solvers.fourier_data import FourierData

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
