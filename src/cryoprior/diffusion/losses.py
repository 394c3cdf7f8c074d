"""Denoising score matching (Vincent 2011; Ho et al. 2020, Eq. 14; Karras et al. 2022, Eq. 2).

One function, :func:`dsm_loss`, for every representation and parameterisation:
draw t and ε, form x_t = α x0 + σ ε, call the denoiser and return the per-sample weighted
mean squared error in the chosen target space (ε, x0 or v).

The three targets measure the same error in different units: for a fixed x_t,
‖δε‖² = SNR·‖δx0‖² and ‖δv‖² = (SNR + 1)·‖δx0‖², SNR = α²/σ². The weighting
"uniform" is uniform in the target space; "min_snr" and "edm" are defined as weights on the
x0-space error and converted to the target space, so they mean the same thing whatever the
target:

- ``min_snr``: w_x0 = min(SNR, γ) (Hang et al. 2023, "Min-SNR weighting", Eq. 9; γ = 5),
  i.e. min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
- ``edm``: w_x0 = λ(σ̃) = (σ̃² + σd²)/(σ̃ σd)² = SNR + 1/σd² (Karras et al. 2022, Table 1,
  with σ̃ = σ/α). With the VE schedule, EDM preconditioning, ``t_sampling="lognormal"``
  and target x0 this is EDM's ``EDMLoss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cryoprior.core.errors import InputError, require
from cryoprior.diffusion.denoiser import DenoiserLike, per_sample_time, v_from_x0_eps
from cryoprior.diffusion.pointcloud import draw_noise, node_mask_like, remove_mean
from cryoprior.diffusion.schedules import NoiseSchedule

TARGETS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr", "edm")
T_SAMPLINGS = ("uniform", "stratified", "lognormal")


def sample_time(
    schedule: NoiseSchedule,
    batch: int,
    generator: torch.Generator | None = None,
    t_sampling: str = "uniform",
    t_min: float = 1e-3,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> torch.Tensor:
    """Training times, shape (batch,), float64 on the generator's device, in [t_min, 1].

    uniform: t ~ U(t_min, 1). stratified: one uniform offset u and t_i ∝ (u + i/B) mod 1
    (Kingma et al. 2021, low-discrepancy sampler, App. I.1). lognormal: ln(σ/α) ~
    N(p_mean, p_std²) (Karras et al. 2022, Table 1), mapped to t through λ = −2 ln(σ/α).
    """
    dev = generator.device if generator is not None else None
    if t_sampling == "uniform":
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=dev)
    elif t_sampling == "stratified":
        u0 = torch.rand(1, generator=generator, dtype=torch.float64, device=dev)
        u = (u0 + torch.arange(batch, dtype=torch.float64, device=dev) / batch) % 1.0
    elif t_sampling == "lognormal":
        n = torch.randn(batch, generator=generator, dtype=torch.float64, device=dev)
        t = schedule.t_from_log_snr(-2.0 * (p_mean + p_std * n))
        return t.clamp(t_min, 1.0)
    else:
        raise InputError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
    return t_min + (1.0 - t_min) * u


def loss_weight(
    weighting: str | Callable[[torch.Tensor], torch.Tensor],
    log_snr: torch.Tensor,
    target: str,
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Per-sample weight (B,) of the squared error in ``target`` space (see module doc)."""
    if callable(weighting):
        return weighting(log_snr)
    snr = log_snr.exp()
    to_target = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0}[target]
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        return snr.clamp(max=min_snr_gamma) / to_target
    if weighting == "edm":
        return (snr + 1.0 / sigma_data**2) / to_target
    raise InputError(f"weighting must be one of {WEIGHTINGS} or a callable, got {weighting!r}")


def per_sample_mean(v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``v`` over all non-batch entries, or over the real nodes' entries with a mask."""
    if mask is None:
        return v.flatten(1).mean(1)
    m = node_mask_like(mask, v).expand_as(v)
    return (v * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def dsm_loss(
    denoiser: DenoiserLike,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    weighting: str | Callable[[torch.Tensor], torch.Tensor] | None = "uniform",
    target: str = "eps",
    t_sampling: str = "uniform",
    *,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    t_min: float = 1e-3,
    min_snr_gamma: float = 5.0,
    sigma_data: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Denoising score-matching loss per sample, shape (B,), and an info dict.

    Args:
        denoiser: the denoiser contract (its schedule and representation are used).
        x0: clean batch (B, ...); point clouds (B, N, D) are re-centred on their real nodes.
        mask: node mask (B, N) for variable-size point clouds: the error is averaged over
            real nodes only and the noise lies in the zero-COM subspace.
        weighting: "uniform" (also None), "min_snr", "edm" or a callable
            log_snr (B,) -> weight (B,).
        target: space of the squared error: "eps", "x0" or "v".
        t, noise: fix the time (scalar or (B,)) and noise instead of drawing them.
        cond: extra keyword arguments for the denoiser (conditioning inputs).
        sigma_data: for "edm" weighting; default the denoiser's ``sigma_data`` or 0.5.

    Returns ``(loss, info)``; info holds detached per-sample ``t``, ``log_snr``, ``weight``
    and the unweighted ``mse``.
    """
    require(target in TARGETS, f"target must be one of {TARGETS}, got {target!r}")
    schedule = denoiser.schedule
    points = getattr(denoiser, "representation", "grid") == "points"
    if points:
        x0 = remove_mean(x0, mask)
    if t is None:
        t = sample_time(schedule, x0.shape[0], generator, t_sampling, t_min)
    t = per_sample_time(t, x0)
    if noise is None:
        noise = draw_noise(
            x0.shape,
            points=points,
            mask=mask,
            generator=generator,
            dtype=x0.dtype,
            device=x0.device,
        )
    elif points:
        noise = remove_mean(noise, mask)
    x_t = schedule.marginal(x0, t, noise)
    kw = dict(cond or {}) | ({"mask": mask} if mask is not None else {})
    out = denoiser(x_t, t, **kw)
    if target == "eps":
        err = out.eps - noise
    elif target == "x0":
        err = out.x0 - x0
    else:
        alpha, sigma = schedule.alpha_sigma(t)
        err = v_from_x0_eps(out.x0, out.eps, alpha, sigma) - v_from_x0_eps(x0, noise, alpha, sigma)
    mse = per_sample_mean(err**2, mask if points else None)
    log_snr = schedule.log_snr(t)
    sd = sigma_data if sigma_data is not None else getattr(denoiser, "sigma_data", 0.5)
    w = loss_weight(weighting or "uniform", log_snr, target, min_snr_gamma, sd).to(mse)
    info = {"t": t.detach(), "log_snr": log_snr.detach(), "weight": w.detach(), "mse": mse.detach()}
    return w * mse, info
