"""Guidance rules of diffusion posterior sampling: how each reverse step of
:func:`cryoprior.solvers.dps.dps_sample` is pulled towards the measurement y = A(x) + n.

Four rules (``guidance=``), all using the same denoiser contract and any
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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cryoprior.core.errors import require
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion import DenoiserLike, DenoiserOutput, per_sample_time, remove_mean
from cryoprior.physics.operators import LinearOperator, Operator, ScaledLinearOperator
from cryoprior.solvers.regularized import conjugate_gradient

GUIDANCES = ("dps", "pigdm", "dps_x0", "pigdm_dc")


# ---------------------------------------------------------------------------------------
# the operator in network space


class NetworkOperator:
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


def norms(r: torch.Tensor) -> torch.Tensor:
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
# the rules


class Guidance:
    """The guidance rules, for a sampler that sets ``denoiser``, ``schedule``, ``a_net``
    (:class:`NetworkOperator`), ``y``, ``noise_sigma``, ``zeta``, ``guidance``,
    ``data_std``, ``n_inner``, ``mask``, ``points``, ``pigdm_clip`` and ``prior_power``
    (see ``cryoprior.solvers.dps._Sampler``)."""

    denoiser: DenoiserLike
    schedule: Any
    a_net: NetworkOperator
    y: torch.Tensor
    noise_sigma: float | None
    zeta: float
    guidance: str
    data_std: float
    n_inner: int
    mask: torch.Tensor | None
    points: bool
    pigdm_clip: float
    prior_power: torch.Tensor | None

    def denoise(self, x: torch.Tensor, t: float) -> DenoiserOutput:
        kw = {"mask": self.mask} if self.mask is not None else {}
        return self.denoiser(x, per_sample_time(t, x), **kw)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return remove_mean(x, self.mask) if self.points else x

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
            res = norms(self.a_net(out.x0) - self.y)
            (grad,) = torch.autograd.grad(res.sum(), x_in)
        out = DenoiserOutput(out.x0.detach(), out.eps.detach(), out.score.detach())
        return out, res.detach(), grad

    def _preconditioner(self, a: float, b: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """≈ (a I + b AᵀA)⁻¹ in network space, when the operator offers one
        (``approx_normal_inverse(v, a, b)`` for its own AᵀA; see ``NetworkOperator``)."""
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
            cap = self.pigdm_clip * norms(gauss)
            shrink = torch.clamp(cap / norms(corr).clamp_min(1e-30), max=1.0)
        x0_y = out.x0.detach() + expand_like(shrink, corr) * corr
        if self.guidance == "pigdm_dc":
            x0_y = self.prox(x0_y, t)
        with torch.no_grad():
            res = norms(self.a_net(x0_y) - self.y)
        return self.conditional(x, x0_y, t), res

    def guide_x0(self, x: torch.Tensor, t: float) -> tuple[DenoiserOutput, torch.Tensor]:
        """Proximal data step on x̂0: argmin ‖y − A(x)‖²/(2σ²) + ‖x − x̂0‖²/(2 r_t²)."""
        with torch.no_grad():
            out = self.denoise(x, t)
        x0_y = self.prox(out.x0.detach(), t)
        with torch.no_grad():
            res = norms(self.a_net(x0_y) - self.y)
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


__all__ = ["GUIDANCES", "Guidance", "NetworkOperator", "norms"]
