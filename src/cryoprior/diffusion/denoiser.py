"""The one denoiser contract: ``denoiser(x_t, t, **cond) -> DenoiserOutput(x0, eps, score)``.

A denoiser carries its noise ``schedule`` and its ``representation`` ("grid" for images
(B,C,H,W) and volumes (B,C,D,H,W); "points" for point clouds (B,N,D) with an optional node
mask (B,N)). Losses and samplers depend only on this contract (as in NVlabs/edm, where the
preconditioned network's ``forward(x, sigma)`` is all the sampler and loss see).

:class:`Denoiser` wraps a raw network ``net(x, c_noise, **cond)``:

- ``c_noise`` is a per-sample (B,) float. With ``c_noise="log_snr"`` (default) it is
  −λ/8 = ¼ log(σ/α), EDM's c_noise = ¼ ln σ (Karras et al. 2022, Table 1) generalised to any
  schedule, so a network does not depend on how t maps to noise; with ``c_noise="t"`` it
  is the diffusion time t ∈ [0, 1].
- ``prediction`` says what the network outputs: "eps" (ε), "x0", or "v" (Salimans & Ho
  2022, v = α̂ ε − σ̂ x0 with α̂ = α/r, σ̂ = σ/r, r = sqrt(α² + σ²); r = 1 for VP).
- ``precondition=True`` (only with prediction "x0") applies EDM's preconditioning
  (Karras et al. 2022, Eq. 7 and Table 1) in the scaled variables x̃ = x_t/α, σ̃ = σ/α:
  D = c_skip x̃ + c_out F(c_in x̃, c_noise), c_skip = σd²/(σ̃² + σd²),
  c_out = σ̃ σd / sqrt(σ̃² + σd²), c_in = 1/sqrt(σ̃² + σd²). For VE this is EDM exactly.

Whatever the network predicts, the output holds all three of x̂0 = E[x0 | x_t],
ε̂ = (x_t − α x̂0)/σ and the score ∇ log p_t(x_t) = −ε̂/σ (Tweedie).

:class:`AnalyticGaussianDenoiser` and :class:`AnalyticGMMDenoiser` are exact denoisers for
Gaussian and Gaussian-mixture data; tests (and other modules' tests) use them as ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cryoprior.core.errors import InputError, require
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion.pointcloud import node_mask_like, remove_mean
from cryoprior.diffusion.schedules import NoiseSchedule, TimeLike

PREDICTIONS = ("eps", "x0", "v")
REPRESENTATIONS = ("grid", "points")


@dataclass
class DenoiserOutput:
    """A denoiser's estimates at (x_t, t), each with x_t's shape.

    x0: posterior mean E[x0 | x_t]; eps: E[ε | x_t] = (x_t − α x0)/σ;
    score: ∇_x log p_t(x_t) = −eps/σ.
    """

    x0: torch.Tensor
    eps: torch.Tensor
    score: torch.Tensor


class DenoiserLike(Protocol):
    """What samplers and losses need: a schedule, a representation and the call."""

    schedule: NoiseSchedule
    representation: str

    def __call__(self, x_t: torch.Tensor, t: TimeLike, **cond: Any) -> DenoiserOutput: ...


def per_sample_time(t: TimeLike, x: torch.Tensor) -> torch.Tensor:
    """``t`` (scalar or (B,)) as a (B,) tensor on ``x``'s device (float64 unless on MPS)."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    tt = torch.as_tensor(t, device=x.device, dtype=dtype)
    if tt.ndim == 0:
        return tt.expand(x.shape[0])
    require(
        tuple(tt.shape) == (x.shape[0],),
        f"t must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(tt.shape)}",
    )
    return tt


def v_from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """v = α̂ ε − σ̂ x0, α̂ = α/r, σ̂ = σ/r, r = sqrt(α²+σ²) (Salimans & Ho 2022, Sec. 4).

    ``alpha``/``sigma`` are per-sample (B,) or scalars.
    """
    r = (alpha**2 + sigma**2).sqrt()
    return expand_like(alpha / r, x0) * eps - expand_like(sigma / r, x0) * x0


def x0_eps_from_prediction(
    raw: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output of type ``prediction`` into (x̂0, ε̂) given x_t = α x0 + σ ε.

    eps: x0 = (x_t − σ ε)/α (Ho et al. 2020, Eq. 15). x0: ε = (x_t − α x0)/σ.
    v: with z = x_t/r, x0 = α̂ z − σ̂ v and ε = σ̂ z + α̂ v (Salimans & Ho 2022, Sec. 4).
    """
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * raw) / a, raw
    if prediction == "x0":
        return raw, (x_t - a * raw) / s
    if prediction == "v":
        r = (a**2 + s**2).sqrt()
        z, ah, sh = x_t / r, a / r, s / r
        return ah * z - sh * raw, sh * z + ah * raw
    raise InputError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _points_project(
    x0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return remove_mean(x0, mask), remove_mean(eps, mask)


def _finish(
    x0: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    representation: str,
    mask: torch.Tensor | None,
) -> DenoiserOutput:
    if representation == "points":
        x0, eps = _points_project(x0, eps, mask)
    return DenoiserOutput(x0=x0, eps=eps, score=-eps / expand_like(sigma, eps))


def _check_representation(representation: str, mask: torch.Tensor | None) -> None:
    require(
        representation in REPRESENTATIONS,
        f"representation must be one of {REPRESENTATIONS}, got {representation!r}",
    )
    require(
        mask is None or representation == "points",
        'a node mask is only meaningful with representation="points"',
    )


class Denoiser(nn.Module):
    """Wrap a raw network ``net(x, c_noise, **cond)`` into the denoiser contract.

    Args:
        net: module called as ``net(x_in, c_noise, **cond)`` returning a tensor shaped like
            ``x_in``; for point clouds the node mask is passed as ``mask=`` in ``cond``.
        schedule: the noise process.
        prediction: what ``net`` predicts: "eps", "x0" or "v".
        c_noise: "log_snr" (c_noise = −λ/8 = ¼ log(σ/α)) or "t" (c_noise = t).
        precondition: EDM preconditioning (requires ``prediction="x0"``).
        sigma_data: σ_data of EDM's preconditioning (data standard deviation).
        representation: "grid" or "points" (zero-COM projection and node masking).
    """

    def __init__(
        self,
        net: nn.Module | Callable[..., torch.Tensor],
        schedule: NoiseSchedule,
        prediction: str = "eps",
        *,
        c_noise: str = "log_snr",
        precondition: bool = False,
        sigma_data: float = 0.5,
        representation: str = "grid",
    ) -> None:
        super().__init__()
        require(prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}")
        require(c_noise in ("log_snr", "t"), f'c_noise must be "log_snr" or "t", got {c_noise!r}')
        require(
            not precondition or prediction == "x0",
            'EDM preconditioning predicts x0: use prediction="x0" with precondition=True',
        )
        require(sigma_data > 0, f"sigma_data must be > 0, got {sigma_data}")
        _check_representation(representation, None)
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.c_noise = c_noise
        self.precondition = bool(precondition)
        self.sigma_data = float(sigma_data)
        self.representation = representation

    def config(self) -> dict[str, Any]:
        """JSON-ready settings (without the network) that rebuild this wrapper with
        ``Denoiser(net, make_schedule(**c["schedule"]), **{k: v for k != "schedule"})``."""
        return {
            "schedule": self.schedule.config(),
            "prediction": self.prediction,
            "c_noise": self.c_noise,
            "precondition": self.precondition,
            "sigma_data": self.sigma_data,
            "representation": self.representation,
        }

    def noise_label(
        self, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """The (B,) c_noise passed to the network for per-sample times ``t``."""
        if self.c_noise == "t":
            return t
        return 0.25 * (sigma.log() - alpha.log())

    def forward(
        self, x_t: torch.Tensor, t: TimeLike, mask: torch.Tensor | None = None, **cond: Any
    ) -> DenoiserOutput:
        """Denoise ``x_t`` at time ``t`` (scalar or (B,)); ``cond`` goes to the network."""
        _check_representation(self.representation, mask)
        tt = per_sample_time(t, x_t)
        alpha, sigma = self.schedule.alpha_sigma(tt)
        if self.representation == "points" and mask is not None:
            x_t = x_t * node_mask_like(mask, x_t)
            cond = {**cond, "mask": mask}
        c_noise = self.noise_label(tt, alpha, sigma).to(x_t.dtype)
        if self.precondition:
            sd = self.sigma_data
            st = sigma / alpha
            x_s = x_t / expand_like(alpha, x_t)
            c_in = 1.0 / (st**2 + sd**2).sqrt()
            c_skip = sd**2 / (st**2 + sd**2)
            c_out = st * sd / (st**2 + sd**2).sqrt()
            f = self.net(expand_like(c_in, x_t) * x_s, c_noise, **cond)
            x0 = expand_like(c_skip, x_t) * x_s + expand_like(c_out, x_t) * f
            eps = (x_t - expand_like(alpha, x_t) * x0) / expand_like(sigma, x_t)
        else:
            raw = self.net(x_t, c_noise, **cond)
            require(
                raw.shape == x_t.shape,
                f"network output shape {tuple(raw.shape)} != input shape {tuple(x_t.shape)}",
            )
            x0, eps = x0_eps_from_prediction(raw, x_t, alpha, sigma, self.prediction)
        return _finish(x0, eps, sigma, self.representation, mask)


class AnalyticGaussianDenoiser(nn.Module):
    """Exact denoiser for data x0 ~ N(μ, diag(s²)).

    x_t | x0 ~ N(α x0, σ²), so p_t = N(α μ, α² s² + σ²) and
    E[x0 | x_t] = μ + α s²/(α² s² + σ²) (x_t − α μ), score = −(x_t − α μ)/(α² s² + σ²),
    ε̂ = σ (x_t − α μ)/(α² s² + σ²). ``mean`` and ``std`` broadcast against one sample
    (e.g. shape (2,) for 2-D points, (C,H,W) for images); extra ``cond`` is ignored.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        mean: torch.Tensor | float,
        std: torch.Tensor | float,
        representation: str = "grid",
    ) -> None:
        super().__init__()
        _check_representation(representation, None)
        self.schedule = schedule
        self.representation = representation
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64))
        require(bool((self.std > 0).all()), "AnalyticGaussianDenoiser needs std > 0")

    def marginal_var(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """Variance α² s² + σ² of p_t, broadcast against ``x``."""
        tt = per_sample_time(t, x)
        a, s = (expand_like(v, x) for v in self.schedule.alpha_sigma(tt))
        return a**2 * self.std.to(x) ** 2 + s**2

    def forward(
        self, x_t: torch.Tensor, t: TimeLike, mask: torch.Tensor | None = None, **cond: Any
    ) -> DenoiserOutput:
        """Exact (x0, eps, score) at (x_t, t)."""
        _check_representation(self.representation, mask)
        tt = per_sample_time(t, x_t)
        alpha, sigma = self.schedule.alpha_sigma(tt)
        a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
        mu, sd = self.mean.to(x_t), self.std.to(x_t)
        var = a**2 * sd**2 + s**2
        r = x_t - a * mu
        x0 = mu + a * sd**2 / var * r
        eps = s * r / var
        if self.representation == "points":
            x0, eps = _points_project(x0, eps, mask)
        return DenoiserOutput(x0=x0, eps=eps, score=-r / var)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of the clean data distribution (float64)."""
        shape = torch.broadcast_shapes(self.mean.shape, self.std.shape)
        z = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
        return self.mean + self.std * z


class AnalyticGMMDenoiser(nn.Module):
    """Exact denoiser for a Gaussian mixture x0 ~ Σ_k w_k N(μ_k, diag(s_k²)).

    Under x_t = α x0 + σ ε each component becomes N(α μ_k, v_k), v_k = α² s_k² + σ², with
    responsibilities γ_k(x_t) ∝ w_k N(x_t; α μ_k, v_k); the posterior mean is
    Σ_k γ_k [μ_k + α s_k²/v_k (x_t − α μ_k)], the score Σ_k γ_k (−(x_t − α μ_k)/v_k) and
    ε̂ = −σ · score. ``means`` has shape (K, *event); ``stds`` (K, *event) or (K,).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        weights: torch.Tensor,
        means: torch.Tensor,
        stds: torch.Tensor,
        representation: str = "grid",
    ) -> None:
        super().__init__()
        _check_representation(representation, None)
        self.schedule = schedule
        self.representation = representation
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        sd = torch.as_tensor(stds, dtype=torch.float64)
        require(w.ndim == 1 and mu.shape[0] == w.shape[0], "weights (K,) and means (K, ...)")
        require(bool((w > 0).all()) and bool((sd > 0).all()), "weights and stds must be > 0")
        if sd.ndim == 1:
            sd = sd.reshape(-1, *((1,) * (mu.ndim - 1)))
        sd = sd.expand_as(mu).clone()
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("means", mu)
        self.register_buffer("stds", sd)

    def forward(
        self, x_t: torch.Tensor, t: TimeLike, mask: torch.Tensor | None = None, **cond: Any
    ) -> DenoiserOutput:
        """Exact (x0, eps, score) at (x_t, t)."""
        _check_representation(self.representation, mask)
        tt = per_sample_time(t, x_t)
        alpha, sigma = self.schedule.alpha_sigma(tt)
        a = expand_like(alpha, x_t).unsqueeze(1)  # (B, 1, 1.., 1)
        s = expand_like(sigma, x_t).unsqueeze(1)
        mu, sd = self.means.to(x_t).unsqueeze(0), self.stds.to(x_t).unsqueeze(0)  # (1, K, ...)
        var = a**2 * sd**2 + s**2
        r = x_t.unsqueeze(1) - a * mu  # (B, K, ...)
        logp = -0.5 * (r**2 / var + var.log() + math.log(2 * math.pi)).flatten(2).sum(-1)
        gamma = torch.softmax(logp + self.weights.to(x_t).log(), dim=1)  # (B, K)
        g = gamma.reshape(*gamma.shape, *((1,) * (x_t.ndim - 1)))
        x0 = (g * (mu + a * sd**2 / var * r)).sum(1)
        score = (g * (-r / var)).sum(1)
        eps = -expand_like(sigma, x_t) * score
        if self.representation == "points":
            x0, eps = _points_project(x0, eps, mask)
            score = -eps / expand_like(sigma, x_t)
        return DenoiserOutput(x0=x0, eps=eps, score=score)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of the clean mixture (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z
