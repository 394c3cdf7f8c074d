"""Classical comparison: smoothness-regularised least squares by conjugate gradients.

For a linear operator A (:class:`cryoprior.physics.operators.LinearOperator`), a
measurement y with white Gaussian noise of standard deviation σ, and a regulariser R
(``"gradient"``: the periodic forward differences D of :class:`~cryoprior.physics.
operators.GradientOperator`, ‖Dx‖² = ‖∇x‖²; ``"identity"``: Tikhonov, ‖x‖²), the estimate

    x_λ = argmin_x ‖y − A x‖² / (2σ²) + (λ/2) ‖R x‖²

solves the normal equations (AᵀA/σ² + λ RᵀR) x = Aᵀy/σ² (Tikhonov 1963; e.g. Hansen,
"Rank-Deficient and Discrete Ill-Posed Problems", 1998, ch. 5), here by conjugate
gradients (Hestenes & Stiefel 1952) using only ``forward``/``adjoint``.

Choosing λ without the ground truth (``lam="discrepancy"``): Morozov's discrepancy principle
(Morozov 1966; Hansen 1998, sec. 7.2) picks the λ whose residual equals the noise level,
‖y − A x_λ‖ = τ σ √M for M measurements (τ = 1 by default; τ slightly > 1 is the usual
safeguard). The residual grows monotonically with λ, so λ is found by a bracketed
root search on log λ (Illinois regula falsi), each trial a warm-started CG solve. σ comes
from the caller, e.g. :func:`cryoprior.physics.measurement.estimate_noise_sigma` (image
background). A fixed λ may be given instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.physics.operators import GradientOperator, LinearOperator

REGULARIZERS = ("gradient", "identity")


# ---------------------------------------------------------------------------------------
# conjugate gradients


@dataclass
class CGResult:
    """Result of :func:`conjugate_gradient`: the solution, iterations run, final relative
    residual ‖b − M x‖/‖b‖ (per system), and whether every system met the tolerance."""

    x: torch.Tensor
    n_iter: int
    relative_residual: torch.Tensor
    converged: bool


def _dot(a: torch.Tensor, b: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """Inner products over all but the first ``batch_ndim`` dims, shaped to broadcast."""
    dims = tuple(range(batch_ndim, a.ndim))
    return (a * b).sum(dim=dims, keepdim=True) if dims else a * b


def conjugate_gradient(
    apply_matrix: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    batch_ndim: int = 0,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CGResult:
    """Solve M x = b for a symmetric positive (semi-)definite M by conjugate gradients.

    Hestenes & Stiefel 1952 (e.g. Nocedal & Wright, "Numerical Optimization", Alg. 5.2;
    with ``preconditioner`` P ≈ M⁻¹, symmetric positive definite, Alg. 5.3).
    ``apply_matrix`` maps a tensor shaped like ``b`` to M x. The first ``batch_ndim`` dims
    of ``b`` index independent systems (each with its own step sizes), the rest is one
    vector. Stops when every ‖b − M x‖ <= ``tol`` ‖b‖ or after ``max_iter`` iterations.
    Runs without autograd.
    """
    require(int(max_iter) >= 0, f"max_iter must be >= 0, got {max_iter}")
    with torch.no_grad():
        x = torch.zeros_like(b) if x0 is None else x0.detach().clone()
        r = b - apply_matrix(x) if x0 is not None else b.clone()
        precond = preconditioner if preconditioner is not None else (lambda v: v)
        z = precond(r)
        p = z.clone()
        rr = _dot(r, r, batch_ndim)
        rz = _dot(r, z, batch_ndim)
        b_norm = _dot(b, b, batch_ndim).sqrt().clamp_min(torch.finfo(b.dtype).tiny)
        tiny = torch.finfo(b.dtype).tiny
        n = 0
        while n < int(max_iter) and not bool((rr.sqrt() <= tol * b_norm).all()):
            mp = apply_matrix(p)
            pmp = _dot(p, mp, batch_ndim)
            alpha = torch.where(pmp > 0, rz / pmp.clamp_min(tiny), 0.0)
            x = x + alpha * p
            r = r - alpha * mp
            z = precond(r)
            rz_new = _dot(r, z, batch_ndim)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), 0.0)
            p = z + beta * p
            rz = rz_new
            rr = _dot(r, r, batch_ndim)
            n += 1
        rel = (rr.sqrt() / b_norm).reshape(b.shape[:batch_ndim])
        return CGResult(x, n, rel, bool((rel <= tol).all()))


# ---------------------------------------------------------------------------------------
# regularised least squares


@dataclass
class RegularizedResult:
    """Result of :func:`regularized_least_squares`.

    ``x``: the estimate (the operator's domain shape); ``lam``: the λ used;
    ``residual_norm``: ‖y − A x‖; ``target_residual_norm``: τ σ √M (discrepancy rule);
    ``rule``: how λ was chosen; ``n_cg_iter``: CG iterations in total; ``converged``: the
    last CG solve met its tolerance (and, for the discrepancy rule, the residual matched
    the target within ``rtol`` inside the λ range); ``history``: (λ, residual) of each
    trial solve.
    """

    x: torch.Tensor
    lam: float
    residual_norm: float
    target_residual_norm: float
    rule: str
    n_cg_iter: int
    converged: bool
    history: list[tuple[float, float]] = field(default_factory=list)


class _Problem:
    """Normal equations (AᵀA/σ² + λ RᵀR) x = Aᵀy/σ² of one problem."""

    def __init__(
        self, operator: LinearOperator, y: torch.Tensor, sigma: float, regularizer: str
    ) -> None:
        self.op, self.y, self.sigma2 = operator, y, sigma**2
        if regularizer == "gradient":
            grad = GradientOperator(operator.domain_shape)
            self.reg_normal = grad.normal
            self.reg_norm2 = 4.0 * len(operator.domain_shape)  # ‖DᵀD‖ (periodic)
        else:
            self.reg_normal = _identity
            self.reg_norm2 = 1.0
        with torch.no_grad():
            self.rhs = operator.adjoint(y) / self.sigma2

    def solve(self, lam: float, x0: torch.Tensor | None, max_iter: int, tol: float) -> CGResult:
        def matrix(x: torch.Tensor) -> torch.Tensor:
            return self.op.normal(x) / self.sigma2 + lam * self.reg_normal(x)

        return conjugate_gradient(matrix, self.rhs, x0, max_iter, tol)

    def residual(self, x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((self.y - self.op.forward(x)).norm())


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def regularized_least_squares(
    operator: LinearOperator,
    y: torch.Tensor,
    noise_sigma: float,
    lam: float | str = "discrepancy",
    *,
    regularizer: str = "gradient",
    tau: float = 1.0,
    rtol: float = 0.01,
    lam_bounds: tuple[float, float] | None = None,
    max_lam_iter: int = 40,
    x0: torch.Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> RegularizedResult:
    """Smoothness-regularised least squares, λ fixed or by the discrepancy principle.

    Minimises ‖y − A x‖²/(2σ²) + (λ/2)‖R x‖² (see the module docstring) by CG on the normal
    equations. ``y`` has the operator's range shape (one measurement, no batch);
    ``noise_sigma`` σ in y's units. ``lam``: a number >= 0, or ``"discrepancy"`` (the λ with
    ‖y − A x_λ‖ = ``tau`` σ √M within ``rtol``, searched inside ``lam_bounds``; default
    bounds 1e-10 … 1e4 times ‖A‖²/(σ² ‖RᵀR‖), ‖A‖ from power iteration; the search starts
    at their geometric mean and steps by decades until the target is bracketed). If the
    target is out of reach inside the bounds the nearest bound is used and ``converged`` is
    False.
    ``regularizer``: ``"gradient"`` (‖∇x‖², periodic differences) or ``"identity"``.
    """
    require(regularizer in REGULARIZERS, f"regularizer must be one of {REGULARIZERS}")
    sigma = require_positive(noise_sigma, "noise sigma")
    operator.range_batch_shape(y)
    require(
        tuple(y.shape) == tuple(operator.range_shape),
        f"y must have the operator's range shape {operator.range_shape} (one measurement), "
        f"got {tuple(y.shape)}",
    )
    problem = _Problem(operator, y, sigma, regularizer)
    target = tau * sigma * math.sqrt(y.numel())
    if not isinstance(lam, str):
        lam_value = float(lam)
        require(lam_value >= 0 and math.isfinite(lam_value), f"lam must be >= 0, got {lam}")
        sol = problem.solve(lam_value, x0, max_iter, tol)
        res = problem.residual(sol.x)
        return RegularizedResult(
            sol.x, lam_value, res, target, "fixed", sol.n_iter, sol.converged, [(lam_value, res)]
        )
    if lam != "discrepancy":
        raise InputError(f'lam must be a number >= 0 or "discrepancy", got {lam!r}')
    require_positive(tau, "tau")

    if lam_bounds is None:
        a_norm2 = operator.norm_estimate(dtype=y.dtype, device=y.device) ** 2
        require(a_norm2 > 0, "the operator maps everything to zero")
        unit = a_norm2 / (sigma**2 * problem.reg_norm2)
        lam_bounds = (1e-10 * unit, 1e4 * unit)
    lo, hi = (float(v) for v in lam_bounds)
    require(0 < lo < hi, f"lam_bounds must satisfy 0 < low < high, got {lam_bounds}")

    history: list[tuple[float, float]] = []
    n_cg = 0
    cache: dict[float, tuple[torch.Tensor, float, bool]] = {}
    warm = x0

    def evaluate(log_lam: float) -> float:
        nonlocal n_cg, warm
        lam_value = math.exp(log_lam)
        sol = problem.solve(lam_value, warm, max_iter, tol)
        res = problem.residual(sol.x)
        n_cg += sol.n_iter
        warm = sol.x
        history.append((lam_value, res))
        cache[log_lam] = (sol.x, res, sol.converged)
        return math.log(res) - math.log(target)

    # bracket the root: from the geometric middle of the bounds, step by decades
    log_lo, log_hi = math.log(lo), math.log(hi)
    tol_f = math.log1p(rtol)
    prev = 0.5 * (log_lo + log_hi)
    f_prev = evaluate(prev)
    if abs(f_prev) <= tol_f:
        x, res, cg_ok = cache[prev]
        return RegularizedResult(
            x, math.exp(prev), res, target, "discrepancy", n_cg, cg_ok, history
        )
    direction = 1.0 if f_prev < 0 else -1.0  # residual below the target: more smoothing
    while True:
        nxt = min(max(prev + direction * math.log(10.0), log_lo), log_hi)
        if nxt == prev:  # at a bound without reaching the target
            x, res, _ = cache[prev]
            return RegularizedResult(
                x, math.exp(prev), res, target, "discrepancy", n_cg, False, history
            )
        f_next = evaluate(nxt)
        if f_next * f_prev <= 0:
            break
        prev, f_prev = nxt, f_next
    (a, fa), (b, fb) = sorted([(prev, f_prev), (nxt, f_next)])
    side = 0
    c, fc = a, fa
    for _ in range(int(max_lam_iter)):
        c = (a * fb - b * fa) / (fb - fa)  # regula falsi on log residual vs log lambda
        fc = evaluate(c)
        if abs(fc) <= math.log1p(rtol):
            break
        if fc * fb > 0:
            b, fb = c, fc
            if side == -1:
                fa /= 2  # Illinois modification: keeps the stale end from stalling
            side = -1
        else:
            a, fa = c, fc
            if side == 1:
                fb /= 2
            side = 1
    x, res, cg_ok = cache[c]
    ok = cg_ok and abs(fc) <= math.log1p(rtol)
    return RegularizedResult(x, math.exp(c), res, target, "discrepancy", n_cg, ok, history)


__all__ = [
    "REGULARIZERS",
    "CGResult",
    "RegularizedResult",
    "conjugate_gradient",
    "regularized_least_squares",
]
