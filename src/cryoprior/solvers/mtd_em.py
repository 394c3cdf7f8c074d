"""Approximate expectation-maximisation for 2-D multi-target detection, with optional priors.

Kreymer, Singer & Bendory, "An approximate expectation-maximization for two-dimensional
multi-target detection", IEEE SPL 29 (2022); Zabatani, Kreymer & Bendory, "Score-based
diffusion priors for multi-target detection" (2023), Algorithm 1. The measurement M is cut
into D = ⌊N/L⌋² patches M_m, each modelled as C T_ℓ Z R_φk F + ε over all (2L)² shifts ℓ
and K rotations φk (see :mod:`cryoprior.physics.mtd`), patches taken as independent
(Zabatani et al., Eq. 13).

E-step (Eqs. 14–15): for every patch, rotation and shift at once,
‖M_m − C T_ℓ Z F_k‖² = ‖M_m‖² − 2 c_mk[ℓ] + n_k[ℓ], with c_mk the circular
cross-correlation of the zero-padded patch with the zero-padded F_k = R_φk F and n_k the
correlation of the visible-window indicator with F_k² (both by FFT, 2L×2L). The posterior
w_mkℓ ∝ exp(−‖·‖²/2σ²) ρ(ℓ)/K is normalised per patch with log-sum-exp.

Q (Eq. 16) depends on F through two sufficient statistics per rotation, on F_k's L×L grid
q: y_k[q] = Σ_m Σ_ℓ w_mkℓ P_m[q − ℓ] and c_k[q] = Σ_m Σ_ℓ w_mkℓ 1[q − ℓ ∈ window]
(circular convolutions over the 2L×2L grid; P_m the zero-padded patch):

    Q(F) = −(E − 2 Σ_k ⟨y_k, R_k F⟩ + Σ_k ⟨c_k, (R_k F)²⟩)/(2σ²) − (D L²/2) log 2πσ² + const,
    ∇Q(F) = Σ_k R_kᵀ (y_k − c_k ⊙ R_k F)/σ²,   E = Σ_m ‖M_m‖².

M-step variants:

- ``closed_form``: the weighted least-squares maximiser, Σ_k R_kᵀ diag(c_k) R_k F =
  Σ_k R_kᵀ y_k (Kreymer et al.'s z = A⁻¹y). For multiples of 90° the R_k are permutations
  and the system is diagonal (a ratio of accumulated sums); otherwise Jacobi-preconditioned
  conjugate gradients, warm-started at the current F.
- ``gradient``: Algorithm 1 of Zabatani et al.: ``grad_steps`` ascent steps on
  Q(F) + γ(τ) log p(F) from F^(τ), with ∇ log p a score function
  (:mod:`cryoprior.solvers.score_prior`). Each step is preconditioned by the diagonal
  curvature of −Q plus γ κ (κ ≥ ‖∇² log p‖, exact or by power iteration):
  F ← F + μ (∇Q + γ s(F)) / (diag(Σ_k R_kᵀ c_k R_k)/σ² + γ κ), stable for μ ≤ 1 without
  tuning; with γ = 0 and 90° rotations one step with μ = 1 is the closed form.

Options beyond the paper's baseline: the learned shift/occupancy prior ρ(ℓ), updated as
the mean posterior over patches and rotations (Kreymer et al.; the paper fixed ρ uniform);
σ² estimated jointly (its exact EM update from the same statistics) when it is not given;
K > 4 rotations by interpolation. The stopping rule is ‖F^(τ+1) − F^(τ)‖/‖F^(τ)‖ < tol,
tested once γ has reached its final value, with an iteration cap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cryoprior.core.errors import InputError, require
from cryoprior.core.runtime import progress
from cryoprior.metrics.images import rotation_invariant_error
from cryoprior.physics.mtd import (
    INTERPOLATIONS,
    ImageRotation,
    empty_shifts,
    extract_patches,
    rotation_grid,
)
from cryoprior.solvers.score_prior import ScoreFn, estimate_curvature

M_STEPS = ("closed_form", "gradient")
GAMMA_SCHEDULES = ("constant", "linear")
OCCUPANCY = ("uniform", "learned")


# ----------------------------------------------------------------------- data


class PatchData:
    """The measurement's patches, prepared once for every E-step.

    ``patches`` (D, L, L) float64; ``fft`` (D, 2L, L+1): rfft2 of the patches zero-padded
    to 2L×2L; ``energy`` (D,): ‖M_m‖²; ``window_fft``: rfft2 of the indicator of [0, L)².
    """

    def __init__(self, measurement: torch.Tensor, size: int) -> None:
        require(int(size) >= 1, f"the target size L must be >= 1, got {size}")
        m = torch.as_tensor(measurement).detach().to("cpu", torch.float64)
        require(bool(torch.isfinite(m).all()), "the measurement contains NaN or infinite values")
        self.size = L = int(size)
        self.patches = extract_patches(m, L)
        self.fft = torch.fft.rfft2(torch.nn.functional.pad(self.patches, (0, L, 0, L)))
        self.energy = self.patches.pow(2).sum((-2, -1))
        window = torch.zeros(2 * L, 2 * L, dtype=torch.float64)
        window[:L, :L] = 1
        self.window_fft = torch.fft.rfft2(window)

    @property
    def num_patches(self) -> int:
        """D."""
        return int(self.patches.shape[0])


@dataclass
class EStep:
    """What the E-step leaves for the M-step (all float64).

    y, count: (K, L, L) sufficient statistics of Q (module doc); occupancy: (2L, 2L) the
    posterior mass of each shift averaged over patches (summed over rotations);
    log_likelihood: Σ_m log p(M_m | F) under the current shift prior.
    """

    y: torch.Tensor
    count: torch.Tensor
    occupancy: torch.Tensor
    log_likelihood: float


def _rotated_spectra(
    rotated: torch.Tensor, window_fft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """rfft2 of the zero-padded F_k and n_k[ℓ] = ‖C T_ℓ Z F_k‖² for all ℓ: (K, 2L, 2L)."""
    L = rotated.shape[-1]
    z = torch.nn.functional.pad(rotated, (0, L, 0, L))
    zf = torch.fft.rfft2(z)
    norms = torch.fft.irfft2(window_fft.conj() * torch.fft.rfft2(z * z), s=(2 * L, 2 * L))
    return zf, norms


def log_posterior(
    data: PatchData,
    rotated: torch.Tensor,
    sigma: float,
    log_shift_prior: torch.Tensor | None = None,
    patches: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log posterior weights log w (d, K, 2L, 2L) and log evidence log p(M_m | F) (d,).

    ``rotated`` (K, L, L) are the R_φk F; ``log_shift_prior`` (2L, 2L) is log ρ(ℓ)
    (default uniform, log 1/(2L)²); rotations have prior 1/K. ``patches`` selects a range
    of patches (default all). Zabatani et al. Eqs. 14–15 with FFT correlations and
    log-sum-exp normalisation.
    """
    L = data.size
    require(
        rotated.ndim == 3 and tuple(rotated.shape[-2:]) == (L, L),
        f"rotated images must be (K, {L}, {L}), got {tuple(rotated.shape)}",
    )
    require(sigma > 0 and math.isfinite(sigma), f"noise sigma must be finite and > 0, got {sigma}")
    sl = patches if patches is not None else slice(None)
    rot = rotated.to(torch.float64)
    K = rot.shape[0]
    zf, norms = _rotated_spectra(rot, data.window_fft)
    cross = torch.fft.irfft2(data.fft[sl].conj()[:, None] * zf[None], s=(2 * L, 2 * L))
    sq = data.energy[sl][:, None, None, None] - 2 * cross + norms[None]
    if log_shift_prior is None:
        log_shift_prior = torch.full((2 * L, 2 * L), -math.log(4 * L * L), dtype=torch.float64)
    logits = -sq / (2 * sigma**2) + log_shift_prior - math.log(K)
    lse = torch.logsumexp(logits.flatten(1), dim=1)
    log_w = logits - lse[:, None, None, None]
    log_evidence = lse - 0.5 * L * L * math.log(2 * math.pi * sigma**2)
    return log_w, log_evidence


def expectation(
    data: PatchData,
    rotated: torch.Tensor,
    sigma: float,
    log_shift_prior: torch.Tensor | None = None,
    chunk: int = 256,
) -> EStep:
    """The E-step over all patches, ``chunk`` patches at a time: Q's sufficient statistics.

    y_k = Σ_m w_mk ⊛ P_m and c_k = (Σ_m w_mk) ⊛ window (circular convolutions, by FFT),
    restricted to [0, L)²; see the module doc.
    """
    L, K = data.size, rotated.shape[0]
    y_hat = torch.zeros(K, 2 * L, L + 1, dtype=torch.complex128)
    w_sum = torch.zeros(K, 2 * L, 2 * L, dtype=torch.float64)
    loglik = 0.0
    for start in range(0, data.num_patches, int(chunk)):
        sl = slice(start, start + int(chunk))
        log_w, log_ev = log_posterior(data, rotated, sigma, log_shift_prior, sl)
        w = log_w.exp()
        y_hat += torch.einsum("mkuv,muv->kuv", torch.fft.rfft2(w), data.fft[sl])
        w_sum += w.sum(0)
        loglik += float(log_ev.sum())
    y = torch.fft.irfft2(y_hat, s=(2 * L, 2 * L))[:, :L, :L]
    count = torch.fft.irfft2(torch.fft.rfft2(w_sum) * data.window_fft, s=(2 * L, 2 * L))
    return EStep(
        y=y,
        count=count[:, :L, :L].clamp(min=0),
        occupancy=w_sum.sum(0) / data.num_patches,
        log_likelihood=loglik,
    )


# ----------------------------------------------------------------------- Q and M-steps


def residual_energy(
    estep: EStep, rotation: ImageRotation, image: torch.Tensor, energy: float
) -> float:
    """E_w Σ_m ‖M_m − C T_ℓ Z R_k F‖² = E − 2 Σ_k ⟨y_k, R_k F⟩ + Σ_k ⟨c_k, (R_k F)²⟩."""
    fk = rotation.apply(image)
    return float(energy - 2 * (estep.y * fk).sum() + (estep.count * fk * fk).sum())


def q_value(
    estep: EStep,
    rotation: ImageRotation,
    image: torch.Tensor,
    sigma: float,
    energy: float,
    num_values: int,
) -> float:
    """Q(F) of Eq. 16 up to the F-independent prior terms: −R/(2σ²) − (n/2) log 2πσ²,
    R = :func:`residual_energy`, n = D L² (``num_values``)."""
    r = residual_energy(estep, rotation, image, energy)
    return -r / (2 * sigma**2) - 0.5 * num_values * math.log(2 * math.pi * sigma**2)


def q_gradient(
    estep: EStep, rotation: ImageRotation, image: torch.Tensor, sigma: float
) -> torch.Tensor:
    """∇_F Q = Σ_k R_kᵀ (y_k − c_k ⊙ R_k F)/σ² (module doc), shape (L, L)."""
    return rotation.adjoint(estep.y - estep.count * rotation.apply(image)) / sigma**2


def _normal_system(
    estep: EStep, rotation: ImageRotation
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(b, diag A, A·) of the normal equations A F = b of the closed-form M-step."""
    b = rotation.adjoint(estep.y)
    diag = rotation.normal_diagonal(estep.count)
    ridge = 1e-12 * max(float(diag.max()), 1e-300)

    def apply(f: torch.Tensor) -> torch.Tensor:
        return rotation.adjoint(estep.count * rotation.apply(f)) + ridge * f

    return b, diag + ridge, apply


def closed_form_m_step(
    estep: EStep,
    rotation: ImageRotation,
    init: torch.Tensor | None = None,
    cg_iters: int = 50,
    cg_tol: float = 1e-10,
) -> torch.Tensor:
    """argmax_F Q(F): solve Σ_k R_kᵀ diag(c_k) R_k F = Σ_k R_kᵀ y_k.

    Exact ratio for 90° rotations (diagonal system); Jacobi-preconditioned CG from ``init``
    otherwise (relative residual ``cg_tol``, at most ``cg_iters`` iterations). A ridge of
    1e-12·max(diag) keeps pixels never seen at 0.
    """
    b, diag, apply = _normal_system(estep, rotation)
    if rotation.exact:
        return b / diag
    x = torch.zeros_like(b) if init is None else init.to(b).clone()
    r = b - apply(x)
    z = r / diag
    p = z.clone()
    rz = float((r * z).sum())
    bnorm = float(b.norm()) or 1.0
    for _ in range(int(cg_iters)):
        if float(r.norm()) <= cg_tol * bnorm:
            break
        ap = apply(p)
        alpha = rz / float((p * ap).sum())
        x = x + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def gradient_m_step(
    estep: EStep,
    rotation: ImageRotation,
    image: torch.Tensor,
    sigma: float,
    steps: int,
    step_size: float = 1.0,
    score: ScoreFn | None = None,
    gamma: float = 0.0,
    curvature: float = 0.0,
) -> torch.Tensor:
    """``steps`` preconditioned ascent steps on Q(F) + γ log p(F) from ``image``.

    Zabatani et al., Algorithm 1, lines 3–7, with the step μ divided per pixel by the
    curvature diag(Σ_k R_kᵀ c_k R_k)/σ² + γ κ (``curvature`` = κ), see the module doc.
    """
    require(int(steps) >= 1, f"gradient steps per EM iteration must be >= 1, got {steps}")
    require(0 < step_size <= 1.5, f"step size μ must be in (0, 1.5], got {step_size}")
    b, diag, apply = _normal_system(estep, rotation)
    use_prior = score is not None and gamma > 0
    precond = diag / sigma**2 + (gamma * curvature if use_prior else 0.0)
    f = image.to(torch.float64).clone()
    for _ in range(int(steps)):
        grad = (b - apply(f)) / sigma**2
        if use_prior:
            grad = grad + gamma * score(f).to(torch.float64)  # type: ignore[misc]
        f = f + step_size * grad / precond
    return f


def sigma_update(
    estep: EStep, rotation: ImageRotation, image: torch.Tensor, energy: float, num_values: int
) -> float:
    """The EM update of the noise level: σ² = E_w Σ_m ‖M_m − C T_ℓ Z R_k F‖² / (D L²)."""
    return math.sqrt(max(residual_energy(estep, rotation, image, energy), 0.0) / num_values)


# ----------------------------------------------------------------------- driver


def gamma_schedule(kind: str, gamma_max: float, ramp: int) -> Callable[[int], float]:
    """γ(τ): "constant" γ_max, or "linear" γ_max·min(1, τ/(ramp − 1)) (Zabatani et al.,
    Table I: γ = τ/𝒯 for MNIST, 1 for Gaussian images)."""
    require(kind in GAMMA_SCHEDULES, f"gamma schedule must be one of {GAMMA_SCHEDULES}")
    require(gamma_max >= 0, f"gamma must be >= 0, got {gamma_max}")
    if kind == "constant":
        return lambda tau: float(gamma_max)
    span = max(int(ramp) - 1, 1)
    return lambda tau: float(gamma_max) * min(1.0, tau / span)


@dataclass
class EMConfig:
    """Settings of :func:`approximate_em` (JSON-ready with :meth:`to_dict`).

    rotations: K, angles k·2π/K (4 = the paper's exact 90° case; others interpolate with
    ``interpolation``). m_step: "closed_form", "gradient" or "auto" (gradient with a
    score, closed form without). grad_steps, step_size: ascent steps per EM iteration and
    μ. gamma, gamma_max, gamma_ramp: the γ(τ) schedule (ramp length default max_iter).
    anneal_from: start the prior's smoothing σ̃ (image units) at this value and lower it
    geometrically to the score's own σ̃ over the ramp (needs a score with
    ``at_noise_level``, e.g. PriorScore); None keeps σ̃ fixed, as the paper does.
    occupancy: "uniform" ρ(ℓ) or "learned". curvature_iters: power iterations per EM
    iteration for κ of a learned score. max_iter, tol: iteration cap and stopping rule.
    restarts, restart_iters: random starts tried and iterations each (see
    :func:`approximate_em`).
    chunk: patches per E-step batch (memory). cg_iters: CG iterations (K not in {1,2,4}).
    """

    rotations: int = 4
    interpolation: str = "bicubic"
    m_step: str = "auto"
    grad_steps: int = 10
    step_size: float = 1.0
    gamma: str = "linear"
    gamma_max: float = 1.0
    gamma_ramp: int | None = None
    anneal_from: float | None = None
    occupancy: str = "uniform"
    curvature_iters: int = 2
    max_iter: int = 100
    tol: float = 1e-5
    restarts: int = 1
    restart_iters: int = 10
    chunk: int = 256
    cg_iters: int = 50

    def validate(self) -> None:
        """Raise InputError naming the bad setting."""
        require(int(self.rotations) >= 1, f"rotations K must be >= 1, got {self.rotations}")
        require(self.interpolation in INTERPOLATIONS, f"interpolation one of {INTERPOLATIONS}")
        require(self.m_step in (*M_STEPS, "auto"), f"m_step must be one of {M_STEPS} or 'auto'")
        require(self.gamma in GAMMA_SCHEDULES, f"gamma must be one of {GAMMA_SCHEDULES}")
        require(self.occupancy in OCCUPANCY, f"occupancy must be one of {OCCUPANCY}")
        require(int(self.max_iter) >= 1, f"max_iter must be >= 1, got {self.max_iter}")
        require(self.tol >= 0, f"tol must be >= 0, got {self.tol}")
        require(int(self.chunk) >= 1, f"chunk must be >= 1, got {self.chunk}")
        require(int(self.restarts) >= 1, f"restarts must be >= 1, got {self.restarts}")
        require(int(self.restart_iters) >= 1, "restart_iters must be >= 1")
        require(
            self.anneal_from is None or self.anneal_from > 0,
            f"anneal_from must be > 0 (image units) or None, got {self.anneal_from}",
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict."""
        return asdict(self)


@dataclass
class MTDResult:
    """An EM run: ``estimate`` (L, L) float64 in the measurement's units; ``sigma`` the
    noise level used last; ``occupancy`` (2L, 2L) the last shift prior ρ; ``history`` one
    dict per iteration (iteration, gamma, log_likelihood of the estimate it started from,
    sigma, change, empty_fraction, seconds, prior_noise_level with a learned score, error
    when the truth was given); ``converged``; ``config``; ``restart_log_likelihoods`` of
    the starts tried (empty with one start)."""

    estimate: torch.Tensor
    sigma: float
    occupancy: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    restart_log_likelihoods: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        """EM iterations run."""
        return len(self.history)

    def error_curve(self) -> list[float]:
        """The relative error after each iteration (empty without a truth)."""
        return [h["error"] for h in self.history if "error" in h]

    def seconds_per_iteration(self) -> float:
        """Mean wall time of one EM iteration."""
        return sum(h["seconds"] for h in self.history) / max(len(self.history), 1)


def mtd_error(estimate: torch.Tensor, truth: torch.Tensor, rotations: int = 4) -> float:
    """Relative error min_φ ‖F* − R_φ F̂‖/‖F*‖ (Zabatani et al., Sec. IV).

    ``rotations`` = 1, 2 or 4: over exact multiples of 360°/rotations
    (:func:`~cryoprior.metrics.images.rotation_invariant_error`); more: over that many
    angles k·2π/rotations, bicubic interpolation.
    """
    est = estimate.to(torch.float64)
    ref = truth.to(torch.float64)
    if int(rotations) in (1, 2, 4):
        return float(rotation_invariant_error(est, ref, k=int(rotations)))
    require(est.shape == ref.shape, "estimate and truth must have the same shape")
    rotated = ImageRotation(est.shape[-1], rotation_grid(int(rotations))).apply(est)
    err = (rotated - ref).flatten(-2).norm(dim=-1) / ref.norm()
    return float(err.min())


def aligned_error(estimate: torch.Tensor, truth: torch.Tensor, rotations: int = 4) -> float:
    """Relative error minimised over rotations *and* integer translations (zero fill).

    min_{φ, s} ‖F* − S_s R_φ F̂‖/‖F*‖ over |s| < L per axis, φ as in :func:`mtd_error`.
    When F has a zero border, translating it inside its box leaves the MTD measurement's
    distribution unchanged (the positions are unknown), so the estimate is determined only
    up to such a translation; this error measures the shape regardless of it. The paper's
    error (:func:`mtd_error`) does not align translations.
    """
    est = estimate.to(torch.float64)
    ref = truth.to(torch.float64)
    require(est.shape == ref.shape and est.ndim == 2, "need two (L, L) images")
    L = ref.shape[-1]
    k = int(rotations)
    if k in (1, 2, 4):
        rotated = torch.stack([torch.rot90(est, j * (4 // k), dims=(-2, -1)) for j in range(k)])
    else:
        rotated = ImageRotation(L, rotation_grid(k)).apply(est)
    n = 2 * L
    window = torch.zeros(n, n, dtype=torch.float64)
    window[:L, :L] = 1
    a_hat = torch.fft.rfft2(torch.nn.functional.pad(rotated, (0, L, 0, L)))
    a2_hat = torch.fft.rfft2(torch.nn.functional.pad(rotated**2, (0, L, 0, L)))
    b_hat = torch.fft.rfft2(torch.nn.functional.pad(ref, (0, L, 0, L)))
    cross = torch.fft.irfft2(b_hat * a_hat.conj(), s=(n, n))  # Σ_i F*[i] A[i − s]
    kept = torch.fft.irfft2(torch.fft.rfft2(window) * a2_hat.conj(), s=(n, n))  # ‖S_s A‖²
    sq = (kept - 2 * cross + ref.pow(2).sum()).clamp(min=0)
    shifted_out = empty_shifts(L)  # index L: |s| = L, nothing of F̂ left in the box
    return float(sq[..., ~shifted_out].min().sqrt() / ref.norm())


class _EMRun:
    """The fixed parts of one :func:`approximate_em` call and one EM iteration."""

    def __init__(
        self,
        data: PatchData,
        cfg: EMConfig,
        score: ScoreFn | None,
        sigma: float | None,
        generator: torch.Generator | None,
    ) -> None:
        L = data.size
        self.data, self.cfg, self.score, self.generator = data, cfg, score, generator
        self.m_step = (
            cfg.m_step
            if cfg.m_step != "auto"
            else ("gradient" if score is not None else "closed_form")
        )
        self.rotation = ImageRotation(L, rotation_grid(cfg.rotations), cfg.interpolation)
        self.estimate_sigma = sigma is None
        self.sigma0 = float(data.patches.std()) if sigma is None else float(sigma)
        require(
            self.sigma0 > 0 and math.isfinite(self.sigma0),
            f"sigma must be finite and > 0, got {sigma}"
            if sigma is not None
            else "the measurement is constant: give the noise sigma",
        )
        self.ramp = cfg.gamma_ramp or cfg.max_iter
        self.gamma = gamma_schedule(cfg.gamma, cfg.gamma_max, self.ramp)
        if cfg.anneal_from is not None and score is not None:
            require(
                hasattr(score, "at_noise_level"),
                "anneal_from needs a score with at_noise_level (a PriorScore)",
            )
        self.log_rho0 = torch.full((2 * L, 2 * L), -math.log(4 * L * L), dtype=torch.float64)
        self.energy = float(data.energy.sum())
        self.num_values = data.num_patches * L * L
        self.empty = empty_shifts(L)

    def score_at(self, tau: int) -> ScoreFn | None:
        """The score used at iteration τ: σ̃ annealed geometrically when asked."""
        score, start = self.score, self.cfg.anneal_from
        if score is None or start is None:
            return score
        end = float(score.noise_level)  # type: ignore[attr-defined]
        frac = min(1.0, tau / max(self.ramp - 1, 1))
        return score.at_noise_level(start * (end / start) ** frac)  # type: ignore[attr-defined]

    def run(
        self,
        f: torch.Tensor,
        iters: int,
        truth: torch.Tensor | None = None,
        err_k: int = 4,
        show_progress: bool = False,
    ) -> MTDResult:
        """``iters`` EM iterations from ``f`` (with the stopping rule)."""
        cfg = self.cfg
        sig, log_rho = self.sigma0, self.log_rho0
        direction: torch.Tensor | None = None
        curvature = 0.0
        result = MTDResult(f, sig, log_rho.exp(), config={**cfg.to_dict(), "m_step": self.m_step})
        steps = progress(range(iters), total=iters, desc="EM", enabled=show_progress)
        for tau in steps:
            t0 = time.perf_counter()
            score = self.score_at(tau)
            gamma = self.gamma(tau) if score is not None else 0.0
            estep = expectation(self.data, self.rotation.apply(f), sig, log_rho, cfg.chunk)
            if self.m_step == "closed_form":
                f_new = closed_form_m_step(estep, self.rotation, f, cfg.cg_iters)
            else:
                if score is not None and gamma > 0:
                    curvature, direction = estimate_curvature(
                        score, f, direction, cfg.curvature_iters, generator=self.generator
                    )
                f_new = gradient_m_step(
                    estep,
                    self.rotation,
                    f,
                    sig,
                    cfg.grad_steps,
                    cfg.step_size,
                    score,
                    gamma,
                    curvature,
                )
            if not bool(torch.isfinite(f_new).all()):
                raise InputError(
                    "the EM estimate became non-finite; lower the step size or gamma, or "
                    "check the noise sigma"
                )
            if self.estimate_sigma:
                sig = sigma_update(estep, self.rotation, f_new, self.energy, self.num_values)
            if cfg.occupancy == "learned":
                log_rho = estep.occupancy.clamp(min=1e-300).log()
            change = float((f_new - f).norm() / f.norm().clamp(min=1e-300))
            f = f_new
            record = {
                "iteration": tau + 1,
                "gamma": gamma,
                "log_likelihood": estep.log_likelihood,
                "sigma": sig,
                "change": change,
                "empty_fraction": float(estep.occupancy[self.empty].sum()),
                "seconds": time.perf_counter() - t0,
            }
            if score is not None and hasattr(score, "noise_level"):
                record["prior_noise_level"] = float(score.noise_level)  # type: ignore[attr-defined]
            if truth is not None:
                record["error"] = mtd_error(f, truth, err_k)
            result.history.append(record)
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(change=f"{change:.2e}", loglik=f"{estep.log_likelihood:.4g}")
            fixed = cfg.gamma == "constant" and cfg.anneal_from is None
            ramp_done = score is None or fixed or tau + 1 >= self.ramp
            if change < cfg.tol and ramp_done:
                result.converged = True
                break
        result.estimate, result.sigma, result.occupancy = f, sig, log_rho.exp()
        return result


def approximate_em(
    measurement: torch.Tensor,
    size: int,
    *,
    sigma: float | None = None,
    init: torch.Tensor | None = None,
    score: ScoreFn | None = None,
    config: EMConfig | None = None,
    truth: torch.Tensor | None = None,
    truth_rotations: int | None = None,
    generator: torch.Generator | None = None,
    show_progress: bool = False,
) -> MTDResult:
    """Estimate the L×L image in an MTD measurement (Zabatani et al., Algorithm 1).

    Args:
        measurement: M (N, N); only its top-left ⌊N/L⌋L square is used.
        size: L.
        sigma: the noise standard deviation (known, as in the paper); None estimates it
            jointly (initialised at the standard deviation of M).
        init: F^(0) (L, L); default U[0, 1) noise from ``generator`` (the paper's
            initialisation for Gaussian images).
        score: ∇ log p(F) in the measurement's units (None: no image prior);
            :class:`~cryoprior.solvers.score_prior.PriorScore` or ``GaussianScore``.
        config: :class:`EMConfig`. With ``restarts`` R > 1, ``init`` (or U[0, 1) noise) and
            R − 1 further U[0, 1) images each run ``restart_iters`` iterations; the full run
            starts from the one with the highest log-likelihood (EM from a poor start
            stalls in a local optimum; Kreymer et al. start from an autocorrelation
            estimate instead).
        truth: the true F, only to record the error after each iteration.
        truth_rotations: rotations the error is minimised over (default ``config.rotations``
            when that is 1, 2 or 4, else 360).
        show_progress: a progress bar on stderr.
    """
    cfg = config or EMConfig()
    cfg.validate()
    L = int(size)
    data = PatchData(measurement, L)
    if init is None:
        f0 = torch.rand(L, L, generator=generator, dtype=torch.float64)
    else:
        require(tuple(init.shape) == (L, L), f"init must be ({L}, {L}), got {tuple(init.shape)}")
        f0 = init.detach().to("cpu", torch.float64).clone()
    if truth is not None:
        require(tuple(truth.shape) == (L, L), f"truth must be ({L}, {L}), got {tuple(truth.shape)}")
    err_k = truth_rotations or (cfg.rotations if cfg.rotations in (1, 2, 4) else 360)
    em = _EMRun(data, cfg, score, sigma, generator)
    restart_scores: list[float] = []
    if cfg.restarts > 1:
        best, best_ll = f0, -math.inf
        for i in range(cfg.restarts):
            start = f0 if i == 0 else torch.rand(L, L, generator=generator, dtype=torch.float64)
            trial = em.run(start, cfg.restart_iters)
            ll = trial.history[-1]["log_likelihood"]
            restart_scores.append(ll)
            if ll > best_ll:
                best, best_ll = start, ll
        f0 = best
    result = em.run(f0, cfg.max_iter, truth, err_k, show_progress)
    result.restart_log_likelihoods = restart_scores
    return result
