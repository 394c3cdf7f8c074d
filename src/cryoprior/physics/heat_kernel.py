"""Heat-kernel degradation of point clouds: the forward process of cold diffusion.

A point cloud is ``x`` (B, N, 3) in Å with a node mask (B, N) (1 for a real atom, 0 for
padding). Two deterministic degradations D(X0, t) smooth a cloud towards its centre of
mass (COM); both are E(3)-equivariant (rotations, reflections, translations), permutation-
equivariant, keep the COM, ignore padding (padding neither pulls real atoms nor moves:
padded nodes stay exactly 0) and are the identity at zero blur.

- :func:`gaussian_kernel_blur` — one step of Gaussian mean-shift smoothing with weights
  from the cloud itself,

      W_ij = exp(−‖xᵢ − xⱼ‖² / (2σ²)) / Σ_k exp(−‖xᵢ − x_k‖² / (2σ²))   (i, j, k real)
      X_t  = W X0,   then translated so that COM(X_t) = COM(X0).

  The kernel is Gaussian in the *squared* distance (the seed code of Jung et al. used
  exp(−d/r) on unsquared distances) and the sums run over real atoms only (the seed code
  let padding at the origin pull atoms inward). Rows of W sum to one, so W(X + c) =
  WX + c (translation equivariance), but W is not symmetric, so Σᵢ (WX)ᵢ ≠ Σᵢ Xᵢ in
  general: the output is re-centred on the input's COM, a translation, which keeps
  E(3)-equivariance.

- :func:`heat_semigroup` — the heat semigroup of a graph Laplacian,

      X_t = exp(−t L) X0,   L = D − A,   A_ij = exp(−‖xᵢ − xⱼ‖² / (2ℓ²)) (i ≠ j, real),

  with the graph built from X0 (Belkin & Niyogi 2003, heat-kernel weights; Kondor &
  Lafferty 2002, diffusion kernels on graphs), evaluated by the eigendecomposition of the
  symmetric L (``torch.linalg.eigh``, batched): exp(−tL) = V exp(−tΛ) Vᵀ. Since L·1 = 0
  and L is symmetric, exp(−tL) has unit row and column sums: the COM is kept exactly (in
  exact arithmetic; the output is re-centred to remove round-off) and, for a connected
  graph, X_t → COM as t → ∞. ``t`` is dimensionless (A is). Gradients through ``eigh``
  are undefined at repeated eigenvalues (padding nodes all have eigenvalue 0): use this
  operator without autograd through it.

:class:`HeatKernelProcess` packages either degradation as a noise process on t ∈ [0, 1]:
a blur radius σ(t) in Å from 0 at t = 0 to ``max_radius`` at t = 1, and
``degrade(x0, t, mask)``. For ``kind="semigroup"`` the heat time is calibrated from σ
by :func:`semigroup_time` (a heuristic: a continuous-time random walk on the graph makes
jumps at rate ≈ mean degree d̄, each of variance ≈ ℓ² per axis, so its spread after heat
time τ is σ² ≈ τ d̄ ℓ²).
"""

from __future__ import annotations

from typing import Any

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.tensors import expand_like

KINDS = ("gaussian", "semigroup")
SCHEDULES = ("linear", "quadratic")


def _node_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate a cloud and its mask; return the mask as (B, N) in ``x``'s dtype."""
    if x.ndim != 3 or not x.is_floating_point():
        raise InputError(
            f"a point cloud must be a float tensor of shape (B, N, 3), got {tuple(x.shape)} "
            f"{x.dtype}"
        )
    if mask is None:
        m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    else:
        require(
            tuple(mask.shape) == tuple(x.shape[:2]),
            f"node mask must have shape (B, N) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}",
        )
        m = mask.to(dtype=x.dtype, device=x.device)
    require(
        x.shape[1] > 0 and bool((m.sum(1) > 0).all()),
        "every cloud needs at least one real atom (mask has an all-zero row)",
    )
    return m


def _per_sample(v: torch.Tensor | float, x: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or (B,) value as a finite, non-negative (B,) tensor in ``x``'s dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    b = x.shape[0]
    if v.ndim == 0:
        v = v.expand(b)
    require(
        tuple(v.shape) == (b,), f"{name} must be a number or shape ({b},), got {tuple(v.shape)}"
    )
    require(
        bool(torch.isfinite(v).all() and (v >= 0).all()),
        f"{name} must be finite and >= 0, got {v.tolist()}",
    )
    return v


def _com(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """COM (B, 1, 3) of the real nodes (m (B, N) float)."""
    return (x * m[..., None]).sum(1, keepdim=True) / m.sum(1)[:, None, None]


def _recentre(y: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Translate ``y`` so its COM equals that of ``x``; padding set to 0."""
    return (y - _com(y, m) + _com(x, m)) * m[..., None]


def pairwise_sq_distances(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances ‖xᵢ − xⱼ‖² in Å², shape (B, N, N), exact zeros on the diagonal.

    Computed as |a|² + |b|² − 2a·b on coordinates centred on the real atoms' COM (so the
    result is translation-invariant and cancellation is limited to the cloud's radius);
    entries involving padding are meaningless and must be masked by the caller.
    """
    m = _node_mask(x, mask)
    xc = (x - _com(x, m)) * m[..., None]
    sq = (xc * xc).sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * xc @ xc.transpose(1, 2)).clamp_min(0.0)
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0)


def gaussian_kernel_matrix(
    x: torch.Tensor, sigma: torch.Tensor | float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Row-normalised Gaussian kernel W (B, N, N) over real atoms, bandwidth σ in Å.

    W_ij ∝ exp(−‖xᵢ − xⱼ‖²/(2σ²)) for real i, j; rows of real atoms sum to 1; rows and
    columns of padding are 0. σ (scalar or (B,)) = 0 gives the identity on real atoms.
    """
    m = _node_mask(x, mask)
    sigma = _per_sample(sigma, x, "sigma")
    d2 = pairwise_sq_distances(x, m)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    logits = -d2 / expand_like(2.0 * safe * safe, d2)
    logits = logits.masked_fill(m[:, None, :] <= 0, float("-inf"))
    w = torch.softmax(logits, dim=-1) * m[:, :, None]
    eye = torch.diag_embed(m)
    return torch.where(expand_like(sigma, d2) > 0, w, eye)


def gaussian_kernel_blur(
    x: torch.Tensor, sigma: torch.Tensor | float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian mean-shift blur X_t = W X0 of a cloud (B, N, 3) Å, COM kept, padding 0.

    W is :func:`gaussian_kernel_matrix` (bandwidth σ Å, scalar or (B,)); the output is
    then translated so that its COM over real atoms equals the input's (W is not
    symmetric, so W X alone moves the COM). σ = 0 returns the (masked) input exactly.
    """
    m = _node_mask(x, mask)
    sigma = _per_sample(sigma, x, "sigma")
    xm = x * m[..., None]
    y = _recentre(gaussian_kernel_matrix(xm, sigma, m) @ xm, xm, m)
    return torch.where(expand_like(sigma, x) > 0, y, xm)


def gaussian_adjacency(
    x: torch.Tensor, mask: torch.Tensor | None = None, length_scale: float = 3.0
) -> torch.Tensor:
    """A_ij = exp(−‖xᵢ − xⱼ‖²/(2ℓ²)) for real i ≠ j, else 0; shape (B, N, N); ℓ in Å."""
    m = _node_mask(x, mask)
    ell = require_positive(length_scale, "length_scale")
    d2 = pairwise_sq_distances(x, m)
    off = 1.0 - torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.exp(-d2 / (2.0 * ell * ell)) * (m[:, :, None] * m[:, None, :] * off)


def graph_laplacian(
    x: torch.Tensor, mask: torch.Tensor | None = None, length_scale: float = 3.0
) -> torch.Tensor:
    """Combinatorial Laplacian L = D − A (B, N, N) of :func:`gaussian_adjacency`."""
    a = gaussian_adjacency(x, mask, length_scale)
    return torch.diag_embed(a.sum(-1)) - a


def heat_semigroup_matrix(
    x: torch.Tensor,
    t: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    length_scale: float = 3.0,
) -> torch.Tensor:
    """exp(−tL) (B, N, N) for the Laplacian of the cloud's Gaussian graph, by ``eigh``.

    Symmetric with unit row and column sums on the real block; identity on padding.
    ``t`` (scalar or (B,), dimensionless) = 0 gives exactly the identity.
    """
    t = _per_sample(t, x, "t")
    lap = graph_laplacian(x, mask, length_scale)
    lam, v = torch.linalg.eigh(lap)
    decay = torch.exp(-t[:, None] * lam.clamp_min(0.0))  # L is positive semi-definite
    k = (v * decay[:, None, :]) @ v.transpose(1, 2)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand_as(k)
    return torch.where(expand_like(t, k) > 0, k, eye)


def heat_semigroup(
    x: torch.Tensor,
    t: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    length_scale: float = 3.0,
) -> torch.Tensor:
    """X_t = exp(−tL) X0 for a cloud (B, N, 3) Å; the graph (scale ℓ Å) is built from X0.

    COM kept (re-centred to remove round-off), padding 0, ``t`` = 0 is the identity.
    """
    m = _node_mask(x, mask)
    t = _per_sample(t, x, "t")
    xm = x * m[..., None]
    y = _recentre(heat_semigroup_matrix(xm, t, m, length_scale) @ xm, xm, m)
    return torch.where(expand_like(t, x) > 0, y, xm)


def semigroup_time(
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    length_scale: float = 3.0,
) -> torch.Tensor:
    """Heat time τ (B,) with spread ≈ σ Å: τ = σ²/(ℓ² d̄), d̄ = mean degree of real atoms.

    A heuristic calibration (see the module docstring); τ = 0 for a graph without edges.
    """
    m = _node_mask(x, mask)
    sigma = _per_sample(sigma, x, "sigma")
    ell = require_positive(length_scale, "length_scale")
    degree = (gaussian_adjacency(x, m, ell).sum(-1) * m).sum(1) / m.sum(1)
    safe = torch.where(degree > 0, degree, torch.ones_like(degree))
    return torch.where(degree > 0, sigma * sigma / (ell * ell * safe), torch.zeros_like(sigma))


class HeatKernelProcess:
    """Heat-kernel degradation D(X0, t) on t ∈ [0, 1] (the cold-diffusion forward process).

    Args:
        max_radius: blur radius σ(1) in Å.
        kind: ``"gaussian"`` (:func:`gaussian_kernel_blur` with bandwidth σ(t)) or
            ``"semigroup"`` (:func:`heat_semigroup` at heat time
            :func:`semigroup_time` (σ(t)), graph scale ``length_scale``).
        schedule: σ(t) = max_radius · t (``"linear"``) or max_radius · t² (``"quadratic"``,
            finer steps at small blur); σ(0) = 0, so D(X0, 0) = X0 exactly.
        length_scale: ℓ in Å of the semigroup's Gaussian graph (unused for ``"gaussian"``).
    """

    def __init__(
        self,
        max_radius: float = 3.0,
        kind: str = "gaussian",
        schedule: str = "linear",
        length_scale: float = 3.0,
    ) -> None:
        self.max_radius = require_positive(max_radius, "max_radius")
        require(kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
        require(schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.kind = kind
        self.schedule = schedule
        self.length_scale = require_positive(length_scale, "length_scale")

    def config(self) -> dict[str, Any]:
        """Parameters that rebuild this process: ``HeatKernelProcess(**p.config())``."""
        return {
            "max_radius": self.max_radius,
            "kind": self.kind,
            "schedule": self.schedule,
            "length_scale": self.length_scale,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"HeatKernelProcess({args})"

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Blur radius σ(t) in Å (same shape as ``t``; a number gives a float64 scalar)."""
        t = t if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        require(
            bool(((t >= 0) & (t <= 1)).all()),
            f"t must lie in [0, 1], got {t.tolist()}",
        )
        power = 1 if self.schedule == "linear" else 2
        return self.max_radius * t**power

    def degrade(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | float,
        mask: torch.Tensor | None = None,
        noise_std: torch.Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """D(X0, t) for a cloud (B, N, 3) Å at times ``t`` (scalar or (B,)) in [0, 1].

        ``noise_std`` (Å, scalar or (B,)) adds Gaussian noise with zero COM over the real
        atoms (drawn on ``generator``'s device), a model of a real low-resolution
        structure; 0 (default) gives the deterministic degradation. Padding stays 0.
        """
        m = _node_mask(x0, mask)
        t = _per_sample(t, x0, "t")
        sigma = self.sigma(t)
        if self.kind == "gaussian":
            xt = gaussian_kernel_blur(x0, sigma, m)
        else:
            tau = semigroup_time(x0 * m[..., None], sigma, m, self.length_scale)
            xt = heat_semigroup(x0, tau, m, self.length_scale)
        std = _per_sample(noise_std, x0, "noise_std")
        if bool((std > 0).any()):
            gen_device = generator.device if generator is not None else x0.device
            z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=gen_device)
            z = z.to(x0.device) * m[..., None]
            z = (z - _com(z, m)) * m[..., None]
            xt = xt + expand_like(std, xt) * z
        return xt
