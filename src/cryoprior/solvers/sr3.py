"""SR3 super-resolution: conditioning glue, conditional sampling and the regression baseline.

SR3 (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement", Sec. 2)
learns a conditional denoiser D(x_t, t | y) of the high-resolution x given the
low-resolution y, with y upsampled to the target grid and concatenated to x_t as extra
channels. Here (as in SR-CryoEM, which embeds the input and output resolutions in Å next
to the time step) two per-sample scalars also go to the network, so one model serves
several factors and resolutions:

- :class:`SR3Conditioner` turns a low-resolution batch (B, C, *spatial_low) into the
  denoiser's conditioning keyword arguments ``{"cond": up(y), "extra_scalars": s}``:
  ``up`` is :func:`~cryoprior.physics.degrade.fourier_upsample` (default) or
  :func:`~cryoprior.physics.degrade.linear_upsample`, and s = (R_in, R_out) / 10 Å
  (:data:`RESOLUTION_SCALE`), by default the Nyquist resolutions 2 · pixel size of the
  low- and high-resolution grids. A network for it is
  ``UNet(dims, 1, 1, cond_channels=1, n_extra_scalars=2)`` wrapped in a
  :class:`~cryoprior.diffusion.Denoiser`.
- :func:`sr3_loss`: the denoising score-matching loss with that conditioning (SR3 Eq. 6).
- :func:`sr3_sample`: n conditional samples by DDIM or DDPM, their mean and standard
  deviation, optionally made consistent with the measurement (below).
- :func:`regression_predict` / :func:`regression_loss`: the regression baseline of SR3
  (Sec. 4.1, "Regression" — same conditioning and network, x predicted in one pass and
  trained with L2).

Data consistency (``data_consistency``): with D the Fourier cropping of
:class:`~cryoprior.physics.degrade.DownsampleOperator` and U its right inverse (Fourier
zero-padding, D U = I), x̂ ← x̂ + U (y − D x̂) replaces the low-frequency Fourier
coefficients of x̂ by the measured ones, so D x̂ = y exactly; the frequencies above the
low-resolution Nyquist are left to the prior. "final" projects the finished samples;
"every_step" also projects the denoiser's x̂0 at every step and recomputes ε̂ from it
(the range–null-space decomposition of DDNM, Wang et al. 2023, Eq. 13, noiseless case),
so the sampler's trajectory is consistent too. With a noisy measurement the projection
copies its noise into the low frequencies.

Normalisation: the network works on (x − ``norm_mean``) / ``norm_std``; the low-resolution
input is normalised the same way (Fourier cropping preserves constants, so the two agree)
and the samples are returned in the input's units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from cryoprior.core.errors import require, require_positive
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion.denoiser import DenoiserLike, DenoiserOutput, per_sample_time
from cryoprior.diffusion.losses import dsm_loss
from cryoprior.diffusion.samplers import ddim_sample, ddpm_sample
from cryoprior.diffusion.schedules import TimeLike
from cryoprior.physics.degrade import (
    DownsampleOperator,
    fourier_upsample,
    linear_upsample,
    resampled_shape,
)

#: Å; resolutions are divided by it before the network embeds them (1–20 Å -> 0.1–2)
RESOLUTION_SCALE = 10.0
UPSAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "fourier": fourier_upsample,
    "linear": linear_upsample,
}
CONSISTENCY = ("none", "final", "every_step")


class SR3Conditioner:
    """Conditioning inputs of an SR3 network for ``ndim``-dimensional grids.

    Args:
        ndim: spatial dimensions (2 images, 3 maps).
        upsample: "fourier" (zero-padding, band-limited) or "linear" (bi/trilinear).
        resolution_scale: Å; the extra scalars are resolutions / ``resolution_scale``.
    """

    n_extra_scalars = 2

    def __init__(
        self, ndim: int, upsample: str = "fourier", resolution_scale: float = RESOLUTION_SCALE
    ) -> None:
        require(ndim in (1, 2, 3), f"ndim must be 1, 2 or 3, got {ndim}")
        require(upsample in UPSAMPLERS, f"upsample must be one of {tuple(UPSAMPLERS)}")
        self.ndim = int(ndim)
        self.upsample_mode = upsample
        self.resolution_scale = require_positive(resolution_scale, "resolution scale (Å)")

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that rebuild this conditioner."""
        return {
            "ndim": self.ndim,
            "upsample": self.upsample_mode,
            "resolution_scale": self.resolution_scale,
        }

    def check(self, low_res: torch.Tensor) -> None:
        """Raise unless ``low_res`` is a real (B, C, *spatial) batch of ``ndim`` grids."""
        require(
            isinstance(low_res, torch.Tensor)
            and low_res.is_floating_point()
            and low_res.ndim == self.ndim + 2,
            f"low-resolution input must be a real (B, C, {self.ndim} spatial sizes) tensor, "
            f"got {tuple(getattr(low_res, 'shape', ()))}",
        )

    def upsample(self, low_res: torch.Tensor, factor: float) -> torch.Tensor:
        """(B, C, *spatial_low) -> (B, C, *spatial_low · factor) on the target grid."""
        self.check(low_res)
        return UPSAMPLERS[self.upsample_mode](low_res, factor, ndim=self.ndim)

    def scalars(
        self,
        batch: int,
        factor: float,
        pixel_size_low: float,
        input_resolution: float | torch.Tensor | None = None,
        output_resolution: float | torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(B, 2) extra scalars (R_in, R_out) / ``resolution_scale``.

        Resolutions in Å, scalars or (B,); by default the Nyquist resolutions
        R_in = 2 · ``pixel_size_low`` and R_out = R_in / ``factor``.
        """
        px = require_positive(pixel_size_low, "low-resolution pixel size (Å/px)")
        f = require_positive(factor, "super-resolution factor")
        r_in = 2.0 * px if input_resolution is None else input_resolution
        r_out = 2.0 * px / f if output_resolution is None else output_resolution
        cols = []
        for r in (r_in, r_out):
            t = torch.as_tensor(r, dtype=torch.float64).flatten().to(device)
            require(
                t.numel() in (1, batch) and bool((t > 0).all()),
                f"resolutions must be > 0 Å, one value or {batch}, got {r}",
            )
            cols.append(t.expand(batch))
        return (torch.stack(cols, dim=-1) / self.resolution_scale).to(dtype)

    def __call__(
        self,
        low_res: torch.Tensor,
        factor: float,
        pixel_size_low: float,
        input_resolution: float | torch.Tensor | None = None,
        output_resolution: float | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning keywords ``{"cond": (B, C, *spatial_high),
        "extra_scalars": (B, 2)}`` for the low-resolution batch ``low_res``."""
        up = self.upsample(low_res, factor)
        s = self.scalars(
            low_res.shape[0],
            factor,
            pixel_size_low,
            input_resolution,
            output_resolution,
            low_res.dtype,
            low_res.device,
        )
        return {"cond": up, "extra_scalars": s}


def factor_from_shapes(low_res: torch.Tensor, high_res: torch.Tensor, ndim: int) -> float:
    """The super-resolution factor N / M of a (low, high) pair; the same on every axis."""
    ratios = {high_res.shape[-i - 1] / low_res.shape[-i - 1] for i in range(ndim)}
    require(
        len(ratios) == 1 and min(ratios) >= 1,
        f"high-resolution shape {tuple(high_res.shape)} is not the same factor (>= 1) times "
        f"the low-resolution shape {tuple(low_res.shape)}",
    )
    return ratios.pop()


def _default(conditioner: SR3Conditioner | None, low_res: torch.Tensor) -> SR3Conditioner:
    return conditioner if conditioner is not None else SR3Conditioner(low_res.ndim - 2)


def sr3_loss(
    denoiser: DenoiserLike,
    low_res: torch.Tensor,
    high_res: torch.Tensor,
    pixel_size_low: float,
    conditioner: SR3Conditioner | None = None,
    generator: torch.Generator | None = None,
    residual: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample (B,) DSM loss of x = ``high_res`` given y = ``low_res`` (SR3 Eq. 6).

    Both (B, C, *spatial), already normalised; the factor is read from their shapes;
    ``conditioner`` defaults to Fourier upsampling; ``kwargs`` go to
    :func:`~cryoprior.diffusion.dsm_loss` (weighting, target, ...). ``residual``: the
    diffused variable is the detail x − up(y) instead of x (as SRDiff, Li et al. 2022;
    :func:`sr3_sample` adds up(y) back).
    """
    cond_fn = _default(conditioner, low_res)
    cond_fn.check(low_res)
    factor = factor_from_shapes(low_res, high_res, cond_fn.ndim)
    cond = cond_fn(low_res, factor, pixel_size_low)
    _check_pair(cond["cond"], high_res)
    target = high_res - cond["cond"] if residual else high_res
    return dsm_loss(denoiser, target, generator, cond=cond, **kwargs)


def _check_pair(up: torch.Tensor, high_res: torch.Tensor) -> None:
    require(
        tuple(up.shape) == tuple(high_res.shape),
        f"high-resolution target {tuple(high_res.shape)} does not match the upsampled "
        f"low-resolution input {tuple(up.shape)}: the box must be factor × the low-res box",
    )


class _ConsistentDenoiser(nn.Module):
    """Wrap a denoiser so that its x̂0 satisfies D (x̂0 + offset) = y (DDNM, Wang et al.
    2023, Eq. 13); ``offset`` is up(y) for a residual prior (the denoiser's x is the
    detail), else 0."""

    def __init__(
        self,
        denoiser: DenoiserLike,
        op: DownsampleOperator,
        low_res: torch.Tensor,
        offset: torch.Tensor | float = 0.0,
    ) -> None:
        super().__init__()
        self.inner, self.op, self.low_res, self.offset = denoiser, op, low_res, offset
        self.schedule = denoiser.schedule
        self.representation = denoiser.representation

    def forward(self, x_t: torch.Tensor, t: TimeLike, **cond: Any) -> DenoiserOutput:
        out = self.inner(x_t, t, **cond)
        x0 = self.op.project(out.x0 + self.offset, self.low_res) - self.offset
        alpha, sigma = self.schedule.alpha_sigma(per_sample_time(t, x_t))
        s = expand_like(sigma, x_t)
        eps = (x_t - expand_like(alpha, x_t) * x0) / s
        return DenoiserOutput(x0=x0, eps=eps, score=-eps / s)


class SR3Result(NamedTuple):
    """Samples (n, *spatial_high), their mean and standard deviation (*spatial_high), in
    the input's units, and the high-resolution pixel size in Å/px."""

    samples: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pixel_size: float


def _consistency_mode(data_consistency: bool | str) -> str:
    if data_consistency is True:
        return "final"
    if data_consistency is False or data_consistency is None:
        return "none"
    require(
        data_consistency in CONSISTENCY,
        f"data_consistency must be True/False or one of {CONSISTENCY}, got {data_consistency!r}",
    )
    return str(data_consistency)


@torch.no_grad()
def sr3_sample(
    denoiser: DenoiserLike,
    low_res: torch.Tensor,
    factor: float,
    pixel_size_low: float,
    n_samples: int = 8,
    steps: int = 50,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    data_consistency: bool | str = False,
    conditioner: SR3Conditioner | None = None,
    norm_mean: float = 0.0,
    norm_std: float = 1.0,
    eta: float = 0.0,
    input_resolution: float | None = None,
    output_resolution: float | None = None,
    batch_size: int | None = None,
    show_progress: bool = False,
    residual: bool = False,
) -> SR3Result:
    """Draw ``n_samples`` super-resolved versions of one low-resolution image or map.

    Args:
        denoiser: a conditional denoiser taking ``cond`` and ``extra_scalars`` (SR3).
        low_res: (*spatial_low) one image (H, W) or map (D, H, W), in physical units.
        factor: super-resolution factor; the output grid is ``factor`` × larger per axis
            and its pixel size ``pixel_size_low / factor``.
        pixel_size_low: Å/px of ``low_res``.
        steps, sampler: number of steps of "ddim" (``eta`` its stochasticity) or "ddpm".
        data_consistency: False/"none", True/"final" or "every_step" (module docstring).
        conditioner: default ``SR3Conditioner(low_res.ndim)`` (Fourier upsampling).
        norm_mean, norm_std: the network's data normalisation (x − mean) / std.
        input_resolution, output_resolution: Å, for the extra scalars (default Nyquist).
        batch_size: samples per sampler call (default all at once).
        residual: the denoiser models the detail x − up(y) (:func:`sr3_loss`); each
            sample is up(y) + the sampled detail.

    Returns samples (n, *spatial_high), their pixel-wise mean and standard deviation
    (unbiased, 0 for one sample) in the units of ``low_res``, and the output pixel size.
    """
    require(sampler in ("ddim", "ddpm"), f'sampler must be "ddim" or "ddpm", got {sampler!r}')
    mode = _consistency_mode(data_consistency)
    require(int(n_samples) >= 1, f"n_samples must be >= 1, got {n_samples}")
    require(int(steps) >= 1, f"steps must be >= 1, got {steps}")
    std = require_positive(norm_std, "normalisation std")
    require(
        isinstance(low_res, torch.Tensor) and low_res.ndim in (1, 2, 3),
        f"low_res must be one image (H, W) or map (D, H, W), got "
        f"{tuple(getattr(low_res, 'shape', ()))}",
    )
    cond_fn = conditioner if conditioner is not None else SR3Conditioner(low_res.ndim)
    require(
        cond_fn.ndim == low_res.ndim,
        f"the conditioner is for {cond_fn.ndim}-D grids but low_res has {low_res.ndim} axes",
    )
    high_shape = resampled_shape(low_res.shape, factor, up=True)
    y = ((low_res - norm_mean) / std).unsqueeze(0).unsqueeze(0)
    op = DownsampleOperator(high_shape, factor)
    offset = cond_fn.upsample(y, factor) if residual else None  # (1, 1, *high_shape)
    model: DenoiserLike = denoiser
    if mode == "every_step":
        model = _ConsistentDenoiser(denoiser, op, y[0], 0.0 if offset is None else offset[0])
    chunk = int(batch_size) if batch_size else int(n_samples)
    require(chunk >= 1, f"batch_size must be >= 1, got {batch_size}")
    parts = []
    for start in range(0, int(n_samples), chunk):
        b = min(chunk, int(n_samples) - start)
        yb = y.expand(b, *y.shape[1:])
        cond = cond_fn(yb, factor, pixel_size_low, input_resolution, output_resolution)
        shape = (b, 1, *high_shape)
        common: dict[str, Any] = {
            "generator": generator,
            "cond": cond,
            "dtype": low_res.dtype,
            "device": low_res.device,
            "show_progress": show_progress,
        }
        if sampler == "ddim":
            x = ddim_sample(model, shape, steps, eta=eta, **common)
        else:
            x = ddpm_sample(model, shape, steps, **common)
        if offset is not None:
            x = x + offset
        if mode != "none":
            x = op.project(x, yb)
        parts.append(x[:, 0])
    samples = torch.cat(parts, dim=0) * std + norm_mean
    spread = samples.std(dim=0) if samples.shape[0] > 1 else torch.zeros_like(samples[0])
    return SR3Result(samples, samples.mean(dim=0), spread, float(pixel_size_low) / float(factor))


def regression_predict(
    net: nn.Module | Callable[..., torch.Tensor],
    low_res: torch.Tensor,
    factor: float,
    pixel_size_low: float,
    conditioner: SR3Conditioner | None = None,
    residual: bool = False,
) -> torch.Tensor:
    """The regression baseline's x̂ = net(up(y), 0, extra_scalars=s) (SR3 Sec. 4.1).

    ``net`` is called like a diffusion network with the upsampled input in place of x_t
    and a constant noise label 0 (e.g. ``UNet(dims, 1, 1, n_extra_scalars=2)``). With
    ``residual=True`` the prediction is up(y) + net(...) (the network learns the missing
    detail). ``low_res`` (B, C, *spatial_low), normalised; returns (B, C, *spatial_high).
    """
    cond = _default(conditioner, low_res)(low_res, factor, pixel_size_low)
    up = cond["cond"]
    c_noise = torch.zeros(up.shape[0], dtype=up.dtype, device=up.device)
    out = net(up, c_noise, extra_scalars=cond["extra_scalars"])
    return up + out if residual else out


def regression_loss(
    net: nn.Module | Callable[..., torch.Tensor],
    low_res: torch.Tensor,
    high_res: torch.Tensor,
    pixel_size_low: float,
    conditioner: SR3Conditioner | None = None,
    residual: bool = False,
) -> torch.Tensor:
    """Per-sample (B,) mean squared error ‖x̂ − x‖² / n_values of
    :func:`regression_predict` against ``high_res`` (B, C, *spatial_high); the factor is
    read from the shapes."""
    cond_fn = _default(conditioner, low_res)
    cond_fn.check(low_res)
    factor = factor_from_shapes(low_res, high_res, cond_fn.ndim)
    pred = regression_predict(net, low_res, factor, pixel_size_low, cond_fn, residual)
    _check_pair(pred, high_res)
    return ((pred - high_res) ** 2).flatten(1).mean(dim=1)


__all__ = [
    "CONSISTENCY",
    "RESOLUTION_SCALE",
    "UPSAMPLERS",
    "SR3Conditioner",
    "SR3Result",
    "factor_from_shapes",
    "regression_loss",
    "regression_predict",
    "sr3_loss",
    "sr3_sample",
]
