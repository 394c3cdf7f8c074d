"""Score functions ∇_F log p(F) in image units, for the M-step of MTD's approximate EM.

A learned prior gives the score of its data *smoothed* by the diffusion at time t: with
x_t = α x_net + σ ε (the prior's schedule) and x_net = (F − offset)/scale (the prior's
normalisation, fixed by its training data), the image F seen as a sample of x_t/α has

    ∇_F log p_t(F) = α · s_θ(α x_net, t) / scale,                                    (1)

where s_θ = ∇ log p_t is the denoiser's score (Tweedie: −ε̂/σ). This is the density of the
training images convolved with N(0, σ̃² I), σ̃ = scale·σ(t)/α(t) in image units, so a small
t (σ̃ a few percent of the data range) is a close, smooth stand-in for log p. Zabatani et
al. (2023) use their network's score at t = 1e-2 of a VP linear schedule (β 0.1 → 20),
σ̃ ≈ 0.045 for images in [0, 1]; :data:`DEFAULT_NOISE_LEVEL` keeps that smoothing for any
schedule (:meth:`PriorScore.from_noise_level`).

Units: the prior applies only to images in its training units. MNIST targets are used in
their natural [0, 1) units, so the learned prior applies directly; the MTD measurement
itself does not reveal the target's scale, the prior's training data fix it (an
assumption about the data, not information taken from the truth).

Every score here also reports a *curvature* scale κ ≥ ‖∇² log p‖ (image units⁻²), which the
M-step uses for its step size: exact for the analytic Gaussian, estimated by power
iteration (:func:`estimate_curvature`) for a learned prior.

The Gaussian-image prior (Zabatani et al., Sec. IV-A): 5×5 images F ~ N(μ, I), each entry
of μ uniform on {0, ..., 4}, μ fixed by :data:`GAUSSIAN_MEAN_SEED` for training and test
alike (the paper's code drew μ without a seed in training and with seed 1337 in testing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.diffusion import AnalyticGaussianDenoiser, DenoiserLike, make_schedule
from cryoprior.priors import Prior, PriorMetadata

#: σ̃ = scale·σ(t)/α(t) in image units used by default (≈ the paper's t = 1e-2, VP linear)
DEFAULT_NOISE_LEVEL = 0.045
#: seed of the Gaussian-image prior's mean μ (training and test share it)
GAUSSIAN_MEAN_SEED = 1337
GAUSSIAN_SIZE = 5
GAUSSIAN_LEVELS = 5

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


class PriorScore:
    """∇_F log p_t(F) of a learned prior at diffusion time ``t``, in image units (Eq. 1).

    Args:
        prior: a :class:`~cryoprior.priors.Prior` (its normalisation is used) or a bare
            denoiser (then give ``scale`` and ``offset``: x_phys = scale·x_net + offset).
        t: diffusion time in (0, 1]; small (see the module doc).
        scale, offset: the normalisation for a bare denoiser (ignored for a Prior).
        device: where the network runs (default: where its weights are).

    Calling it on images (..., L, L) returns the score with the same shape and dtype.
    ``noise_level`` is σ̃ in image units; ``curvature_bound`` = 1/σ̃² bounds the score's
    Jacobian for any data distribution (Tweedie: ∇² log p_t = (Cov[x0|x_t]/σ̃² − I)/σ̃²).
    """

    def __init__(
        self,
        prior: Prior | DenoiserLike,
        t: float,
        *,
        scale: float = 1.0,
        offset: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        t = float(t)
        require(0.0 < t <= 1.0, f"the prior's diffusion time t must be in (0, 1], got {t}")
        self._source = (prior, {"scale": scale, "offset": offset, "device": device})
        if isinstance(prior, Prior):
            require(
                prior.representation == "image",
                f"an MTD score needs an image prior, got a {prior.representation} prior",
            )
            self.denoiser = prior.denoiser
            self.scale = prior.metadata.normalisation["scale"]
            self.offset = prior.metadata.normalisation["offset"]
            self.shape: tuple[int, ...] | None = tuple(prior.shape)
        else:
            self.denoiser = prior
            self.scale = require_positive(scale, "normalisation scale")
            self.offset = float(offset)
            self.shape = None
        self.t = t
        tt = torch.tensor(t, dtype=torch.float64)
        self.alpha = float(self.denoiser.schedule.alpha(tt))
        self.sigma = float(self.denoiser.schedule.sigma(tt))
        require(self.sigma > 0, f"the schedule has no noise at t = {t}; choose a larger t")
        params = list(getattr(self.denoiser, "parameters", lambda: [])())
        self.device = (
            torch.device(device)
            if device is not None
            else (params[0].device if params else torch.device("cpu"))
        )
        self.net_dtype = params[0].dtype if params else torch.float64
        if hasattr(self.denoiser, "eval"):
            self.denoiser.eval()

    @classmethod
    def from_noise_level(
        cls, prior: Prior | DenoiserLike, noise_level: float = DEFAULT_NOISE_LEVEL, **kwargs: Any
    ) -> PriorScore:
        """The score at the time t where σ̃ = scale·σ/α equals ``noise_level`` (image units)."""
        require_positive(noise_level, "noise level (image units)")
        scale = (
            prior.metadata.normalisation["scale"]
            if isinstance(prior, Prior)
            else float(kwargs.get("scale", 1.0))
        )
        schedule = prior.denoiser.schedule if isinstance(prior, Prior) else prior.schedule
        log_snr = -2.0 * torch.log(torch.tensor(noise_level / scale, dtype=torch.float64))
        t = float(schedule.t_from_log_snr(log_snr))
        return cls(prior, max(t, 1e-6), **kwargs)

    def at_noise_level(self, noise_level: float) -> PriorScore:
        """The same prior's score at another smoothing σ̃ (image units); shares the network."""
        prior, kwargs = self._source
        return PriorScore.from_noise_level(prior, noise_level, **kwargs)

    @property
    def noise_level(self) -> float:
        """σ̃ = scale·σ(t)/α(t): the smoothing of the prior, in image units."""
        return self.scale * self.sigma / self.alpha

    @property
    def curvature_bound(self) -> float:
        """1/σ̃²: no eigenvalue of ∇² log p_t exceeds it in magnitude on the concave side."""
        return 1.0 / self.noise_level**2

    def _net_input(self, image: torch.Tensor) -> torch.Tensor:
        L = image.shape[-1]
        shape = self.shape if self.shape is not None else (1, image.shape[-2], L)
        require(
            tuple(image.shape[-2:]) == tuple(shape[-2:]),
            f"the prior models {shape[-2]}×{shape[-1]} images, got {tuple(image.shape[-2:])}",
        )
        x = (image.reshape(-1, *shape) - self.offset) / self.scale
        return (self.alpha * x).to(self.device, self.net_dtype)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """∇_F log p_t(F) (Eq. 1) for images (..., L, L); same shape and dtype."""
        out = self.denoiser(self._net_input(image), self.t)
        score = self.alpha * out.score / self.scale
        return score.to(image.device, image.dtype).reshape(image.shape)

    @torch.no_grad()
    def denoise(self, image: torch.Tensor) -> torch.Tensor:
        """E[F₀ | F] for F = F₀ + σ̃ ε, in image units (Tweedie; F + σ̃² · score)."""
        return image + self.noise_level**2 * self(image)


class GaussianScore:
    """The exact score of N(μ, s² I) smoothed by N(0, σ̃² I): −(F − μ)/(s² + σ̃²).

    ``curvature`` = 1/(s² + σ̃²) is exact. With ``noise_level`` 0 it is the Gaussian's own
    score; :class:`PriorScore` of :func:`gaussian_image_prior` at time t equals this with
    σ̃ = its ``noise_level``.
    """

    def __init__(self, mean: torch.Tensor, std: float = 1.0, noise_level: float = 0.0) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = require_positive(std, "std")
        require(noise_level >= 0, f"noise level must be >= 0, got {noise_level}")
        self.noise_level = float(noise_level)
        self.curvature = 1.0 / (self.std**2 + self.noise_level**2)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """−(F − μ)/(s² + σ̃²) for images (..., L, L)."""
        return -(image - self.mean.to(image)) * self.curvature


def estimate_curvature(
    score: ScoreFn,
    image: torch.Tensor,
    direction: torch.Tensor | None = None,
    iters: int = 3,
    eps: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, torch.Tensor | None]:
    """Largest |eigenvalue| of the score's Jacobian at ``image``, by power iteration.

    J v is taken by central differences, (s(F + h v) − s(F − h v))/(2h), with
    h = ``eps`` (default 1e-3·max(1, RMS(F))) in image units. Returns ‖J v‖ for the final
    unit vector v (at least the Rayleigh quotient) and v, to warm-start the next call.
    A score with an exact ``curvature`` attribute returns it without evaluating anything.
    """
    exact = getattr(score, "curvature", None)
    if exact is not None:
        return float(exact), direction
    require(int(iters) >= 1, f"power iterations must be >= 1, got {iters}")
    x = image.to(torch.float64)
    h = float(eps) if eps is not None else 1e-3 * max(1.0, float(x.pow(2).mean().sqrt()))
    v = direction
    if v is None or v.shape != image.shape or not bool(v.abs().sum() > 0):
        v = torch.randn(image.shape, generator=generator, dtype=torch.float64)
    v = v.to(torch.float64)
    v = v / v.norm()
    value = 0.0
    for _ in range(int(iters)):
        jv = (score(x + h * v) - score(x - h * v)).to(torch.float64) / (2 * h)
        value = float(jv.norm())
        if value == 0.0:
            break
        v = jv / value
    return value, v


# ----------------------------------------------------------------------- Gaussian images


def gaussian_image_mean(
    size: int = GAUSSIAN_SIZE, levels: int = GAUSSIAN_LEVELS, seed: int = GAUSSIAN_MEAN_SEED
) -> torch.Tensor:
    """μ (size, size) float64 with entries uniform on {0, ..., levels − 1}, from ``seed``."""
    require(int(size) >= 1 and int(levels) >= 1, "size and levels must be >= 1")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, int(levels), (int(size), int(size)), generator=g).to(torch.float64)


def sample_gaussian_images(
    n: int,
    mean: torch.Tensor | None = None,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n images (n, L, L) float64 from N(μ, std² I) (μ default :func:`gaussian_image_mean`)."""
    mu = gaussian_image_mean() if mean is None else torch.as_tensor(mean, dtype=torch.float64)
    z = torch.randn((int(n), *mu.shape), generator=generator, dtype=torch.float64)
    return mu + float(std) * z


def gaussian_image_prior(
    size: int = GAUSSIAN_SIZE,
    levels: int = GAUSSIAN_LEVELS,
    seed: int = GAUSSIAN_MEAN_SEED,
    std: float = 1.0,
    schedule: str = "cosine",
) -> Prior:
    """The analytic prior N(μ, std² I) on size×size images as a :class:`Prior`.

    Its denoiser is :class:`~cryoprior.diffusion.AnalyticGaussianDenoiser` (exact at every
    t), normalisation identity, pixel size 1 Å/px (MTD images carry no physical size).
    """
    mu = gaussian_image_mean(size, levels, seed)
    sched = make_schedule(schedule)
    denoiser = AnalyticGaussianDenoiser(sched, mu[None], float(std))
    meta = PriorMetadata(
        representation="image",
        shape=(1, int(size), int(size)),
        pixel_size=1.0,
        diffusion={"schedule": sched.config(), "analytic": "gaussian"},
        data={"kind": "gaussian-images", "levels": int(levels), "seed": int(seed), "std": std},
    )
    return Prior(denoiser=denoiser, metadata=meta)  # type: ignore[arg-type]
