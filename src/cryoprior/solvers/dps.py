"""Diffusion posterior sampling: a diffusion prior plus a measurement y = A(x) + n.

The sampler walks the prior's reverse diffusion (DDPM ancestral steps, or DDIM for fewer
steps) and pulls every step towards the measurement. Three guidance rules
(``guidance=``), all using the same denoiser contract and any
:class:`~cryoprior.physics.operators.Operator`:

``"dps"`` — Chung, Kim, Mccann, Klasky & Ye, "Diffusion Posterior Sampling for General
    Noisy Inverse Problems", ICLR 2023, Algorithm 1 (DPS-Gaussian). With x̂0 = x̂0(x_t) the
    denoiser's estimate, x'_s is the plain reverse step from x_t (the ancestral DDPM
    step), then x_s = x'_s − ζ_t ∇_{x_t} ‖y − A(x̂0(x_t))‖², the gradient taken through the
    denoiser network by autograd. For its experiments the paper sets
    ζ_t = ζ'/‖y − A(x̂0(x_t))‖ with a constant ζ', which makes the step
    2ζ' ∇_{x_t}‖y − A(x̂0)‖; the authors' code
    (``guided_diffusion/condition_methods.py``, ``PosteriorSampling``) applies
    ``scale · ∇‖y − A(x̂0)‖``. Here the step is ``zeta · ∇_{x_t} ‖y − A(x̂0(x_t))‖`` with
    the norm taken per sample (the code takes one norm over the whole batch, which couples
    samples): ``zeta`` is the code's ``scale`` = 2ζ'. The step length,
    ζ ‖Jᵀ Aᵀ r‖/‖r‖ (J = ∂x̂0/∂x_t, r the residual), is of order ζ ‖A‖ in network units
    whatever σ and the residual, so ζ must be tuned per problem (of order 1/‖A‖ of the
    network-space operator; ``LinearOperator.norm_estimate`` gives ‖A‖), and the samples
    keep a jitter of that size around the data. Approximate: p(y | x_t) is replaced by
    p(y | x0 = x̂0(x_t)).
``"pigdm"`` — the Gaussian likelihood approximation of Π-GDM (Song, Vahdat, Mardani &
    Kautz, "Pseudoinverse-Guided Diffusion Models for Inverse Problems", ICLR 2023):
    p(y | x_t) ≈ N(A x̂0, σ²I + r_t² AAᵀ) for a linear A, with
    r_t² = s² σ̃²/(s² + σ̃²) (σ̃ = σ_t/α_t, s = ``data_std``, the prior's per-element
    standard deviation in network units; Π-GDM takes s = 1). Its score
    g = J ᵀ Aᵀ (σ²I + r_t² AAᵀ)⁻¹ (y − A x̂0) (J = ∂x̂0/∂x_t, a vector-Jacobian product
    through the network; the inverse by CG) is added to the prior score, and Tweedie's
    formula turns the sum into the conditional denoiser x̂0_y = x̂0 + (σ_t²/α_t) g, with
    which the reverse step is taken. Exact for a Gaussian prior N(μ, s²I) and linear A
    (then x_t and x0 are jointly Gaussian and Var[x0 | x_t] = r_t² I): the sampler then
    draws from the true posterior up to time discretisation. With a learned prior the
    factor σ_t²/α_t explodes as α_t → 0 (t near 1) while the network's Jacobian does not
    vanish: the first step's correction was measured at 400–800× the Gaussian-prior one
    (r_t² Aᵀ(σ²I + r_t²AAᵀ)⁻¹(y − Ax̂0)) and wrecked the sample; its norm is capped at
    ``pigdm_clip`` (2) times that Gaussian correction, per sample, keeping the network's
    direction (afterwards the ratio is 0.75–2, so the cap only acts near t = 1). For
    the Fourier likelihood the solve is preconditioned by diag(AAᵀ) (Jacobi).
``"dps_x0"`` — data consistency on x̂0 without back-propagation through the network
    (DiffPIR-like: Zhu et al., "Denoising Diffusion Models for Plug-and-Play Image
    Restoration", CVPR 2023, the data subproblem): x̂0_y = argmin_x ‖y − A(x)‖²/(2σ²)
    + ‖x − x̂0‖²/(2 r_t²), the proximal step of the likelihood around x̂0 with the same
    r_t² as above, solved by ``n_inner`` CG iterations for linear A (exactly, for enough
    iterations) or L-BFGS iterations otherwise; the reverse step then uses x̂0_y. For a
    Gaussian prior and linear A this equals ``"pigdm"`` (J = (α_t r_t²/σ_t²) I), so it is
    exact there too; for a learned prior it drops the network Jacobian (cheaper: one
    network call per step, no backward pass).
``"pigdm_dc"`` — ``"pigdm"`` followed by the ``"dps_x0"`` proximal data step around its
    x̂0_y (a data-consistency step, as in DiffPIR/DDNM-style samplers). With a learned
    prior the network Jacobian in Π-GDM's correction can distort a large data-driven
    update (many informative images); the proximal step restores consistency with the
    data there, while Π-GDM's Jacobian-aware guidance dominates when the data are weak.
    Not exact: the likelihood enters twice per step (for a Gaussian prior the samples are
    narrower than the posterior and pulled further towards the data); a heuristic that
    the reconstruction benchmark measures, not a posterior sampler in the strict sense.

Cost per step: "dps" one network call and one backward pass through network and operator;
"pigdm" the same plus ``n_inner`` CG iterations, each one A and one Aᵀ; "dps_x0" one
network call plus ``n_inner`` CG (AᵀA) or L-BFGS iterations.

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

Point clouds: noise is drawn in the zero-centre-of-mass subspace, the COM is removed
after every step and checked (Hoogeboom et al. 2022); ``mask`` marks real nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion import (
    DenoiserLike,
    DenoiserOutput,
    assert_zero_com,
    ddim_step,
    ddpm_step,
    draw_noise,
    per_sample_time,
    remove_mean,
)
from cryoprior.physics.measurement import estimate_map_integral
from cryoprior.physics.operators import (
    LinearOperator,
    Operator,
    ScaledLinearOperator,
)
from cryoprior.physics.scattering import form_factor_table
from cryoprior.priors import Prior
from cryoprior.solvers.regularized import conjugate_gradient

GUIDANCES = ("dps", "pigdm", "dps_x0", "pigdm_dc")
STEPS = ("ddpm", "ddim")

Callback = Callable[[int, torch.Tensor, DenoiserOutput], torch.Tensor | None]


# ---------------------------------------------------------------------------------------
# the intensity scale of a measurement


def potential_integral(elements: Sequence[str | int]) -> float:
    """∫V d³r (Å) of :func:`cryoprior.physics.atoms.atoms_to_map` for atoms ``elements``.

    The integral of each atom's five-Gaussian potential is Σ_k a_k (its scattering factor
    at q = 0; Peng et al. 1996), independent of positions and B-factors: only the
    composition (known from the sequence) is used, not the structure.
    """
    require(len(elements) >= 1, "need at least one element")
    a, _ = form_factor_table(list(elements))
    return float(np.sum(a))


def estimate_intensity_scale(
    images: torch.Tensor,
    reference_integral: float,
    ctf_at_zero: torch.Tensor | float | None = None,
    pixel_size: float = 1.0,
) -> float:
    """c such that the measurement is c · A(x_phys): measured ∫V d³r / ``reference_integral``.

    The numerator comes from the images alone (:func:`~cryoprior.physics.operators.
    estimate_map_integral`: least-squares fit of the images' DC terms over CTF(0), times
    pixel_size³); ``reference_integral`` is the integral of the molecule in the prior's
    physical units (:func:`potential_integral` of its composition, or the number of Cα
    times the blob amplitude). ``images`` (K, H, W) in the operator's (voxel-sum) units.
    """
    ref = require_positive(reference_integral, "reference integral")
    return estimate_map_integral(images, ctf_at_zero, pixel_size).integral / ref


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
# the operator in network space


class _NetworkOperator:
    """x_net ↦ c · A(scale · x_net + offset), with its linear part when A is linear."""

    def __init__(self, operator: Operator, scale: float, offset: float, gain: float) -> None:
        self.op, self.scale, self.offset, self.gain = operator, scale, offset, gain
        self.linear: LinearOperator | None = None
        self.constant: torch.Tensor | float = 0.0
        if isinstance(operator, LinearOperator):
            self.linear = ScaledLinearOperator(operator, gain * scale)

    def prepare(self, like: torch.Tensor) -> None:
        """Precompute c · A(offset · 1), the constant term, in ``like``'s dtype/device."""
        if self.linear is not None and self.offset != 0.0:
            ones = torch.full(
                self.op.domain_shape, self.offset, dtype=like.dtype, device=like.device
            )
            with torch.no_grad():
                self.constant = self.gain * self.op.forward(ones)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.op.forward(self.scale * x + self.offset)


def _norms(r: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norms (B,) of a (B, ...) tensor."""
    return r.flatten(1).norm(dim=1)


def _posterior_var(
    alpha: float, sigma: float, prior_var: float | torch.Tensor
) -> float | torch.Tensor:
    """r_t² = s² σ̃² / (s² + σ̃²), σ̃ = σ_t/α_t: Var[x0 | x_t] for x0 ~ N(μ, s²) — s² one
    number (white) or one per Fourier coefficient."""
    st2 = (sigma / alpha) ** 2
    return prior_var * st2 / (prior_var + st2)


def _spectral_filter(v: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """F⁻¹ diag(response) F v over the last three axes (``response`` on the rfft grid)."""
    dims = (-3, -2, -1)
    spec = torch.fft.rfftn(v, dim=dims) * response.to(device=v.device, dtype=v.dtype)
    return torch.fft.irfftn(spec, s=v.shape[-3:], dim=dims)


# ---------------------------------------------------------------------------------------
# sampler


class _Sampler:
    """One chunk of samples: the guided reverse diffusion."""

    def __init__(
        self,
        denoiser: DenoiserLike,
        a_net: _NetworkOperator,
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
    ) -> None:
        self.pigdm_clip = pigdm_clip
        self.prior_power = prior_power
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.a_net, self.y, self.noise_sigma = a_net, y, noise_sigma
        self.zeta, self.guidance, self.step_name, self.eta = zeta, guidance, step, eta
        self.data_std, self.n_inner = data_std, n_inner
        self.mask, self.generator = mask, generator
        self.points = getattr(denoiser, "representation", "grid") == "points"

    # -- helpers ---------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t: float) -> DenoiserOutput:
        kw = {"mask": self.mask} if self.mask is not None else {}
        return self.denoiser(x, per_sample_time(t, x), **kw)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return remove_mean(x, self.mask) if self.points else x

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return draw_noise(
            like.shape,
            points=self.points,
            mask=self.mask,
            generator=self.generator,
            dtype=like.dtype,
            device=like.device,
        )

    def conditional(self, x: torch.Tensor, x0_y: torch.Tensor, t: float) -> DenoiserOutput:
        """The denoiser output with x̂0 replaced by x̂0_y: ε̂ = (x_t − α x̂0_y)/σ."""
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        x0_y = self.project(x0_y)
        eps = (x - alpha * x0_y) / sigma
        return DenoiserOutput(x0=x0_y, eps=eps, score=-eps / sigma)

    def posterior_var(self, t: float) -> float | torch.Tensor:
        """r_t²: Var[x0 | x_t] of the Gaussian approximation of the prior — a scalar for a
        white prior (``data_std``), a spectrum on the rfft grid for ``prior_power``."""
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        prior_var = self.data_std**2 if self.prior_power is None else self.prior_power
        return _posterior_var(alpha, sigma, prior_var)

    @staticmethod
    def inverse_var(v: torch.Tensor, r2: float | torch.Tensor) -> torch.Tensor:
        """R⁻¹ v for the prior covariance R = r_t² (scalar or Fourier-diagonal)."""
        return v / r2 if isinstance(r2, float) else _spectral_filter(v, 1.0 / r2)

    # -- guidance rules --------------------------------------------------------------
    def guide_dps(
        self, x: torch.Tensor, t: float
    ) -> tuple[DenoiserOutput, torch.Tensor, torch.Tensor]:
        """Chung et al. 2023, Alg. 1: out(x_t), ‖y − A(x̂0)‖ and ∇_{x_t}‖y − A(x̂0)‖."""
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.denoise(x_in, t)
            res = _norms(self.a_net(out.x0) - self.y)
            (grad,) = torch.autograd.grad(res.sum(), x_in)
        out = DenoiserOutput(out.x0.detach(), out.eps.detach(), out.score.detach())
        return out, res.detach(), grad

    def _preconditioner(self, a: float, b: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """≈ (a I + b AᵀA)⁻¹ in network space, when the operator offers one
        (``approx_normal_inverse(v, a, b)`` for its own AᵀA; see ``_NetworkOperator``)."""
        approx = getattr(self.a_net.op, "approx_normal_inverse", None)
        if approx is None:
            return None
        g2 = (self.a_net.gain * self.a_net.scale) ** 2
        return lambda v: approx(v, a, b * g2)

    def _range_preconditioner(
        self, a: float, b: float
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Jacobi preconditioner ≈ (a I + b AAᵀ)⁻¹ in the measurement space, when the
        operator reports diag(AAᵀ) (``range_normal_diagonal()``, its own units)."""
        diag_fn = getattr(self.a_net.op, "range_normal_diagonal", None)
        if diag_fn is None:
            return None
        g2 = (self.a_net.gain * self.a_net.scale) ** 2
        inv = 1.0 / (a + b * g2 * diag_fn())
        return lambda v: v * inv.to(device=v.device, dtype=v.dtype)

    def guide_pigdm(self, x: torch.Tensor, t: float) -> tuple[DenoiserOutput, torch.Tensor]:
        """Π-GDM Gaussian likelihood: x̂0_y = x̂0 + (σ_t²/α_t) Jᵀ Aᵀ(σ²I + r_t² AAᵀ)⁻¹(y − A x̂0).

        With an operator that offers a preconditioner the solve runs in the domain, by the
        push-through identity R Aᵀ(σ²I + A R Aᵀ)⁻¹ = (σ² R⁻¹ + AᵀA)⁻¹Aᵀ (R = r_t², a
        number or, with a prior spectrum, Fourier-diagonal), with preconditioned CG
        (well-conditioned however informative the data); its solution is the Gaussian
        correction itself."""
        lin = self.a_net.linear
        assert lin is not None and self.noise_sigma is not None
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        r2 = self.posterior_var(t)
        s2 = self.noise_sigma**2
        precond = self._preconditioner(s2 / r2, 1.0)
        require(
            precond is not None or isinstance(r2, float),
            "a prior spectrum needs an operator with a Fourier preconditioner",
        )
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.denoise(x_in, t)
            y_model = self.a_net(out.x0)
            resid = (self.y - y_model).detach()
            if precond is not None:

                def normal(v: torch.Tensor) -> torch.Tensor:
                    return s2 * self.inverse_var(v, r2) + lin.normal(v)

                with torch.no_grad():
                    rhs = lin.adjoint(resid)
                gauss = conjugate_gradient(
                    normal,
                    rhs,
                    max_iter=self.n_inner,
                    tol=1e-6,
                    batch_ndim=1,
                    preconditioner=precond,
                ).x
                w = self.inverse_var(gauss, r2)
                (g,) = torch.autograd.grad(out.x0, x_in, grad_outputs=w)
            else:

                def cov(v: torch.Tensor) -> torch.Tensor:
                    return s2 * v + r2 * lin.forward(lin.adjoint(v))

                v = conjugate_gradient(
                    cov,
                    resid,
                    max_iter=self.n_inner,
                    tol=1e-8,
                    batch_ndim=1,
                    preconditioner=self._range_preconditioner(s2, r2),
                ).x
                (g,) = torch.autograd.grad(y_model, x_in, grad_outputs=v)
        # Π-GDM's correction (σ_t²/α_t) Jᵀv: for the Gaussian prior it is exactly r_t² v
        # (J = α_t r_t²/σ_t² I). Near t = 1, α_t → 0 while the network's Jacobian does
        # not vanish, and the factor σ_t²/α_t blows the correction up by orders of
        # magnitude (measured: 400–800× the Gaussian one at the first step, ~0.75–2×
        # after). Its norm is therefore capped at ``pigdm_clip`` times the Gaussian one's,
        # per sample; the direction (the network's) is kept.
        corr = (sigma**2 / alpha) * g
        with torch.no_grad():
            if precond is None:
                gauss = r2 * lin.adjoint(v)
            cap = self.pigdm_clip * _norms(gauss)
            shrink = torch.clamp(cap / _norms(corr).clamp_min(1e-30), max=1.0)
        x0_y = out.x0.detach() + expand_like(shrink, corr) * corr
        if self.guidance == "pigdm_dc":
            x0_y = self.prox(x0_y, t)
        with torch.no_grad():
            res = _norms(self.a_net(x0_y) - self.y)
        return self.conditional(x, x0_y, t), res

    def guide_x0(self, x: torch.Tensor, t: float) -> tuple[DenoiserOutput, torch.Tensor]:
        """Proximal data step on x̂0: argmin ‖y − A(x)‖²/(2σ²) + ‖x − x̂0‖²/(2 r_t²)."""
        with torch.no_grad():
            out = self.denoise(x, t)
        x0_y = self.prox(out.x0.detach(), t)
        with torch.no_grad():
            res = _norms(self.a_net(x0_y) - self.y)
        return self.conditional(x, x0_y, t), res

    def prox(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        """argmin_x ‖y − A(x)‖²/(2σ²) + ‖x − x0‖²/(2 r_t²) (CG or L-BFGS, ``n_inner``);
        with a prior spectrum the second term is (x − x0)ᵀR⁻¹(x − x0)/2."""
        assert self.noise_sigma is not None
        r2 = self.posterior_var(t)
        s2 = self.noise_sigma**2
        lin = self.a_net.linear
        if lin is not None:
            with torch.no_grad():
                rhs = lin.adjoint(self.y - self.a_net.constant) / s2 + self.inverse_var(x0, r2)

                def normal(z: torch.Tensor) -> torch.Tensor:
                    return lin.normal(z) / s2 + self.inverse_var(z, r2)

                x0_y = conjugate_gradient(
                    normal,
                    rhs,
                    x0,
                    self.n_inner,
                    1e-8,
                    batch_ndim=1,
                    preconditioner=self._preconditioner(1.0 / r2, 1.0 / s2),
                ).x
        else:
            require(isinstance(r2, float), "a prior spectrum needs a linear operator")
            x0_y = self._prox_lbfgs(x0, float(r2), s2)
        return x0_y

    def _prox_lbfgs(self, x0: torch.Tensor, r2: float, s2: float) -> torch.Tensor:
        z = x0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=self.n_inner, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = ((self.a_net(z) - self.y) ** 2).sum() / (2 * s2)
            loss = loss + ((z - x0) ** 2).sum() / (2 * r2)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return z.detach()

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
    if x_T is not None:
        require(
            tuple(x_T.shape) == (n, *shape),
            f"x_T must have shape {(n, *shape)}, got {tuple(x_T.shape)}",
        )
    full_mask = _expand_mask(mask, n, shape, points)
    if full_mask is not None:
        full_mask = full_mask.to(y.device)

    a_net = _NetworkOperator(operator, scale, offset, gain)
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
        residual = _norms(a_net(x_net) - y)
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
