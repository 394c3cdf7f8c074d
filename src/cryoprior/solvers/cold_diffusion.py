"""Cold-diffusion samplers for heat-kernel super-resolution of point clouds.

A deterministic degradation D(X0, t) (a :class:`~cryoprior.physics.heat_kernel.
HeatKernelProcess`, t ∈ [0, 1], D(X0, 0) = X0) is inverted with a learned restoration
function R(x_t, t, mask) → x̂0 (Bansal et al. 2022, "Cold Diffusion: Inverting Arbitrary
Image Transforms Without Noise"). Starting from a degraded cloud x_{t_start} and going
down a decreasing time grid t_start = t_0 > t_1 > … > t_K = 0:

- :func:`one_step_restore`: x̂0 = R(x_{t_start}, t_start).
- :func:`cold_sample_naive` (Algorithm 1): x_s = D(R(x_t, t), s).
- :func:`cold_sample_improved` (Algorithm 2): x_s = x_t − D(x̂0, t) + D(x̂0, s),
  x̂0 = R(x_t, t).

With a perfect restorer both return X0 exactly. They differ under restoration errors:

- Algorithm 1 returns the restorer's last prediction R(x_{t_{K−1}}, t_{K−1}), so it is
  as good as R is at the smallest non-zero time: it wins when R's error vanishes as
  t → 0 (e.g. R only shrinks part of the way from x_t to X0).
- Algorithm 2 uses R only through the difference D(x̂0, s) − D(x̂0, t) (Bansal et al.
  2022, section 3.3): for a degradation linear in x̂0, D(x, t) = W_t x, and an error that
  is constant in t, x̂0 = X0 + δ, one finds x_{t_k} = W_{t_k} X0 + (W_{t_k} − W_{t_start}) δ,
  so the final error is (I − W_{t_start}) δ instead of δ: the part of the error that
  survives the full degradation (its smooth, low-frequency part, e.g. a global scale
  error) is removed. The heat-kernel blurs (weights from x̂0) behave alike: errors
  constant in t are reduced, errors that vanish at small t are not.

Every iterate is kept at zero COM over the real atoms (``remove_mean`` after each step
with the cheap check ``assert_zero_com``, Hoogeboom et al. 2022); padding stays 0.

:class:`RestorationModel` wraps an :class:`~cryoprior.networks.EGNN` as an E(3)-
equivariant restorer x̂0 = x_t + EGNN(x_t, c_noise(t)) (velocity parameterisation), and
:func:`restoration_loss` is its training objective (per-node masked MSE in Å²).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cryoprior.core.errors import InputError, require
from cryoprior.diffusion.pointcloud import assert_zero_com, node_mask_like, remove_mean
from cryoprior.networks.egnn import EGNN
from cryoprior.physics.heat_kernel import HeatKernelProcess

#: R(x_t (B,N,3), t (B,), mask (B,N) or None) -> x̂0 (B,N,3)
Restorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def time_grid(
    t_start: float,
    steps: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The decreasing grid t_start = t_0 > … > t_steps = 0, uniform in t, shape (steps+1,)."""
    require(0.0 < float(t_start) <= 1.0, f"t_start must lie in (0, 1], got {t_start}")
    require(int(steps) >= 1, f"steps must be >= 1, got {steps}")
    grid = torch.linspace(float(t_start), 0.0, int(steps) + 1, dtype=dtype, device=device)
    grid[-1] = 0.0
    return grid


def _batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A time as a (B,) tensor in ``x``'s dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _start(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if x.ndim != 3 or x.shape[-1] != 3:
        raise InputError(f"a point cloud must have shape (B, N, 3), got {tuple(x.shape)}")
    return remove_mean(x, mask)


def _restore(
    restore: Restorer, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    x0_hat = restore(x, t, mask)
    if tuple(x0_hat.shape) != tuple(x.shape):
        raise InputError(
            f"the restorer returned shape {tuple(x0_hat.shape)}, expected {tuple(x.shape)}"
        )
    return x0_hat if mask is None else x0_hat * node_mask_like(mask, x0_hat)


def one_step_restore(
    restore: Restorer,
    x_t: torch.Tensor,
    t: torch.Tensor | float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """x̂0 = R(x_t, t) from a degraded cloud (B, N, 3) Å, returned at zero COM."""
    x = _start(x_t, mask)
    return remove_mean(_restore(restore, x, _batch_time(t, x), mask), mask)


def _cold_sample(
    step: Callable[..., torch.Tensor],
    restore: Restorer,
    process: HeatKernelProcess,
    x_start: torch.Tensor,
    mask: torch.Tensor | None,
    t_start: float,
    steps: int,
    return_trajectory: bool,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    x = _start(x_start, mask)
    grid = time_grid(t_start, steps, dtype=x.dtype, device=x.device)
    trajectory = [x]
    for i in range(int(steps)):
        t, s = _batch_time(grid[i], x), _batch_time(grid[i + 1], x)
        x0_hat = _restore(restore, x, t, mask)
        x = remove_mean(step(process, x, x0_hat, t, s, mask), mask)
        assert_zero_com(x, mask)
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def _naive_step(process, x, x0_hat, t, s, mask):
    # Bansal et al. 2022, Algorithm 1: x_s = D(x̂0, s)
    return process.degrade(x0_hat, s, mask)


def _improved_step(process, x, x0_hat, t, s, mask):
    # Bansal et al. 2022, Algorithm 2: x_s = x_t − D(x̂0, t) + D(x̂0, s)
    return x - process.degrade(x0_hat, t, mask) + process.degrade(x0_hat, s, mask)


def cold_sample_naive(
    restore: Restorer,
    process: HeatKernelProcess,
    x_start: torch.Tensor,
    mask: torch.Tensor | None = None,
    t_start: float = 1.0,
    steps: int = 50,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Cold diffusion, Algorithm 1 (x_s = D(R(x_t, t), s)), from ``x_start`` at ``t_start``.

    ``x_start`` (B, N, 3) Å is the degraded cloud (centred here), ``mask`` (B, N) its real
    atoms, ``steps`` the number of steps of the uniform grid down to t = 0. Returns the
    restored cloud (zero COM, padding 0), and with ``return_trajectory`` also the list of
    the ``steps + 1`` iterates, starting with the centred input.
    """
    return _cold_sample(
        _naive_step, restore, process, x_start, mask, t_start, steps, return_trajectory
    )


def cold_sample_improved(
    restore: Restorer,
    process: HeatKernelProcess,
    x_start: torch.Tensor,
    mask: torch.Tensor | None = None,
    t_start: float = 1.0,
    steps: int = 50,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Cold diffusion, Algorithm 2 (x_s = x_t − D(x̂0, t) + D(x̂0, s)); arguments as
    :func:`cold_sample_naive`."""
    return _cold_sample(
        _improved_step, restore, process, x_start, mask, t_start, steps, return_trajectory
    )


class RestorationModel(nn.Module):
    """E(3)-equivariant restorer x̂0 = x_t + EGNN(x_t, c_noise(t), mask, h) (Å).

    The EGNN's displacement field is translation-invariant, rotates with its input and has
    zero mean over real atoms, so x̂0 is E(3)- and permutation-equivariant and has the COM
    of x_t; padding is 0. ``c_noise`` maps the process time t (B,) to the network's noise
    label (default: t itself).
    """

    def __init__(
        self,
        net: EGNN,
        c_noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.c_noise = c_noise

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        mask: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x̂0 (B, N, 3) from the degraded cloud ``x_t`` (B, N, 3) at times ``t`` (B,)."""
        t = _batch_time(t, x_t)
        label = t if self.c_noise is None else self.c_noise(t)
        vel = self.net(x_t, label, mask=mask, h=h)
        out = x_t + vel
        return out if mask is None else out * node_mask_like(mask, out)


def restoration_loss(
    model: Callable[..., torch.Tensor],
    process: HeatKernelProcess,
    x0: torch.Tensor,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    h: torch.Tensor | None = None,
    noise_std: float = 0.0,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cold-diffusion training loss: mean over clouds of the per-node masked MSE (Å²).

    X0 is centred, t ~ U(0, 1) per cloud (from ``generator``, or the given (B,) ``t``),
    x_t = D(X0, t) (+ zero-COM noise of ``noise_std`` Å) and the loss is
    mean_b [ Σ_real ‖R(x_t, t) − X0‖² / n_real ] (Bansal et al. 2022, Eq. 1, with the
    ℓ2 norm per atom). Padding never enters the loss.
    """
    x0 = _start(x0, mask)
    b = x0.shape[0]
    if t is None:
        gen_device = generator.device if generator is not None else x0.device
        t = torch.rand(b, generator=generator, dtype=x0.dtype, device=gen_device).to(x0.device)
    t = _batch_time(t, x0)
    with torch.no_grad():
        x_t = process.degrade(x0, t, mask, noise_std=noise_std, generator=generator)
    x0_hat = model(x_t, t, mask) if h is None else model(x_t, t, mask, h)
    m = (
        torch.ones(x0.shape[:2], dtype=x0.dtype, device=x0.device)
        if mask is None
        else mask.to(x0.dtype)
    )
    err = ((x0_hat - x0) ** 2).sum(-1) * m
    return (err.sum(1) / m.sum(1).clamp_min(1.0)).mean()
