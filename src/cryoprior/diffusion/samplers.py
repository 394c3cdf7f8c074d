"""Samplers over the denoiser contract; none of them owns a network.

Two layers:

- **Single steps** — pure functions of ``(schedule, x_t, out, t, s, ...)`` where ``out`` is
  the :class:`DenoiserOutput` at (x_t, t) and s < t is the next time. They take the noise
  as an argument, so a guided sampler (DPS) can evaluate the denoiser itself, take a step
  and add its own guidance term: :func:`ddpm_step`, :func:`ddim_step`,
  :func:`reverse_sde_step`, :func:`reverse_diffusion_step`, :func:`langevin_step`,
  :func:`pf_ode_step`. ``t`` and ``s`` are floats or per-sample (B,) tensors.
- **Samplers** — loops over ``schedule.timesteps(n_steps, t_start)`` (t_start → 0) that
  draw noise, call the denoiser and a step: :func:`ddpm_sample`, :func:`ddim_sample`,
  :func:`reverse_sde_sample`, :func:`pc_sample`, :func:`ode_sample`.

Common sampler arguments: ``denoiser`` (the contract: ``.schedule``, ``.representation``,
``__call__``), ``shape`` (B, ...), ``n_steps``, ``generator``, ``x_T`` (start point; required
when ``t_start < 1``), ``mask`` (node mask (B, N) for point clouds), ``cond`` (dict of extra
denoiser keyword arguments), ``callback(step, x, out)`` called after each step with the new
x and the denoiser output that produced it (a returned tensor replaces x), ``t_start``,
``denoise_final`` (if σ at the last grid time is > 0, return the denoiser's x̂0 there: EDM's
final step to σ = 0 / score_sde's ``noise_removal``), ``dtype``, ``device``,
``show_progress`` and ``spacing`` (the time grid, see ``NoiseSchedule.timesteps``: "uniform"
in t, or "edm" ρ = 7 spacing of σ/α; default "uniform" except for :func:`ode_sample`).

For ``representation == "points"`` the prior and every noise draw lie in the zero-COM
subspace of the real nodes, the COM is removed after every step (after the callback) and
checked (padding stays 0). Samplers run under ``torch.no_grad()``; a guided sampler that
needs gradients writes its own loop around the single steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cryoprior.core.errors import InputError, require
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion.denoiser import DenoiserLike, DenoiserOutput, per_sample_time
from cryoprior.diffusion.pointcloud import assert_zero_com, draw_noise, remove_mean
from cryoprior.diffusion.schedules import NoiseSchedule, TimeLike, as_time

Callback = Callable[[int, torch.Tensor, DenoiserOutput], torch.Tensor | None]


# --------------------------------------------------------------------------- single steps
def _coefs(
    schedule: NoiseSchedule, t: TimeLike, s: TimeLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a_t, s_t = schedule.alpha_sigma(as_time(t))
    a_s, s_s = schedule.alpha_sigma(as_time(s))
    return a_t, s_t, a_s, s_s


def _transition(
    a_t: torch.Tensor, s_t: torch.Tensor, a_s: torch.Tensor, s_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α_{t|s}² σ_s² of q(x_t | x_s)
    (Kingma et al. 2021, Eq. 3)."""
    a_ts = a_t / a_s
    return a_ts, (s_t**2 - a_ts**2 * s_s**2).clamp_min(0.0)


def _need_noise(noise: torch.Tensor | None, std: torch.Tensor, name: str) -> None:
    if noise is None and bool((std > 0).any()):
        raise InputError(f"{name} needs a noise tensor for a stochastic step")


def _add_noise(x: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    return x if noise is None else x + expand_like(std, x) * noise


def ddpm_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    out: DenoiserOutput,
    t: TimeLike,
    s: TimeLike,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral step x_s ~ q(x_s | x_t, x̂0) (Ho et al. 2020, Alg. 2 and Eqs. 6–7).

    Posterior of the forward process between any two times (Kingma et al. 2021, Eq. 56):
    mean α_{t|s} σ_s²/σ_t² x_t + α_s σ²_{t|s}/σ_t² x̂0, variance σ²_{t|s} σ_s²/σ_t²
    (DDPM's β̃ choice of σ_t²).
    """
    a_t, s_t, a_s, s_s = _coefs(schedule, t, s)
    a_ts, var_ts = _transition(a_t, s_t, a_s, s_s)
    c_x = a_ts * s_s**2 / s_t**2
    c_0 = a_s * var_ts / s_t**2
    std = (var_ts * s_s**2 / s_t**2).sqrt()
    _need_noise(noise, std, "ddpm_step")
    mean = expand_like(c_x, x_t) * x_t + expand_like(c_0, x_t) * out.x0
    return _add_noise(mean, std, noise)


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    out: DenoiserOutput,
    t: TimeLike,
    s: TimeLike,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM step x_s = α_s x̂0 + sqrt(σ_s² − c²) ε̂ + c z (Song, Meng & Ermon 2021, Eq. 12).

    c = η sqrt(σ²_{t|s} σ_s²/σ_t²) (their σ_t(η), Eq. 16); η = 0 is deterministic,
    η = 1 equals :func:`ddpm_step`.
    """
    require(eta >= 0.0, f"eta must be >= 0, got {eta}")
    a_t, s_t, a_s, s_s = _coefs(schedule, t, s)
    _, var_ts = _transition(a_t, s_t, a_s, s_s)
    c = eta * (var_ts * s_s**2 / s_t**2).sqrt()
    _need_noise(noise, c, "ddim_step")
    c_eps = (s_s**2 - c**2).clamp_min(0.0).sqrt()
    x_s = expand_like(a_s, x_t) * out.x0 + expand_like(c_eps, x_t) * out.eps
    return _add_noise(x_s, c, noise)


def reverse_sde_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    out: DenoiserOutput,
    t: TimeLike,
    s: TimeLike,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler–Maruyama step of the reverse SDE dx = [f x − g² ∇log p_t] dt + g dw̄
    (Song et al. 2021, Eq. 6), from t down to s: Δt = t − s > 0,
    x_s = x_t − (f(t) x_t − g²(t) score) Δt + sqrt(g²(t) Δt) z.
    """
    tt, ss = as_time(t), as_time(s)
    dt = tt - ss
    f, g2 = schedule.drift(tt), schedule.diffusion2(tt)
    x_s = x_t - expand_like(f * dt, x_t) * x_t + expand_like(g2 * dt, x_t) * out.score
    std = (g2 * dt).clamp_min(0).sqrt()
    _need_noise(noise, std, "reverse_sde_step")
    return _add_noise(x_s, std, noise)


def reverse_diffusion_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    out: DenoiserOutput,
    t: TimeLike,
    s: TimeLike,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse-diffusion predictor (Song et al. 2021, Eq. 47; Alg. 2 and 3 predictor).

    With the discrete forward step x_t = a x_s + b z, a = α_{t|s}, b² = σ²_{t|s}:
    x_s = (2 − a) x_t + b² score + b z. For VE this is x + (σ_t² − σ_s²) score + ...
    (Alg. 2); for VP (2 − sqrt(1 − β)) x + β score + sqrt(β) z (Alg. 3).
    """
    a_t, s_t, a_s, s_s = _coefs(schedule, t, s)
    a_ts, var_ts = _transition(a_t, s_t, a_s, s_s)
    x_s = expand_like(2.0 - a_ts, x_t) * x_t + expand_like(var_ts, x_t) * out.score
    std = var_ts.sqrt()
    _need_noise(noise, std, "reverse_diffusion_step")
    return _add_noise(x_s, std, noise)


def langevin_step(
    x: torch.Tensor,
    out: DenoiserOutput,
    noise: torch.Tensor,
    snr: float = 0.16,
    alpha_i: TimeLike = 1.0,
) -> torch.Tensor:
    """One Langevin corrector step (Song et al. 2021, Alg. 2/3 corrector, Alg. 4).

    ε = 2 α_i (r ‖z‖ / ‖∇log p‖)² (r = ``snr``; α_i = 1 − β_i for VP, 1 for VE), with the
    norms per sample averaged over the batch as in score_sde ``LangevinCorrector`` (a
    per-sample ratio is unstable in low dimension), x ← x + ε ∇log p + sqrt(2ε) z.
    """
    require(snr > 0, f"corrector snr must be > 0, got {snr}")
    g = out.score
    g_norm = g.flatten(1).norm(dim=1).mean()
    z_norm = noise.flatten(1).norm(dim=1).mean()
    eps = 2.0 * as_time(alpha_i).to(g_norm) * (snr * z_norm / g_norm.clamp_min(1e-30)) ** 2
    return x + expand_like(eps, x) * g + expand_like((2.0 * eps).sqrt(), x) * noise


def pf_ode_drift(
    schedule: NoiseSchedule, x: torch.Tensor, out: DenoiserOutput, t: TimeLike
) -> torch.Tensor:
    """dx/dt = f(t) x − ½ g²(t) ∇log p_t(x) of the probability-flow ODE (Song et al. 2021,
    Eq. 13)."""
    tt = as_time(t)
    f, g2 = schedule.drift(tt), schedule.diffusion2(tt)
    return expand_like(f, x) * x - expand_like(0.5 * g2, x) * out.score


def pf_ode_step(
    schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: TimeLike, s: TimeLike
) -> torch.Tensor:
    """Euler step of the probability-flow ODE in EDM's variables (Karras et al. 2022, Eq. 4).

    With x̃ = x/α and σ̃ = σ/α the ODE is dx̃/dσ̃ = (x̃ − D)/σ̃ = ε̂, so
    x_s = (α_s/α_t) x_t + (σ_s − α_s σ_t/α_t) ε̂ (for VE: x + (σ_s − σ_t) ε̂, EDM Alg. 1
    line 5). With ε̂ = ε(x_t) this equals DDIM (η = 0); with the average of ε̂ at both ends
    it is the Heun correction (EDM Alg. 1 line 8).
    """
    a_t, s_t, a_s, s_s = _coefs(schedule, t, s)
    return expand_like(a_s / a_t, x_t) * x_t + expand_like(s_s - a_s * s_t / a_t, x_t) * eps


# --------------------------------------------------------------------------- sampling loops
def _is_points(denoiser: DenoiserLike) -> bool:
    return getattr(denoiser, "representation", "grid") == "points"


def _call(
    denoiser: DenoiserLike,
    x: torch.Tensor,
    t: TimeLike,
    mask: torch.Tensor | None,
    cond: dict[str, Any] | None,
) -> DenoiserOutput:
    kw = dict(cond or {}) | ({"mask": mask} if mask is not None else {})
    return denoiser(x, per_sample_time(t, x), **kw)


class _Loop:
    """Shared set-up of every sampler: start point, grid, noise draws, COM handling."""

    def __init__(
        self,
        denoiser: DenoiserLike,
        shape: tuple[int, ...] | torch.Size,
        n_steps: int,
        generator: torch.Generator | None,
        x_T: torch.Tensor | None,
        mask: torch.Tensor | None,
        cond: dict[str, Any] | None,
        t_start: float,
        dtype: torch.dtype,
        device: torch.device | str | None,
        spacing: str,
    ) -> None:
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.generator, self.mask, self.cond = generator, mask, cond
        self.points = _is_points(denoiser)
        shape = tuple(shape)
        require(len(shape) >= 2, f"shape must be (B, ...), got {shape}")
        if mask is not None:
            require(self.points, 'a node mask needs a denoiser with representation="points"')
            require(
                tuple(mask.shape) == shape[:2],
                f"mask shape {tuple(mask.shape)} must be (B, N) = {shape[:2]}",
            )
        self.grid = self.schedule.timesteps(n_steps, t_start=t_start, spacing=spacing).tolist()
        if x_T is None:
            require(
                t_start == 1.0,
                f"t_start={t_start} < 1 needs a starting point x_T (e.g. a noised input)",
            )
            self.dtype, self.device = dtype, device
            x = self.schedule.prior_std() * self.noise(shape)
        else:
            require(tuple(x_T.shape) == shape, f"x_T shape {tuple(x_T.shape)} != shape {shape}")
            self.dtype, self.device = x_T.dtype, x_T.device
            x = x_T.clone()
        if mask is not None:
            self.mask = mask.to(self.device if self.device is not None else x.device)
        self.x = remove_mean(x, self.mask) if self.points else x

    def noise(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return draw_noise(
            shape if shape is not None else self.x.shape,
            points=self.points,
            mask=self.mask,
            generator=self.generator,
            dtype=self.dtype,
            device=self.device,
        )

    def denoise(self, x: torch.Tensor, t: float) -> DenoiserOutput:
        return _call(self.denoiser, x, t, self.mask, self.cond)

    def sigma(self, t: float) -> float:
        return float(self.schedule.sigma(t))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return remove_mean(x, self.mask) if self.points else x

    def run(
        self,
        step: Callable[[torch.Tensor, DenoiserOutput, float, float], torch.Tensor],
        callback: Callback | None,
        denoise_final: bool,
        show_progress: bool,
        desc: str,
    ) -> torch.Tensor:
        x, n = self.x, len(self.grid) - 1
        for i in progress(range(n), total=n, desc=desc, enabled=show_progress):
            t, s = self.grid[i], self.grid[i + 1]
            out = self.denoise(x, t)
            x = step(x, out, t, s)
            if callback is not None:
                r = callback(i, x, out)
                x = r if r is not None else x
            if self.points:
                x = remove_mean(x, self.mask)
                assert_zero_com(x, self.mask)
        if denoise_final and self.sigma(self.grid[-1]) > 0:
            x = self.denoise(x, self.grid[-1]).x0
        return x


@torch.no_grad()
def ddpm_sample(
    denoiser: DenoiserLike,
    shape: tuple[int, ...] | torch.Size,
    n_steps: int = 1000,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    callback: Callback | None = None,
    t_start: float = 1.0,
    denoise_final: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    spacing: str = "uniform",
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on a uniform grid of the schedule."""
    loop = _Loop(
        denoiser, shape, n_steps, generator, x_T, mask, cond, t_start, dtype, device, spacing
    )

    def step(x: torch.Tensor, out: DenoiserOutput, t: float, s: float) -> torch.Tensor:
        noise = loop.noise() if loop.sigma(s) > 0 else None
        return ddpm_step(loop.schedule, x, out, t, s, noise)

    return loop.run(step, callback, denoise_final, show_progress, "DDPM")


@torch.no_grad()
def ddim_sample(
    denoiser: DenoiserLike,
    shape: tuple[int, ...] | torch.Size,
    n_steps: int = 50,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    x_T: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    callback: Callback | None = None,
    t_start: float = 1.0,
    denoise_final: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    spacing: str = "uniform",
) -> torch.Tensor:
    """DDIM sampling (Song, Meng & Ermon 2021, Eq. 12); ``eta = 0`` is deterministic given x_T."""
    loop = _Loop(
        denoiser, shape, n_steps, generator, x_T, mask, cond, t_start, dtype, device, spacing
    )

    def step(x: torch.Tensor, out: DenoiserOutput, t: float, s: float) -> torch.Tensor:
        noise = loop.noise() if eta > 0 and loop.sigma(s) > 0 else None
        return ddim_step(loop.schedule, x, out, t, s, eta if noise is not None else 0.0, noise)

    return loop.run(step, callback, denoise_final, show_progress, "DDIM")


@torch.no_grad()
def reverse_sde_sample(
    denoiser: DenoiserLike,
    shape: tuple[int, ...] | torch.Size,
    n_steps: int = 1000,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    callback: Callback | None = None,
    t_start: float = 1.0,
    denoise_final: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    spacing: str = "uniform",
) -> torch.Tensor:
    """Euler–Maruyama integration of the reverse-time SDE (Song et al. 2021, Eq. 6)."""
    loop = _Loop(
        denoiser, shape, n_steps, generator, x_T, mask, cond, t_start, dtype, device, spacing
    )

    def step(x: torch.Tensor, out: DenoiserOutput, t: float, s: float) -> torch.Tensor:
        return reverse_sde_step(loop.schedule, x, out, t, s, loop.noise())

    return loop.run(step, callback, denoise_final, show_progress, "reverse SDE")


@torch.no_grad()
def pc_sample(
    denoiser: DenoiserLike,
    shape: tuple[int, ...] | torch.Size,
    n_steps: int = 1000,
    generator: torch.Generator | None = None,
    snr: float = 0.16,
    n_corrector: int = 1,
    x_T: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    callback: Callback | None = None,
    t_start: float = 1.0,
    denoise_final: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    spacing: str = "uniform",
) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 2 (VE) and Alg. 3 (VP)).

    Predictor: :func:`reverse_diffusion_step` from t_i to t_{i+1}; corrector:
    ``n_corrector`` :func:`langevin_step` at t_{i+1} with step size from the target ``snr``
    and α_i = α²_{t|s} (1 − β_i for VP, 1 for VE). No corrector where σ(t_{i+1}) = 0.
    """
    require(int(n_corrector) >= 0, f"n_corrector must be >= 0, got {n_corrector}")
    loop = _Loop(
        denoiser, shape, n_steps, generator, x_T, mask, cond, t_start, dtype, device, spacing
    )

    def step(x: torch.Tensor, out: DenoiserOutput, t: float, s: float) -> torch.Tensor:
        x = reverse_diffusion_step(loop.schedule, x, out, t, s, loop.noise())
        if loop.sigma(s) > 0:
            a_ts = loop.schedule.alpha2(t) / loop.schedule.alpha2(s)
            for _ in range(int(n_corrector)):
                x = loop.project(x)
                x = langevin_step(x, loop.denoise(x, s), loop.noise(), snr, a_ts)
        return x

    return loop.run(step, callback, denoise_final, show_progress, "PC")


@torch.no_grad()
def ode_sample(
    denoiser: DenoiserLike,
    shape: tuple[int, ...] | torch.Size,
    n_steps: int = 50,
    generator: torch.Generator | None = None,
    method: str = "heun",
    x_T: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    callback: Callback | None = None,
    t_start: float = 1.0,
    denoise_final: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    spacing: str = "edm",
) -> torch.Tensor:
    """Probability-flow ODE sampling (Song et al. 2021, Eq. 13) with Euler or Heun steps.

    Integrated in EDM's variables (:func:`pf_ode_step`) on EDM's ρ = 7 grid of σ/α
    (``spacing="edm"``); ``method="heun"`` is Karras et al. 2022, Alg. 1 (Heun's 2nd-order
    method, Euler on a final step to σ = 0), exactly so for the VE schedule. Heun needs the
    ρ grid for VP schedules whose σ/α explodes at t = 1 (cosine): one uniform step there
    spans several decades of σ/α. Euler on the same grid equals DDIM (η = 0). Random only
    through the prior draw x_T.
    """
    require(method in ("euler", "heun"), f'method must be "euler" or "heun", got {method!r}')
    loop = _Loop(
        denoiser, shape, n_steps, generator, x_T, mask, cond, t_start, dtype, device, spacing
    )

    def step(x: torch.Tensor, out: DenoiserOutput, t: float, s: float) -> torch.Tensor:
        x_e = pf_ode_step(loop.schedule, x, out.eps, t, s)
        if method == "euler" or loop.sigma(s) == 0:
            return x_e
        out_s = loop.denoise(loop.project(x_e), s)
        return pf_ode_step(loop.schedule, x, 0.5 * (out.eps + out_s.eps), t, s)

    return loop.run(step, callback, denoise_final, show_progress, "PF-ODE")


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "sde": reverse_sde_sample,
    "pc": pc_sample,
    "ode": ode_sample,
}
