"""Diffusion posterior sampling: a diffusion prior plus a measurement y = A(x) + n.

The sampler walks the prior's reverse diffusion (DDPM ancestral steps, or DDIM for fewer
steps) and pulls every step towards the measurement. Four guidance rules
(``guidance=``: "dps", "pigdm", "dps_x0", "pigdm_dc"), each described, with its cost per
step, in :mod:`cryoprior.solvers.dps_guidance`. "pigdm" (Π-GDM) and "dps_x0" are exact
for a Gaussian prior and a linear A (up to time discretisation); "dps" and "pigdm_dc"
are approximations.

Units. The sampler works in the prior's NETWORK space; the operator works on physical
values. With the prior's normalisation x_phys = scale · x_net + offset
(``cryoprior.priors``) and an intensity factor c between the measurement and the prior's
physical units (the measurement is y = c · A(x_phys) + n), the network-space operator is
x_net ↦ c · A(scale · x_net + offset). c must come from the measurement, never from a
ground truth: :func:`estimate_intensity_scale` gets it from the images' DC terms (the
integral of the imaged map, :func:`cryoprior.physics.measurement.estimate_map_integral`)
divided by the integral the prior's physical units give the molecule (e.g.
:func:`potential_integral` of its composition for ``atoms_to_map`` potentials, or
Σ amplitudes for Cα blobs).

Antithetic pairs (``antithetic=True``, maps only): the samples of a batch come in pairs
whose every random draw (the start x_T and each step's injected noise) is the other's
negative. Each sample is still a draw of the same sampler; the pair's mean cancels the
part of the samples' spread that is odd in the noise (antithetic variates). For a
Gaussian prior and a linear A every step is affine in the noise, so a pair's mean is the
same for every draw (for "pigdm" and "dps_x0", the posterior mean up to time
discretisation); with a learned prior it removes the random detail that the
sampler invents where the data are silent (fine shells at many particles), which
dominates the Monte-Carlo error of a mean of a few independent samples.

Point clouds: noise is drawn in the zero-centre-of-mass subspace, the COM is removed
after every step and checked (Hoogeboom et al. 2022); ``mask`` marks real nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.core.runtime import progress
from cryoprior.diffusion import (
    DenoiserLike,
    DenoiserOutput,
    assert_zero_com,
    ddim_step,
    ddpm_step,
    draw_noise,
    remove_mean,
)
from cryoprior.physics.composition import potential_integral
from cryoprior.physics.measurement import estimate_intensity_scale
from cryoprior.physics.operators import (
    LinearOperator,
    Operator,
)
from cryoprior.priors import Prior
from cryoprior.solvers.dps_guidance import GUIDANCES, Guidance, NetworkOperator, norms

STEPS = ("ddpm", "ddim")

Callback = Callable[[int, torch.Tensor, DenoiserOutput], torch.Tensor | None]


# ---------------------------------------------------------------------------------------
# result


@dataclass
class DPSResult:
    """Posterior samples and their summary, in PHYSICAL units.

    ``samples`` (n_samples, *shape); ``mean`` and ``std`` (per-voxel / per-coordinate
    spread over the samples, 0 for one sample) (*shape); ``residual_history``
    (n_steps, n_samples): ‖y − A(x̂0)‖ of the x̂0 each step used (the conditional one for
    "pigdm" and "dps_x0"); ``residual_norm`` (n_samples,): ‖y − c·A(x)‖ of the returned
    samples; ``target_residual_norm``: σ √M, the residual of the true signal (None when no
    σ was given); ``config``: the settings, for the record.
    """

    samples: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    residual_history: torch.Tensor
    residual_norm: torch.Tensor
    target_residual_norm: float | None
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# sampler


class _Sampler(Guidance):
    """One chunk of samples: the guided reverse diffusion (rules: :class:`Guidance`)."""

    def __init__(
        self,
        denoiser: DenoiserLike,
        a_net: NetworkOperator,
        y: torch.Tensor,
        noise_sigma: float | None,
        zeta: float,
        guidance: str,
        step: str,
        eta: float,
        data_std: float,
        n_inner: int,
        mask: torch.Tensor | None,
        generator: torch.Generator | None,
        pigdm_clip: float = 2.0,
        prior_power: torch.Tensor | None = None,
        antithetic: bool = False,
    ) -> None:
        self.pigdm_clip, self.antithetic = pigdm_clip, antithetic
        self.prior_power = prior_power
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.a_net, self.y, self.noise_sigma = a_net, y, noise_sigma
        self.zeta, self.guidance, self.step_name, self.eta = zeta, guidance, step, eta
        self.data_std, self.n_inner = data_std, n_inner
        self.mask, self.generator = mask, generator
        self.points = getattr(denoiser, "representation", "grid") == "points"

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard noise shaped like ``like``; with antithetic pairs, sample j + B/2 gets
        the negative of sample j's draw."""
        if self.antithetic:
            half = self.noise_draw(like[: like.shape[0] // 2])
            return torch.cat([half, -half])
        return self.noise_draw(like)

    def noise_draw(self, like: torch.Tensor) -> torch.Tensor:
        return draw_noise(
            like.shape,
            points=self.points,
            mask=self.mask,
            generator=self.generator,
            dtype=like.dtype,
            device=like.device,
        )

    # -- the reverse step --------------------------------------------------------------
    def reverse_step(
        self, x: torch.Tensor, out: DenoiserOutput, t: float, s: float
    ) -> torch.Tensor:
        """DDPM ancestral (Ho et al. 2020, Alg. 2) or DDIM (Song et al. 2021, Eq. 12)."""
        stochastic = float(self.schedule.sigma(s)) > 0
        if self.step_name == "ddpm":
            return ddpm_step(self.schedule, x, out, t, s, self.noise(x) if stochastic else None)
        eta = self.eta if stochastic else 0.0
        noise = self.noise(x) if eta > 0 else None
        return ddim_step(self.schedule, x, out, t, s, eta, noise)

    def run(
        self, x: torch.Tensor, grid: list[float], callback: Callback | None, show_progress: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.project(x)
        history = []
        n = len(grid) - 1
        for i in progress(
            range(n), total=n, desc=f"posterior ({self.guidance})", enabled=show_progress
        ):
            t, s = grid[i], grid[i + 1]
            if self.guidance == "dps":
                out, res, grad = self.guide_dps(x, t)
                x_next = self.reverse_step(x, out, t, s) - self.zeta * grad
            elif self.guidance in ("pigdm", "pigdm_dc"):
                out, res = self.guide_pigdm(x, t)
                x_next = self.reverse_step(x, out, t, s)
            else:
                out, res = self.guide_x0(x, t)
                x_next = self.reverse_step(x, out, t, s)
            history.append(res)
            if callback is not None:
                r = callback(i, x_next, out)
                x_next = r if r is not None else x_next
            x = x_next.detach()
            if self.points:
                x = remove_mean(x, self.mask)
                assert_zero_com(x, self.mask)
        if float(self.schedule.sigma(grid[-1])) > 0:
            with torch.no_grad():
                x = self.project(self.denoise(x, grid[-1]).x0)
        return x, torch.stack(history)


def dps_sample(
    model: Prior | DenoiserLike,
    operator: Operator,
    y: torch.Tensor,
    noise_sigma: float | None = None,
    n_steps: int = 1000,
    zeta: float = 1.0,
    *,
    guidance: str = "dps",
    sampler: str = "ddpm",
    eta: float = 0.0,
    n_samples: int = 1,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    normalisation: dict[str, float] | None = None,
    intensity_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    data_std: float = 1.0,
    n_inner: int = 20,
    spacing: str = "uniform",
    pigdm_clip: float = 2.0,
    prior_power: torch.Tensor | None = None,
    antithetic: bool = False,
    show_progress: bool = False,
    callback: Callback | None = None,
) -> DPSResult:
    """Draw ``n_samples`` posterior samples of x given y = c · A(x) + n (see module doc).

    Args:
        model: a :class:`~cryoprior.priors.Prior` (denoiser, shape and normalisation are
            taken from it) or a bare denoiser (the contract of ``cryoprior.diffusion``).
        operator: the forward model A on physical values; must be a
            :class:`~cryoprior.physics.operators.LinearOperator` for ``"pigdm"``.
        y: the measurement, the operator's range shape (e.g. (K, D, D) images).
        noise_sigma: σ of the measurement noise in y's units (e.g. from
            :func:`~cryoprior.physics.measurement.estimate_noise_sigma`); required for
            ``"pigdm"`` and ``"dps_x0"``, reported as σ√M for ``"dps"``.
        n_steps: reverse steps on ``schedule.timesteps(n_steps, spacing=spacing)``.
        zeta: the DPS step ζ (network units; the DPS code's ``scale``), ``"dps"`` only.
        guidance: ``"dps"``, ``"pigdm"`` or ``"dps_x0"``.
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"`` (``eta`` = its η; fewer steps).
        n_samples, batch_size: how many samples, and how many at once (default all).
        generator: torch Generator of every random draw (reproducible).
        x_T: starting points (n_samples, *shape) in network units (default prior noise).
        shape: one sample's network-space shape (default the prior's, else the
            operator's domain shape), e.g. (1, D, D, D) for a map prior.
        normalisation: ``{"scale", "offset"}`` with x_phys = scale·x_net + offset (default
            the prior's, else the identity).
        intensity_scale: c, from :func:`estimate_intensity_scale` (never from a truth).
        mask: (N,) or (n_samples, N) node mask for point clouds (1 = real node).
        data_std: s, the prior's per-element std in network units (r_t² of "pigdm" and
            "dps_x0").
        n_inner: CG (linear) or L-BFGS (non-linear) iterations of "pigdm" / "dps_x0".
        pigdm_clip: "pigdm" caps the norm of its x̂0 correction (σ_t²/α_t)Jᵀv at this
            multiple of the Gaussian-prior correction r_t²v (see ``guide_pigdm``).
        prior_power: optional prior variance per Fourier coefficient (network units, on
            the rfft grid of one sample's last three axes, unitary: white noise of std s
            has s² everywhere) replacing ``data_std``² in r_t² of "pigdm", "pigdm_dc"
            and "dps_x0" (:func:`cryoprior.solvers.prior_spectrum.protein_power`): a
            map's power falls by orders of magnitude from low to high frequency, and a
            white r_t² underweights the data where they are most informative.
        antithetic: draw the samples of each batch in antithetic pairs (module doc; map
            priors only; needs an even ``batch_size``, default ``n_samples``).
        show_progress, callback: progress bar; ``callback(step, x, out)`` after each step
            (network units; a returned tensor replaces x).
    """
    require(guidance in GUIDANCES, f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    require(sampler in STEPS, f"sampler must be one of {STEPS}, got {sampler!r}")
    require(int(n_steps) >= 1 and int(n_samples) >= 1, "need n_steps >= 1 and n_samples >= 1")
    require(eta >= 0, f"eta must be >= 0, got {eta}")
    require(float(zeta) >= 0 and math.isfinite(float(zeta)), f"zeta must be >= 0, got {zeta}")
    require(int(n_inner) >= 1, f"n_inner must be >= 1, got {n_inner}")
    require_positive(data_std, "data_std")
    require_positive(pigdm_clip, "pigdm_clip")
    if prior_power is not None:
        want = (*tuple(shape or ())[-3:-1], tuple(shape or (0,))[-1] // 2 + 1)
        require(
            shape is None or tuple(prior_power.shape) == want,
            f"prior_power must be on the rfft grid {want}, got {tuple(prior_power.shape)}",
        )
        require(bool((prior_power > 0).all()), "prior_power must be positive everywhere")
    gain = require_positive(intensity_scale, "intensity scale")
    if noise_sigma is not None:
        noise_sigma = require_positive(noise_sigma, "noise sigma")
    if guidance != "dps":
        require(noise_sigma is not None, f'guidance "{guidance}" needs the noise sigma')
    if guidance in ("pigdm", "pigdm_dc"):
        require(
            isinstance(operator, LinearOperator),
            'guidance "pigdm" needs a linear operator; use "dps" or "dps_x0"',
        )
    operator.range_batch_shape(y)
    require(
        tuple(y.shape) == tuple(operator.range_shape),
        f"y must have the operator's range shape {operator.range_shape}, got {tuple(y.shape)}",
    )

    if isinstance(model, Prior):
        denoiser: DenoiserLike = model.denoiser
        model.denoiser.eval()
        shape = tuple(shape) if shape is not None else tuple(model.shape)
        norm = dict(normalisation) if normalisation is not None else model.metadata.normalisation
    else:
        denoiser = model
        shape = tuple(shape) if shape is not None else tuple(operator.domain_shape)
        norm = dict(normalisation) if normalisation is not None else {"scale": 1.0, "offset": 0.0}
    require(set(norm) == {"scale", "offset"}, "normalisation needs keys scale and offset")
    scale, offset = require_positive(norm["scale"], "normalisation scale"), float(norm["offset"])
    points = getattr(denoiser, "representation", "grid") == "points"

    n = int(n_samples)
    chunk = int(batch_size) if batch_size else n
    require(chunk >= 1, f"batch_size must be >= 1, got {batch_size}")
    if antithetic:
        require(not points, "antithetic pairs are for map priors, not point clouds")
        require(
            chunk % 2 == 0 and n % chunk == 0,
            f"antithetic pairs need an even number of samples per batch, got {n} samples "
            f"in batches of {chunk}: ask for an even number of samples",
        )
    if x_T is not None:
        require(
            tuple(x_T.shape) == (n, *shape),
            f"x_T must have shape {(n, *shape)}, got {tuple(x_T.shape)}",
        )
    full_mask = _expand_mask(mask, n, shape, points)
    if full_mask is not None:
        full_mask = full_mask.to(y.device)

    a_net = NetworkOperator(operator, scale, offset, gain)
    a_net.prepare(y)
    schedule = denoiser.schedule
    grid = schedule.timesteps(int(n_steps), spacing=spacing).tolist()

    samples, histories = [], []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        m = None if full_mask is None else full_mask[start : start + b]
        run = _Sampler(
            denoiser,
            a_net,
            y,
            noise_sigma,
            float(zeta),
            guidance,
            sampler,
            float(eta),
            float(data_std),
            int(n_inner),
            m,
            generator,
            float(pigdm_clip),
            None if prior_power is None else prior_power.to(device=y.device, dtype=y.dtype),
            bool(antithetic),
        )
        if x_T is not None:
            x = x_T[start : start + b].to(device=y.device, dtype=y.dtype)
        else:
            x = schedule.prior_std() * run.noise(
                torch.empty((b, *shape), dtype=y.dtype, device=y.device)
            )
        x, hist = run.run(x, grid, callback, show_progress)
        samples.append(x)
        histories.append(hist)

    x_net = torch.cat(samples)
    with torch.no_grad():
        residual = norms(a_net(x_net) - y)
    x_phys = scale * x_net + offset
    if full_mask is not None:
        x_phys = x_phys * full_mask.to(x_phys)[..., None]
    mean = x_phys.mean(dim=0)
    std = x_phys.std(dim=0) if n > 1 else torch.zeros_like(mean)
    target = None if noise_sigma is None else noise_sigma * math.sqrt(y.numel())
    config = {
        "guidance": guidance,
        "sampler": sampler,
        "n_steps": int(n_steps),
        "zeta": float(zeta),
        "eta": float(eta),
        "n_samples": n,
        "noise_sigma": noise_sigma,
        "intensity_scale": gain,
        "normalisation": {"scale": scale, "offset": offset},
        "data_std": float(data_std),
        "n_inner": int(n_inner),
        "pigdm_clip": float(pigdm_clip),
        "prior_power": prior_power is not None,
        "antithetic": bool(antithetic),
        "spacing": spacing,
        "schedule": schedule.config(),
    }
    return DPSResult(x_phys, mean, std, torch.cat(histories, dim=1), residual, target, config)


def _expand_mask(
    mask: torch.Tensor | None, n: int, shape: tuple[int, ...], points: bool
) -> torch.Tensor | None:
    if mask is None:
        return None
    require(points, 'a node mask needs a point-cloud denoiser (representation "points")')
    mask = torch.as_tensor(mask)
    if mask.ndim == 1:
        mask = mask.expand(n, -1)
    require(
        tuple(mask.shape) == (n, shape[0]),
        f"mask must have shape ({shape[0]},) or ({n}, {shape[0]}), got {tuple(mask.shape)}",
    )
    require(bool((mask.sum(dim=1) >= 1).all()), "every sample needs at least one real node")
    return mask.to(torch.float32)


__all__ = [
    "GUIDANCES",
    "DPSResult",
    "dps_sample",
    "estimate_intensity_scale",
    "potential_integral",
]
