"""Noise processes as objects, in continuous time t ∈ [0, 1].

Every schedule defines the Gaussian perturbation kernel

    x_t = α(t) x_0 + σ(t) ε,   ε ~ N(0, I)                     (Kingma et al. 2021, Eq. 1)

with log-SNR λ(t) = log(α²/σ²), decreasing in t. The same marginals are those of the
linear SDE dx = f(t) x dt + g(t) dw (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", Eq. 5) with

    f(t) = d log α / dt,     g²(t) = dσ²/dt − 2 f(t) σ²(t)     (Kingma et al. 2021, Eq. 33)

so that the mean follows m' = f m and the variance v' = 2 f v + g². For a variance-
preserving (VP) schedule α² + σ² = 1 and this reduces to f = −β/2, g² = β. For the
variance-exploding (VE) schedule α = 1, f = 0 and g² = dσ²/dt.

Schedules (``make_schedule(name, **params)`` builds one from its name):

- ``linear`` — VP with linear β(t) = β_min + t (β_max − β_min) (Song et al. 2021, Eq. 11),
  the continuous limit of DDPM's β_i from 1e-4 to 0.02 over T = 1000 steps
  (β_min = T·1e-4 = 0.1, β_max = T·0.02 = 20; ``LinearSchedule.from_discrete``).
- ``cosine`` — VP with ᾱ = cos²(φ)/cos²(φ0), φ = (τ + s)/(1 + s)·π/2, s = 0.008 (Nichol &
  Dhariwal 2021, Eq. 17), stopped at log-SNR −10 at t = 1 (τ = t·τ_max).
- ``polynomial_2`` — VP with α²(t) = (1 − 2s)(1 − t²)² + s, s = 1e-5 (Hoogeboom et al. 2022).
- ``ve`` (alias ``edm``) — α = 1 and σ(t) = (σ_min^{1/ρ} + t (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ
  (Karras et al. 2022, Eq. 5, with t the normalised step index), so a uniform grid in t is
  exactly EDM's ρ = 7 discretisation.

All coefficient computations are done in the dtype of ``t`` (a Python float becomes a
float64 tensor); callers broadcast per-sample values with
:func:`cryoprior.core.tensors.expand_like`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.tensors import expand_like

TimeLike = float | torch.Tensor


def as_time(t: TimeLike, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as a float tensor: float64 for Python numbers (on ``like``'s device if given)."""
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    device = like.device if like is not None else None
    dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64
    return torch.tensor(float(t), dtype=dtype, device=device)


class NoiseSchedule(ABC):
    """A Gaussian noise process x_t = α(t) x0 + σ(t) ε on t ∈ [0, 1] (t = 1: pure noise).

    Subclasses implement α², σ², their time derivatives and the inverse of the log-SNR;
    everything else (α, σ, λ, the SDE coefficients, the marginal, the time grid) is derived
    here.
    """

    #: "vp" (α² + σ² = 1) or "ve" (α = 1)
    kind: str = "vp"
    #: the name understood by :func:`make_schedule`
    name: str = ""

    # --- what a subclass defines -------------------------------------------------------
    @abstractmethod
    def alpha2(self, t: TimeLike) -> torch.Tensor:
        """α(t)²."""

    @abstractmethod
    def sigma2(self, t: TimeLike) -> torch.Tensor:
        """σ(t)² (computed without cancellation where 1 − α² would lose precision)."""

    @abstractmethod
    def d_alpha2(self, t: TimeLike) -> torch.Tensor:
        """dα²/dt."""

    @abstractmethod
    def d_sigma2(self, t: TimeLike) -> torch.Tensor:
        """dσ²/dt."""

    @abstractmethod
    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The time t at which λ(t) = ``log_snr`` (clamped to [0, 1])."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Parameters that rebuild this schedule: ``make_schedule(**s.config())``."""

    # --- derived quantities ----------------------------------------------------------
    def alpha(self, t: TimeLike) -> torch.Tensor:
        """Signal scale α(t)."""
        return self.alpha2(t).sqrt()

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """Noise scale σ(t)."""
        return self.sigma2(t).sqrt()

    def alpha_sigma(self, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t))."""
        return self.alpha(t), self.sigma(t)

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        """λ(t) = log(α²/σ²), strictly decreasing in t (−inf/+inf where σ or α is 0)."""
        return self.alpha2(t).log() - self.sigma2(t).log()

    def snr(self, t: TimeLike) -> torch.Tensor:
        """α²/σ²."""
        return self.alpha2(t) / self.sigma2(t)

    def drift(self, t: TimeLike) -> torch.Tensor:
        """f(t) = d log α / dt = ½ (dα²/dt)/α² of the forward SDE dx = f x dt + g dw."""
        return 0.5 * self.d_alpha2(t) / self.alpha2(t)

    def diffusion2(self, t: TimeLike) -> torch.Tensor:
        """g(t)² = dσ²/dt − 2 f(t) σ²(t) (Kingma et al. 2021, Eq. 33)."""
        return self.d_sigma2(t) - 2.0 * self.drift(t) * self.sigma2(t)

    def marginal(self, x0: torch.Tensor, t: TimeLike, noise: torch.Tensor) -> torch.Tensor:
        """x_t = α(t) x0 + σ(t) ε; ``t`` scalar or per-sample (B,)."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * noise

    def prior_std(self) -> float:
        """Standard deviation of the sampling prior N(0, prior_std² I) at t = 1."""
        t1 = torch.tensor(1.0, dtype=torch.float64)
        return float((self.alpha2(t1) + self.sigma2(t1)).sqrt())

    def prior_sample(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw x_1 ~ N(0, prior_std² I) (for point clouds use the samplers' zero-COM noise)."""
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self.prior_std() * z

    def timesteps(
        self,
        n_steps: int,
        t_start: float = 1.0,
        t_end: float = 0.0,
        spacing: str = "uniform",
        rho: float = 7.0,
        sigma_min: float = 0.002,
    ) -> torch.Tensor:
        """A decreasing grid of ``n_steps + 1`` times from ``t_start`` to ``t_end`` (float64).

        ``spacing="uniform"``: uniform in t (for the VE schedule uniform t *is* EDM's
        ρ-spacing of σ). ``spacing="edm"``: σ̃ = σ/α follows EDM's ρ-spacing (Karras et al.
        2022, Eq. 5) from σ̃(t_start) to max(σ̃(t_end), ``sigma_min``); the last time is then
        where σ̃ = sigma_min when σ̃(t_end) is smaller (samplers finish with a denoising step
        to σ = 0 there, as EDM's last step does).
        """
        require(int(n_steps) >= 1, f"n_steps must be >= 1, got {n_steps}")
        require(
            0.0 <= t_end < t_start <= 1.0,
            f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}",
        )
        n = int(n_steps)
        if spacing == "uniform":
            return torch.linspace(float(t_start), float(t_end), n + 1, dtype=torch.float64)
        if spacing != "edm":
            raise InputError(f'spacing must be "uniform" or "edm", got {spacing!r}')
        ends = torch.tensor([t_start, t_end], dtype=torch.float64)
        hi, lo = (self.sigma2(ends) / self.alpha2(ends)).sqrt().tolist()
        lo_clamped = max(lo, float(sigma_min))
        require(hi > lo_clamped, f"sigma/alpha at t_start ({hi:.3g}) must exceed {lo_clamped:.3g}")
        i = torch.arange(n + 1, dtype=torch.float64) / n
        st = (hi ** (1 / rho) + i * (lo_clamped ** (1 / rho) - hi ** (1 / rho))) ** rho
        t = self.t_from_log_snr(-2.0 * st.log())
        t[0] = t_start
        if lo_clamped == lo:
            t[-1] = t_end
        return t

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class LinearSchedule(NoiseSchedule):
    """VP schedule with linear β(t) = β_min + t (β_max − β_min) (Song et al. 2021, Eq. 11).

    log α²(t) = −½ t² (β_max − β_min) − t β_min. The DDPM discretisation over T steps has
    β_i = β(i/T)/T (Ho et al. 2020: 1e-4 → 0.02 for T = 1000 is β_min = 0.1, β_max = 20).
    """

    kind = "vp"
    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min = require_positive(beta_min, "beta_min")
        self.beta_max = require_positive(beta_max, "beta_max")
        require(self.beta_max > self.beta_min, "beta_max must be larger than beta_min")

    @classmethod
    def from_discrete(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, n_train_steps: int = 1000
    ) -> LinearSchedule:
        """The continuous equivalent of DDPM's linear β_i from beta_start to beta_end over T."""
        return cls(beta_start * n_train_steps, beta_end * n_train_steps)

    def _log_alpha2(self, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        return -0.5 * t**2 * (self.beta_max - self.beta_min) - t * self.beta_min

    def beta(self, t: TimeLike) -> torch.Tensor:
        """β(t) = g(t)²."""
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def alpha2(self, t: TimeLike) -> torch.Tensor:
        return self._log_alpha2(t).exp()

    def sigma2(self, t: TimeLike) -> torch.Tensor:
        return -torch.expm1(self._log_alpha2(t))

    def d_alpha2(self, t: TimeLike) -> torch.Tensor:
        return -self.beta(t) * self.alpha2(t)

    def d_sigma2(self, t: TimeLike) -> torch.Tensor:
        return self.beta(t) * self.alpha2(t)

    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        # log α² = logsigmoid(λ); solve ½ Δ t² + β_min t + log α² = 0 for t >= 0.
        la2 = torch.nn.functional.logsigmoid(as_time(log_snr))
        d = self.beta_max - self.beta_min
        t = (-self.beta_min + (self.beta_min**2 - 2.0 * d * la2).sqrt()) / d
        return t.clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


class CosineSchedule(NoiseSchedule):
    """VP cosine schedule ᾱ(t) = cos²(φ(t))/cos²(φ0) (Nichol & Dhariwal 2021, Eq. 17).

    Nichol & Dhariwal use φ(τ) = (τ + s)/(1 + s)·π/2 on τ ∈ [0, 1] with s = 0.008, for which
    ᾱ(1) = 0, and clip the discrete β_t <= 0.999 to keep the last step finite. Here the same
    curve is clipped by stopping it at log-SNR ``log_snr_min`` (default −10, ᾱ(1) ≈ 4.5e-5,
    the value of the linear schedule at t = 1): φ(t) = φ0 + t (φ1 − φ0), φ0 = s/(1+s)·π/2,
    cos²φ1 = sigmoid(log_snr_min)·cos²φ0. This only rescales τ = t·τ_max (τ_max ≈ 0.9957)
    and keeps dᾱ/dt finite and nonzero everywhere; x̂0 = (x_t − σ ε̂)/α at t = 1 is not
    amplified by 1/α ~ 1e4 as it would be at a floor near Nichol's discrete ᾱ_T.
    """

    kind = "vp"
    name = "cosine"

    def __init__(self, s: float = 0.008, log_snr_min: float = -10.0) -> None:
        self.s = float(s)
        require(0.0 <= self.s < 1.0, f"cosine offset s must be in [0, 1), got {s}")
        self.log_snr_min = float(log_snr_min)
        self._phi0 = self.s / (1.0 + self.s) * math.pi / 2
        self._cos2_phi0 = math.cos(self._phi0) ** 2
        a2_min = 1.0 / (1.0 + math.exp(-self.log_snr_min))
        require(self.log_snr_min < 0.0, f"log_snr_min must be < 0, got {log_snr_min}")
        self._phi1 = math.acos(math.sqrt(a2_min * self._cos2_phi0))

    def _phi(self, t: TimeLike) -> torch.Tensor:
        return self._phi0 + as_time(t) * (self._phi1 - self._phi0)

    def alpha2(self, t: TimeLike) -> torch.Tensor:
        return self._phi(t).cos() ** 2 / self._cos2_phi0

    def sigma2(self, t: TimeLike) -> torch.Tensor:
        # 1 − cos²φ/cos²φ0 = sin(φ − φ0) sin(φ + φ0)/cos²φ0 (no cancellation near t = 0)
        phi = self._phi(t)
        return (phi - self._phi0).sin() * (phi + self._phi0).sin() / self._cos2_phi0

    def d_alpha2(self, t: TimeLike) -> torch.Tensor:
        return -(2 * self._phi(t)).sin() * (self._phi1 - self._phi0) / self._cos2_phi0

    def d_sigma2(self, t: TimeLike) -> torch.Tensor:
        return -self.d_alpha2(t)

    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        a2 = torch.sigmoid(as_time(log_snr))
        phi = torch.arccos((a2 * self._cos2_phi0).sqrt().clamp(max=1.0))
        return ((phi - self._phi0) / (self._phi1 - self._phi0)).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "s": self.s, "log_snr_min": self.log_snr_min}


class Polynomial2Schedule(NoiseSchedule):
    """VP schedule α²(t) = (1 − 2s)(1 − t²)² + s, s = 1e-5 (Hoogeboom et al. 2022).

    The e3_diffusion ``polynomial_2`` schedule in continuous time. The discrete variant over T
    steps is α̅²_i = (1 − (i/T)²)² for i < T, with the step ratio α̅²_i/α̅²_{i−1} clipped to
    >= 0.001 (which only changes α̅²_T, from 0 to ~4e-3/T²), followed by the same precision
    adjustment α² ← (1 − 2s) α² + s; it equals this function at t = i/T up to that last
    point. σ² = 1 − α²; λ runs from log((1 − s)/s) ≈ 11.5 at t = 0 to −11.5 at t = 1.
    """

    kind = "vp"
    name = "polynomial_2"

    def __init__(self, s: float = 1e-5) -> None:
        self.s = require_positive(s, "s")
        require(self.s < 0.5, f"polynomial_2 precision s must be < 0.5, got {s}")

    def alpha2(self, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        return (1 - 2 * self.s) * (1 - t**2) ** 2 + self.s

    def sigma2(self, t: TimeLike) -> torch.Tensor:
        # 1 − (1 − t²)² = t² (2 − t²)
        t = as_time(t)
        return (1 - 2 * self.s) * t**2 * (2 - t**2) + self.s

    def d_alpha2(self, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        return -4 * t * (1 - t**2) * (1 - 2 * self.s)

    def d_sigma2(self, t: TimeLike) -> torch.Tensor:
        return -self.d_alpha2(t)

    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        a2 = torch.sigmoid(as_time(log_snr))
        u = ((a2 - self.s) / (1 - 2 * self.s)).clamp(0.0, 1.0).sqrt()  # u = 1 − t²
        return (1 - u).clamp(0.0, 1.0).sqrt()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "s": self.s}


class VESchedule(NoiseSchedule):
    """Variance-exploding EDM schedule: α = 1, σ(t) = (σ_min^{1/ρ} + t Δ)^ρ.

    Δ = σ_max^{1/ρ} − σ_min^{1/ρ}.

    Karras et al. 2022 ("EDM"), Eq. 5 and Table 1: σ_min = 0.002, σ_max = 80, ρ = 7. With t
    the normalised step index, a uniform t grid is EDM's time discretisation; EDM's final
    step to σ = 0 is the samplers' final denoising step. σ(0) = σ_min > 0.
    """

    kind = "ve"
    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min = require_positive(sigma_min, "sigma_min")
        self.sigma_max = require_positive(sigma_max, "sigma_max")
        self.rho = require_positive(rho, "rho")
        require(self.sigma_max > self.sigma_min, "sigma_max must be larger than sigma_min")
        self._a = self.sigma_min ** (1 / self.rho)
        self._b = self.sigma_max ** (1 / self.rho) - self._a

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return (self._a + as_time(t) * self._b) ** self.rho

    def alpha2(self, t: TimeLike) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def sigma2(self, t: TimeLike) -> torch.Tensor:
        return self.sigma(t) ** 2

    def d_alpha2(self, t: TimeLike) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def d_sigma2(self, t: TimeLike) -> torch.Tensor:
        base = self._a + as_time(t) * self._b
        return 2 * self.rho * self._b * base ** (2 * self.rho - 1)

    def prior_std(self) -> float:
        """σ_max: EDM draws x_0 ~ N(0, σ_max² I) (Karras et al. 2022, Alg. 1 line 1)."""
        return self.sigma_max

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time t with σ(t) = ``sigma`` (not clamped)."""
        return (as_time(sigma) ** (1 / self.rho) - self._a) / self._b

    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        return self.t_from_sigma((-0.5 * as_time(log_snr)).exp()).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "rho": self.rho,
        }


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "polynomial_2": Polynomial2Schedule,
    "ve": VESchedule,
    "edm": VESchedule,
}


def make_schedule(name: str, **params: Any) -> NoiseSchedule:
    """Build a schedule from its name (``linear``, ``cosine``, ``polynomial_2``, ``ve``/``edm``)
    and keyword parameters; ``make_schedule(**s.config())`` rebuilds ``s``."""
    key = str(name).lower()
    if key not in SCHEDULES:
        raise InputError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[key](**params)
    except TypeError as e:
        raise InputError(f"bad parameters for schedule {name!r}: {e}") from None
