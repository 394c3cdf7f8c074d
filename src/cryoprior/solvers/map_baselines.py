"""Classical and learned-denoiser baselines of prior-guided reconstruction, on the same
sufficient statistics (:mod:`cryoprior.solvers.fourier_data`).

- :func:`smoothness_regularized`: argmin ‖y − A x‖² + μ‖∇x‖², μ by the discrepancy
  principle.
- :func:`denoiser_plug_and_play`: the *denoiser-only* learned baseline — the prior's
  network used as a plain denoiser between data-consistency solves (half-quadratic
  splitting, as in DPIR: Zhang, Li, Zuo, Zhang, Van Gool & Timofte, "Plug-and-Play Image
  Restoration with Deep Denoiser Prior", TPAMI 2021; in cryo-EM, RELION's Blush puts a
  learned denoiser inside the iterations). No sampling, no network Jacobian: what
  posterior sampling adds over learned denoising is the difference between the two.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.diffusion import per_sample_time
from cryoprior.geometry.fft import ifft3_c
from cryoprior.physics.fourier_slice import gridding_correction
from cryoprior.physics.operators import LinearOperator, ScaledLinearOperator
from cryoprior.physics.projection import crop_centred
from cryoprior.priors import Prior
from cryoprior.solvers.fourier_data import FourierData, FourierLikelihoodOperator
from cryoprior.solvers.regularized import conjugate_gradient

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
# the denoiser-only learned baseline


@dataclass
class PlugAndPlayMap:
    """A plug-and-play map (D, D, D) in measurement units per voxel at ``pixel_size``,
    the noise levels σ̃ (network units) it walked, and timings."""

    map: torch.Tensor
    pixel_size: float
    sigmas: list[float]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _time_at(schedule: Any, sigma_tilde: float) -> float:
    """The diffusion time whose σ_t/α_t is ``sigma_tilde`` (log SNR = −2 log σ̃)."""
    log_snr = torch.tensor(-2.0 * math.log(sigma_tilde), dtype=torch.float64)
    return float(schedule.t_from_log_snr(log_snr))


@torch.no_grad()
def denoiser_plug_and_play(
    prior: Prior,
    data: FourierData,
    intensity_scale: float,
    *,
    n_iter: int = 8,
    sigma_max: float = 1.0,
    sigma_min: float = 0.05,
    n_inner: int = 20,
) -> PlugAndPlayMap:
    """:func:`plug_and_play` with the particles' Fourier likelihood (``data`` calibrated;
    ``intensity_scale`` c from :func:`~cryoprior.solvers.prior_reconstruction.
    intensity_scale`, never from a truth)."""
    op = FourierLikelihoodOperator(data)
    result = plug_and_play(
        prior,
        op,
        op.measurement(torch.float32),
        float(data.noise_sigma),
        intensity_scale,
        n_iter=n_iter,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        n_inner=n_inner,
    )
    result.pixel_size = data.pixel_size
    return result


@torch.no_grad()
def plug_and_play(
    prior: Prior,
    op: LinearOperator,
    y: torch.Tensor,
    noise_sigma: float,
    intensity_scale: float,
    *,
    n_iter: int = 8,
    sigma_max: float = 1.0,
    sigma_min: float = 0.05,
    n_inner: int = 20,
) -> PlugAndPlayMap:
    """Half-quadratic splitting with the prior's network as a denoiser.

    In network units (x_phys = scale · x, measurement y = c · A(x_phys) + noise of σ
    ``noise_sigma``), starting from the data solve around 0 with the prior's unit
    variance, for σ̃ on a geometric ladder ``sigma_max`` → ``sigma_min`` (``n_iter``
    levels):

        z = D(α_t x, t)  with σ_t/α_t = σ̃            (denoise x as if it carried noise σ̃)
        x = argmin ‖y − A x‖²/σ² + ‖x − z‖²/σ̃²       (data consistency, ``n_inner`` CG)

    The CG solves are preconditioned by the operator's ``approx_normal_inverse`` when it
    has one (exact for :class:`~cryoprior.solvers.halfmap.HalfMapLikelihood`).
    Cost: ``n_iter`` network evaluations (no backward pass) and ``n_iter + 1`` CG solves.
    The map is in measurement units per voxel; ``pixel_size`` is the prior's.
    """
    require(int(n_iter) >= 1, f"n_iter must be >= 1, got {n_iter}")
    require(0 < sigma_min <= sigma_max, "need 0 < sigma_min <= sigma_max")
    gain = require_positive(intensity_scale, "intensity scale")
    t0 = time.perf_counter()
    norm = prior.metadata.normalisation
    scale, offset = float(norm["scale"]), float(norm["offset"])
    a = ScaledLinearOperator(op, gain * scale)
    if offset != 0.0:
        ones = torch.full(op.domain_shape, offset, dtype=y.dtype)
        y = y - gain * op.forward(ones)
    s2 = float(noise_sigma) ** 2
    rhs_data = a.adjoint(y)[None, None] / s2  # (1, 1, D, D, D)
    approx = getattr(op, "approx_normal_inverse", None)
    g2 = (gain * scale) ** 2

    def prox(z: torch.Tensor, r2: float) -> torch.Tensor:
        def normal(v: torch.Tensor) -> torch.Tensor:
            return a.normal(v) / s2 + v / r2

        # (I/r² + g²AᵀA/σ²)⁻¹ when the operator offers it: exact for a Fourier-diagonal
        # AᵀA (half maps), a close preconditioner for the particles' gridded one. Without
        # it CG stalls: AᵀA spans orders of magnitude over the shells.
        precond = None if approx is None else (lambda v: approx(v, 1.0 / r2, g2 / s2))
        return conjugate_gradient(
            normal, rhs_data + z / r2, z, int(n_inner), 1e-8, batch_ndim=1, preconditioner=precond
        ).x

    denoiser = prior.denoiser
    denoiser.eval()
    schedule = denoiser.schedule
    x = prox(torch.zeros_like(rhs_data), 1.0)
    sigmas = np.geomspace(float(sigma_max), float(sigma_min), int(n_iter)).tolist()
    for st in sigmas:
        t = _time_at(schedule, st)
        alpha = float(schedule.alpha_sigma(t)[0])
        z = denoiser(alpha * x, per_sample_time(t, x)).x0
        x = prox(z, st**2)
    volume = (scale * x[0, 0] + offset) * gain
    return PlugAndPlayMap(
        map=volume,
        pixel_size=float(prior.metadata.pixel_size or 0.0),
        sigmas=sigmas,
        seconds=time.perf_counter() - t0,
        info={"n_iter": int(n_iter), "n_inner": int(n_inner), "method": "HQS (DPIR-style)"},
    )


__all__ = [
    "PlugAndPlayMap",
    "RegularizedMap",
    "denoiser_plug_and_play",
    "plug_and_play",
    "smoothness_regularized",
]
