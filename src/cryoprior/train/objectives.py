"""Training objectives of ``cryoprior train`` and the use of what they train.

A run config's ``[objective]`` (resolved by :func:`cryoprior.train.config.resolve_objective`)
picks what the network learns; for each kind this module builds the trained module, its
loss ``loss_fn(model, batch, generator)`` for the :class:`~cryoprior.train.trainer.Trainer`
and the objective record saved in ``prior.json`` (``PriorMetadata.objective``), and, for the
super-resolution kinds, how a loaded prior is applied:

- ``"denoising"``: a :class:`~cryoprior.diffusion.Denoiser` trained by denoising score
  matching (:func:`make_dsm_loss`).
- ``"heat_restoration"``: the cold-diffusion restorer x̂0 = x_t + EGNN(x_t, t)
  (:class:`~cryoprior.solvers.cold_diffusion.RestorationModel`) trained with
  :func:`~cryoprior.solvers.cold_diffusion.restoration_loss` (Bansal et al. 2022, Eq. 1;
  per-node masked MSE) under the heat-kernel blur
  :class:`~cryoprior.physics.heat_kernel.HeatKernelProcess`. The network sees clouds in
  units of the data's length scale s (Å): both blurs are scale-equivariant
  (D(X/s; σ/s, ℓ/s) = D(X; σ, ℓ)/s, the kernels depend on distances over σ or ℓ only),
  so the process in network units has radius ``max_radius / s`` and graph scale
  ``length_scale / s``, and the restorer in Å is s · R(x/s, t) (:class:`PointRestorer`).
- ``"sr3"``: a conditional U-Net denoiser of the high-resolution item given its
  low-resolution version, trained with :func:`~cryoprior.solvers.sr3.sr3_loss` (SR3,
  Saharia et al. 2021, Eq. 6). The low-resolution input is made on the fly from each
  training item by :func:`sr_degrade` (optional blur to a resolution, Fourier cropping by
  a factor drawn per batch from ``factors``, white noise).
- ``"regression"``: the same U-Net trained by L2 on the same pairs
  (:func:`~cryoprior.solvers.sr3.regression_loss`, SR3's regression baseline).

Layering: the cold-diffusion and SR3 losses and samplers live with their solvers
(``cryoprior.solvers``), so this module (layer ``train``) imports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cryoprior.core.errors import InputError, require
from cryoprior.diffusion import dsm_loss
from cryoprior.physics.degrade import Degraded, DownsampleOperator, degrade
from cryoprior.physics.heat_kernel import HeatKernelProcess
from cryoprior.priors import NetworkPrior, Prior, build_denoiser
from cryoprior.priors.prior import DENOISER_REPRESENTATION
from cryoprior.solvers.cold_diffusion import (
    RestorationModel,
    Restorer,
    cold_sample_improved,
    cold_sample_naive,
    one_step_restore,
    restoration_loss,
)
from cryoprior.solvers.sr3 import (
    SR3Conditioner,
    SR3Result,
    regression_loss,
    regression_predict,
    sr3_loss,
    sr3_sample,
)
from cryoprior.train.config import PriorData

LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]

#: samplers of :meth:`PointRestorer.restore`
POINT_SAMPLERS = ("one-step", "naive", "improved")


# ----------------------------------------------------------------------------- training


def make_dsm_loss(diffusion: Mapping[str, Any]) -> LossFn:
    """The trainer's loss for a diffusion prior: :func:`cryoprior.diffusion.dsm_loss` with the
    ``[diffusion]`` section's weighting, target, time sampling and t_min. Batches are
    tensors or dicts with ``"x"`` and an optional node ``"mask"``."""
    target = diffusion.get("target") or diffusion.get("prediction", "eps")
    weighting = diffusion.get("weighting", "uniform")
    t_sampling = diffusion.get("t_sampling", "uniform")
    t_min = float(diffusion.get("t_min", 1e-3))

    def loss_fn(model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        if isinstance(batch, Mapping):
            x, mask = batch["x"], batch.get("mask")
        else:
            x, mask = batch, None
        loss, _ = dsm_loss(
            model,
            x,
            generator=generator,
            mask=mask,
            weighting=weighting,
            target=target,
            t_sampling=t_sampling,
            t_min=t_min,
        )
        return loss

    return loss_fn


def _diffusion_loss_options(diffusion: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "weighting": diffusion.get("weighting", "uniform"),
        "target": diffusion.get("target") or diffusion.get("prediction", "eps"),
        "t_sampling": diffusion.get("t_sampling", "uniform"),
        "t_min": float(diffusion.get("t_min", 1e-3)),
    }


def heat_process(objective: Mapping[str, Any], scale: float = 1.0) -> HeatKernelProcess:
    """The heat-kernel forward process of a "heat_restoration" objective, in units of
    ``scale`` Å (1: Å; the data's length scale: the network's units, module docstring)."""
    return HeatKernelProcess(
        max_radius=float(objective["max_radius"]) / scale,
        kind=objective["process"],
        schedule=objective["schedule"],
        length_scale=float(objective["length_scale"]) / scale,
    )


def element_features(types: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One-hot atom types (B, N) -> (B, N, len(ELEMENTS)), zero on padding."""
    from cryoprior.data.molecules import ELEMENTS

    h = F.one_hot(types.long(), len(ELEMENTS)).float()
    return h if mask is None else h * mask[..., None].to(h.dtype)


def blur_resolution(objective: Mapping[str, Any], pixel_size: float, factor: float) -> float | None:
    """The resolution (Å) the high-resolution item is blurred to before downsampling by
    ``factor`` (``objective["blur"]``: None, "nyquist" = 2 · pixel_size · factor, or Å)."""
    blur = objective.get("blur")
    if blur is None:
        return None
    if blur == "nyquist":
        return 2.0 * float(pixel_size) * float(factor)
    return float(blur)


def sr_degrade(
    objective: Mapping[str, Any],
    x: torch.Tensor,
    pixel_size: float,
    factor: float,
    ndim: int,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
) -> Degraded:
    """The low-resolution version of ``x`` (..., *spatial) made as in training: blur
    (``objective["blur"]``), Fourier cropping by ``factor``, white noise of standard
    deviation ``objective["noise_std"] · noise_scale`` (``noise_scale``: 1 for x in network
    units, the prior's normalisation scale for x in physical units)."""
    return degrade(
        x,
        factor,
        pixel_size,
        noise_std=float(objective.get("noise_std", 0.0)) * float(noise_scale),
        generator=generator,
        blur_to=blur_resolution(objective, pixel_size, factor),
        ndim=ndim,
    )


def conditioner(objective: Mapping[str, Any], ndim: int) -> SR3Conditioner:
    """The SR3 conditioning of an "sr3" or "regression" objective for ``ndim``-D grids."""
    return SR3Conditioner(ndim, objective["upsample"], float(objective["resolution_scale"]))


def build_model(
    objective: Mapping[str, Any],
    net: nn.Module,
    diffusion: Mapping[str, Any],
    data: PriorData,
) -> nn.Module:
    """The module the trainer optimises: a Denoiser ("denoising", "sr3"), a
    :class:`RestorationModel` ("heat_restoration") or the network itself ("regression")."""
    kind = objective["kind"]
    if kind in ("denoising", "sr3"):
        schedule = {"name": diffusion["schedule"], **diffusion["schedule_params"]}
        return build_denoiser(
            net,
            {
                "schedule": schedule,
                "prediction": diffusion["prediction"],
                "c_noise": diffusion["c_noise"],
                "precondition": diffusion["precondition"],
                "sigma_data": diffusion["sigma_data"],
                "representation": DENOISER_REPRESENTATION[data.representation],
            },
        )
    if kind == "heat_restoration":
        return RestorationModel(net)
    if kind == "regression":
        return net
    raise InputError(f"unknown objective kind {kind!r}")


def trained_network(model: nn.Module) -> nn.Module:
    """The registered network inside a module built by :func:`build_model`."""
    inner = getattr(model, "net", None)
    return inner if isinstance(inner, nn.Module) else model


def make_loss(
    objective: Mapping[str, Any], diffusion: Mapping[str, Any], data: PriorData
) -> LossFn:
    """The trainer's ``loss_fn(model, batch, generator)`` of ``objective`` on ``data``
    (items in network units; every random draw comes from ``generator``)."""
    kind = objective["kind"]
    if kind == "denoising":
        return make_dsm_loss(diffusion)
    if kind == "heat_restoration":
        return _heat_loss(objective, data)
    if kind in ("sr3", "regression"):
        return _sr_loss(objective, diffusion, data)
    raise InputError(f"unknown objective kind {kind!r}")


def _heat_loss(objective: Mapping[str, Any], data: PriorData) -> LossFn:
    scale = float(data.normalisation["scale"])
    process = heat_process(objective, scale)
    noise_std = float(objective["noise_std"]) / scale
    use_types = objective["node_features"] == "elements"

    def loss_fn(model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        x, mask = batch["x"], batch.get("mask")
        h = element_features(batch["types"], mask) if use_types else None
        return restoration_loss(model, process, x, mask, generator, h=h, noise_std=noise_std)

    return loss_fn


def _sr_loss(objective: Mapping[str, Any], diffusion: Mapping[str, Any], data: PriorData) -> LossFn:
    ndim = len(data.shape) - 1
    px = float(data.pixel_size)
    factors = [float(f) for f in objective["factors"]]
    cond = conditioner(objective, ndim)
    sr3 = objective["kind"] == "sr3"
    options = _diffusion_loss_options(diffusion)
    residual = bool(objective.get("residual", False))

    def loss_fn(model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        x = batch["x"] if isinstance(batch, Mapping) else batch
        k = int(torch.randint(len(factors), (1,), generator=generator, device=generator.device))
        f = factors[k]
        y = sr_degrade(objective, x, px, f, ndim, generator).data
        if sr3:
            loss, _ = sr3_loss(model, y, x, px * f, cond, generator, residual, **options)
            return loss
        return regression_loss(model, y, x, px * f, cond, residual)

    return loss_fn


def objective_metadata(objective: Mapping[str, Any], data: PriorData) -> dict[str, Any]:
    """The objective record of ``prior.json``: the resolved objective plus the facts needed
    to use the prior (units; for point clouds which atoms and atom types it expects)."""
    obj = dict(objective)
    kind = obj["kind"]
    if kind == "heat_restoration":
        from cryoprior.data.molecules import ELEMENTS

        obj["units"] = "max_radius, length_scale and noise_std in Å"
        obj["atoms"] = "heavy" if data.summary.get("kind") == "molecules" else "calpha"
        obj["time_label"] = "t"
        if obj["node_features"] == "elements":
            obj["elements"] = list(ELEMENTS)
    elif kind in ("sr3", "regression"):
        obj["noise_std_units"] = "network units (physical noise = noise_std · scale)"
        obj["blur_units"] = "Å (or 'nyquist': 2 × the low-resolution pixel size)"
    return obj


# ----------------------------------------------------------------------------- using priors


def _require_kind(prior: Prior | NetworkPrior, kinds: Sequence[str], use: str) -> None:
    kind = prior.metadata.objective_kind
    if kind not in kinds:
        raise InputError(
            f"this is a {kind} prior; {use} needs a {' or '.join(kinds)} prior "
            "(trained with [objective] kind = ...)"
        )


class PointRestorer:
    """A "heat_restoration" prior in physical units (Å).

    ``restorer(h)`` is R(x, t, mask) = s · R_θ(x / s, t, mask, h) in Å (s the prior's
    length scale); ``process`` is the forward process in Å. :meth:`restore` runs one-step
    restoration or cold-diffusion Algorithm 1 / 2 from a blurred cloud.
    """

    def __init__(self, prior: NetworkPrior) -> None:
        _require_kind(prior, ("heat_restoration",), "point-cloud restoration")
        self.prior = prior
        self.objective = prior.objective
        self.scale = float(prior.metadata.normalisation["scale"])
        self.process = heat_process(self.objective)
        self.model = RestorationModel(prior.net).eval()
        self.uses_elements = self.objective.get("node_features") == "elements"

    @property
    def max_nodes(self) -> int:
        """The largest cloud the prior was trained on (its padded size)."""
        return int(self.prior.shape[0])

    def features(
        self, elements: Sequence[Sequence[str]] | None, n_nodes: int, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Node features (B, n_nodes, F) from per-cloud element lists (None when the prior
        uses no atom types). Elements not in the prior's vocabulary count as "OTHER"."""
        if not self.uses_elements:
            return None
        if elements is None:
            raise InputError("this prior needs the atoms' elements (it was trained on atom types)")
        vocab = [str(e).upper() for e in self.objective["elements"]]
        other = len(vocab) - 1
        types = torch.zeros(len(elements), n_nodes, dtype=torch.long)
        for b, els in enumerate(elements):
            require(len(els) <= n_nodes, f"cloud {b} has more elements than nodes ({n_nodes})")
            idx = [vocab.index(e.upper()) if e.upper() in vocab else other for e in els]
            types[b, : len(idx)] = torch.tensor(idx, dtype=torch.long)
        return element_features(types, mask)

    def restorer(self, h: torch.Tensor | None = None) -> Restorer:
        """R(x (B,N,3) Å, t (B,), mask) -> x̂0 (B,N,3) Å with node features ``h`` bound."""
        net_dtype = next(self.model.parameters()).dtype

        def restore(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            hh = None if h is None else h.to(device=x.device, dtype=net_dtype)
            m = None if mask is None else mask.to(net_dtype)
            out = self.model((x / self.scale).to(net_dtype), t.to(net_dtype), m, hh)
            return out.to(x.dtype) * self.scale

        return restore

    @torch.no_grad()
    def restore(
        self,
        x: torch.Tensor,
        t: float,
        mask: torch.Tensor | None = None,
        elements: Sequence[Sequence[str]] | None = None,
        sampler: str = "improved",
        steps: int = 20,
    ) -> torch.Tensor:
        """Restore blurred clouds ``x`` (B, N, 3) Å, blurred to time ``t`` ∈ (0, 1].

        ``sampler``: "one-step" (x̂0 = R(x_t, t)), "naive" (cold diffusion Algorithm 1) or
        "improved" (Algorithm 2), the latter two with ``steps`` uniform steps from t to 0.
        Returns (B, N, 3) Å with each cloud's centre of mass equal to the input's (the
        samplers work at zero COM); padding (mask 0) is 0.
        """
        require(sampler in POINT_SAMPLERS, f"sampler must be one of {POINT_SAMPLERS}")
        require(0.0 < float(t) <= 1.0, f"t must lie in (0, 1], got {t}")
        require(x.ndim == 3 and x.shape[-1] == 3, f"x must be (B, N, 3) Å, got {tuple(x.shape)}")
        if x.shape[1] > self.max_nodes:
            raise InputError(
                f"the prior handles clouds of up to {self.max_nodes} points, got {x.shape[1]}"
            )
        m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
        com = (x * m[..., None]).sum(1, keepdim=True) / m.sum(1)[:, None, None]
        restore = self.restorer(self.features(elements, x.shape[1], m))
        if sampler == "one-step":
            out = one_step_restore(restore, x, float(t), m)
        else:
            fn = cold_sample_naive if sampler == "naive" else cold_sample_improved
            out = fn(restore, self.process, x, m, t_start=float(t), steps=int(steps))
        return (out + com) * m[..., None]


def check_superres_input(
    prior: Prior | NetworkPrior,
    spatial_shape: Sequence[int],
    pixel_size: float,
    factor: float | None = None,
) -> float:
    """Check a low-resolution image or map against an "sr3" / "regression" prior and
    return the super-resolution factor.

    The factor is the prior's box over the input's (or ``factor``, which must agree); it
    must be one the prior was trained for, and the input's pixel size (Å/px) must be the
    prior's times the factor. Raises :class:`InputError` saying what to change.
    """
    _require_kind(prior, ("sr3", "regression"), "super-resolution")
    high = tuple(int(n) for n in prior.metadata.spatial_shape)
    low = tuple(int(n) for n in spatial_shape)
    kind = "map" if prior.representation == "volume" else "image"
    if len(low) != len(high):
        raise InputError(f"this prior super-resolves {len(high)}-D {kind}s, got shape {low}")
    ratios = {h / n for h, n in zip(high, low)}
    trained = [float(f) for f in prior.objective["factors"]]
    box_text = "x".join(map(str, high))
    if len(ratios) != 1 or not all(n * r == h for n, h, r in zip(low, high, ratios)):
        raise InputError(
            f"the input {kind} is {'x'.join(map(str, low))} px but this prior makes "
            f"{box_text}-px {kind}s from inputs {' or '.join(_boxes(high, trained))} px; "
            "crop, pad or resample the input"
        )
    f = ratios.pop()
    if factor is not None and not math.isclose(float(factor), f):
        raise InputError(
            f"--factor {factor:g} does not match the input: a {'x'.join(map(str, low))}-px "
            f"{kind} becomes {box_text} px (factor {f:g}) with this prior"
        )
    if not any(math.isclose(f, t) for t in trained):
        raise InputError(
            f"this prior was trained for factors {', '.join(f'{t:g}' for t in trained)}, not "
            f"{f:g}; give an input of {' or '.join(_boxes(high, trained))} px"
        )
    want = float(prior.pixel_size) * f
    if not math.isclose(float(pixel_size), want, rel_tol=1e-3):
        raise InputError(
            f"the input's pixel size is {float(pixel_size):g} Å/px but this prior expects "
            f"{want:g} Å/px for factor {f:g} (output at {float(prior.pixel_size):g} Å/px); "
            "resample the input or set its header's pixel size if it is wrong"
        )
    return f


def _boxes(high: Sequence[int], factors: Sequence[float]) -> list[str]:
    return ["x".join(str(int(round(h / f))) for h in high) for f in factors]


@torch.no_grad()
def super_resolve(
    prior: Prior | NetworkPrior,
    low_res: torch.Tensor,
    pixel_size: float,
    factor: float | None = None,
    n_samples: int = 1,
    steps: int = 50,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    data_consistency: bool | str = "none",
    eta: float = 0.0,
    batch_size: int | None = None,
    show_progress: bool = False,
) -> SR3Result:
    """Super-resolve one image (H, W) or map (D, H, W) in physical units with an "sr3"
    prior (``n_samples`` samples by DDIM / DDPM, their mean and spread) or a
    "regression" prior (one prediction; std 0).

    ``pixel_size`` is the input's (Å/px); the input is checked by
    :func:`check_superres_input`. ``data_consistency`` ("none", "final", "every_step";
    regression: "none" or "final") makes the Fourier cropping of the output reproduce the
    input (:func:`~cryoprior.solvers.sr3.sr3_sample`). Returns the samples, mean and std
    in the input's units and the output pixel size.
    """
    f = check_superres_input(prior, tuple(low_res.shape), pixel_size, factor)
    ndim = low_res.ndim
    cond = conditioner(prior.objective, ndim)
    norm = prior.metadata.normalisation
    device = prior.device
    y = low_res.to(device=device, dtype=torch.float32)
    if prior.metadata.objective_kind == "sr3":
        return sr3_sample(
            prior.denoiser,
            y,
            f,
            float(pixel_size),
            n_samples=n_samples,
            steps=steps,
            sampler=sampler,
            generator=generator,
            data_consistency=data_consistency,
            conditioner=cond,
            norm_mean=norm["offset"],
            norm_std=norm["scale"],
            eta=eta,
            batch_size=batch_size,
            show_progress=show_progress,
            residual=bool(prior.objective.get("residual", False)),
        )
    mode = "final" if data_consistency is True else data_consistency or "none"
    require(
        mode in ("none", "final"),
        f'a regression prior supports data_consistency "none" or "final", got {mode!r}',
    )
    yn = ((y - norm["offset"]) / norm["scale"]).unsqueeze(0).unsqueeze(0)
    pred = regression_predict(
        prior.net, yn, f, float(pixel_size), cond, bool(prior.objective.get("residual", False))
    )
    if mode == "final":
        pred = DownsampleOperator(pred.shape[2:], f).project(pred, yn)
    out = pred[0, 0] * norm["scale"] + norm["offset"]
    return SR3Result(out[None], out, torch.zeros_like(out), float(pixel_size) / f)


__all__ = [
    "POINT_SAMPLERS",
    "PointRestorer",
    "blur_resolution",
    "build_model",
    "check_superres_input",
    "conditioner",
    "element_features",
    "heat_process",
    "make_dsm_loss",
    "make_loss",
    "objective_metadata",
    "sr_degrade",
    "super_resolve",
    "trained_network",
]
