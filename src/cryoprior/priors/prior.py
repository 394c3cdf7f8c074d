"""A trained prior: one denoiser plus what it takes to use it on physical data.

A :class:`Prior` bundles the denoiser (network + noise schedule, the one contract every
sampler and solver takes) with :class:`PriorMetadata`: the representation ("image",
"volume" or "points"), the shape of one sample, the pixel size in Å/px, the normalisation
that maps physical values to the network's space (fixed from the *training* data), the
diffusion and network configs that rebuild it, the training data summary and split, and
provenance (version, command, time). Solvers ask :meth:`Prior.check_compatible` before
combining a prior with measurements.

The *objective* (``PriorMetadata.objective``, ``{"kind": ..., parameters}``) says what the
network was trained for:

- ``"denoising"`` (the default; files written before the field existed read as this): an
  unconditional diffusion prior, a :class:`Prior`.
- ``"sr3"``: a conditional diffusion denoiser for super-resolution (SR3, Saharia et al.
  2021), also a :class:`Prior`, but it needs the low-resolution input as conditioning, so
  :meth:`Prior.sample` refuses it (use ``cryoprior superres``).
- ``"regression"``: the regression U-Net baseline of SR3 and ``"heat_restoration"``: an
  EGNN cold-diffusion restorer of heat-kernel-blurred point clouds (Bansal et al. 2022).
  Neither is a denoiser: they load as a :class:`NetworkPrior` (the network + metadata).

Normalisation convention: ``x_net = (x_phys - offset) / scale`` and
``x_phys = scale * x_net + offset``; for point clouds ``offset`` is 0 (clouds are centred)
and ``scale`` is in Å.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from cryoprior.core.errors import InputError
from cryoprior.diffusion import SAMPLERS, Denoiser, make_schedule

PRIOR_FORMAT = "cryoprior-prior"
#: the newest prior-file format this version reads and writes. Version 2 added
#: ``objective``; denoising priors are still written as version 1 (readable by older
#: versions, to which version-2 files say "upgrade cryoprior").
PRIOR_FORMAT_VERSION = 2
#: what a prior's network was trained for (see the module docstring)
OBJECTIVES = ("denoising", "sr3", "regression", "heat_restoration")
#: objectives whose network is wrapped in a diffusion Denoiser (``metadata.diffusion``)
DIFFUSION_OBJECTIVES = ("denoising", "sr3")
#: the representations each objective works on
_OBJECTIVE_REPRESENTATIONS = {
    "denoising": ("image", "volume", "points"),
    "sr3": ("image", "volume"),
    "regression": ("image", "volume"),
    "heat_restoration": ("points",),
}
REPRESENTATIONS = ("image", "volume", "points")
#: the Denoiser's representation for each prior representation
DENOISER_REPRESENTATION = {"image": "grid", "volume": "grid", "points": "points"}


@dataclass
class PriorMetadata:
    """Everything a prior file says besides its weights (all JSON types).

    ``shape`` is one sample's shape: (C, H, W) for images, (C, D, H, W) for volumes,
    (max_nodes, 3) for point clouds. ``pixel_size`` is Å/px (None for points).
    ``normalisation`` is ``{"scale": s, "offset": o}`` (see the module doc). ``diffusion``
    rebuilds the denoiser (:func:`denoiser_config`), ``network`` the network
    (``cryoprior.networks.network_config``). ``data`` holds the training-data summary and the
    split (names or ids of the train / val / test items). ``objective`` is
    ``{"kind": one of OBJECTIVES, **its parameters}`` (module docstring); ``diffusion`` is
    empty for objectives that are not diffusion models.
    """

    representation: str
    shape: tuple[int, ...]
    normalisation: dict[str, float] = field(default_factory=lambda: {"scale": 1.0, "offset": 0.0})
    pixel_size: float | None = None
    diffusion: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    cryoprior_version: str = ""
    command: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=lambda: {"kind": "denoising"})

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InputError` when a field is inconsistent."""
        if self.representation not in REPRESENTATIONS:
            raise InputError(
                f"prior representation must be one of {REPRESENTATIONS}, "
                f"got {self.representation!r}"
            )
        ndim = {"image": 3, "volume": 4, "points": 2}[self.representation]
        if len(self.shape) != ndim or any(s < 1 for s in self.shape):
            want = {"image": "(C, H, W)", "volume": "(C, D, H, W)", "points": "(max_nodes, 3)"}
            raise InputError(
                f"a {self.representation} prior's shape must be {want[self.representation]}, "
                f"got {self.shape}"
            )
        if self.representation != "points":
            if self.pixel_size is None or not self.pixel_size > 0:
                raise InputError(
                    f"a {self.representation} prior needs a pixel size > 0 (Å/px), "
                    f"got {self.pixel_size!r}"
                )
            self.pixel_size = float(self.pixel_size)
        norm = self.normalisation
        if set(norm) != {"scale", "offset"}:
            raise InputError(f"normalisation must have keys scale and offset, got {sorted(norm)}")
        if not (math.isfinite(norm["scale"]) and norm["scale"] > 0):
            raise InputError(f"normalisation scale must be finite and > 0, got {norm['scale']}")
        if not math.isfinite(norm["offset"]):
            raise InputError(f"normalisation offset must be finite, got {norm['offset']}")
        self.normalisation = {"scale": float(norm["scale"]), "offset": float(norm["offset"])}
        if not isinstance(self.objective, Mapping) or "kind" not in self.objective:
            raise InputError(f"objective must be a dict with a 'kind', got {self.objective!r}")
        kind = self.objective["kind"]
        if kind not in OBJECTIVES:
            raise InputError(f"prior objective must be one of {OBJECTIVES}, got {kind!r}")
        if self.representation not in _OBJECTIVE_REPRESENTATIONS[kind]:
            raise InputError(
                f"a {kind} prior must represent {' or '.join(_OBJECTIVE_REPRESENTATIONS[kind])}, "
                f"not {self.representation}"
            )
        self.objective = dict(self.objective)

    @property
    def objective_kind(self) -> str:
        """The objective's kind: "denoising", "sr3", "regression" or "heat_restoration"."""
        return str(self.objective["kind"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``prior.json``."""
        return {
            "format": PRIOR_FORMAT,
            "format_version": 1 if self.objective_kind == "denoising" else PRIOR_FORMAT_VERSION,
            "representation": self.representation,
            "shape": list(self.shape),
            "pixel_size": self.pixel_size,
            "normalisation": dict(self.normalisation),
            "diffusion": self.diffusion,
            "network": self.network,
            "data": self.data,
            "training": self.training,
            "cryoprior_version": self.cryoprior_version,
            "command": self.command,
            "created": self.created,
            "extra": self.extra,
            "objective": dict(self.objective),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "prior.json") -> PriorMetadata:
        """Parse the JSON form, checking the format tag and required keys.

        A file without ``objective`` (format version 1) is a denoising prior.
        """
        if d.get("format") != PRIOR_FORMAT:
            raise InputError(f"{source} is not a cryoprior prior (format {d.get('format')!r})")
        if int(d.get("format_version", 0)) > PRIOR_FORMAT_VERSION:
            raise InputError(
                f"{source} has prior format version {d['format_version']}; this cryoprior "
                f"reads up to {PRIOR_FORMAT_VERSION}: upgrade cryoprior"
            )
        objective = d.get("objective") or {"kind": "denoising"}
        if not isinstance(objective, Mapping):
            raise InputError(f"{source}: objective must be a JSON object, got {objective!r}")
        required = ["representation", "shape", "network"]
        if objective.get("kind") in DIFFUSION_OBJECTIVES:
            required.append("diffusion")
        missing = [k for k in required if k not in d]
        if missing:
            raise InputError(f"{source} lacks {', '.join(missing)}")
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{**{k: v for k, v in d.items() if k in keys}, "objective": objective})

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(H, W) or (D, H, W) for images and volumes; (max_nodes,) for points."""
        return self.shape[1:] if self.representation != "points" else self.shape[:1]

    @property
    def fully_convolutional(self) -> bool:
        """True for a grid prior whose network applies to any box (trained on patches:
        a U-Net with per-voxel normalisation and no attention); ``shape`` is then the
        training patch, and samples may have any spatial size that is a multiple of
        :attr:`size_multiple`."""
        net = self.network
        return (
            self.representation in ("image", "volume")
            and net.get("name") == "unet"
            and net.get("norm") == "pixel"
            and not net.get("attention", False)
            and bool(self.data.get("summary", {}).get("fully_convolutional", False))
        )

    @property
    def size_multiple(self) -> int:
        """Spatial sizes a U-Net prior accepts are multiples of this (2^(levels − 1))."""
        mults = self.network.get("channel_mults")
        return 2 ** (len(mults) - 1) if self.network.get("name") == "unet" and mults else 1


def denoiser_config(denoiser: Denoiser) -> dict[str, Any]:
    """The JSON config that rebuilds ``denoiser`` around its network (see
    :func:`build_denoiser`)."""
    return {
        "schedule": denoiser.schedule.config(),
        "prediction": denoiser.prediction,
        "c_noise": denoiser.c_noise,
        "precondition": denoiser.precondition,
        "sigma_data": denoiser.sigma_data,
        "representation": denoiser.representation,
    }


def build_denoiser(net: nn.Module, config: Mapping[str, Any]) -> Denoiser:
    """Wrap ``net`` in a :class:`~cryoprior.diffusion.Denoiser` described by ``config``.

    ``config["schedule"]`` is a schedule config (``{"name": "cosine", ...}``, as
    ``NoiseSchedule.config()`` returns) or a name; the other keys are the Denoiser's.
    """
    config = dict(config)
    schedule = config.pop("schedule", None)
    if schedule is None:
        raise InputError("the diffusion config needs a schedule")
    schedule = make_schedule(schedule) if isinstance(schedule, str) else make_schedule(**schedule)
    allowed = {"prediction", "c_noise", "precondition", "sigma_data", "representation"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InputError(f"unknown diffusion option(s) {unknown}; known: {sorted(allowed)}")
    return Denoiser(net, schedule, **config)


_P = TypeVar("_P", bound="_PriorBase")


class _PriorBase:
    """What every trained model file offers: metadata, physical units and checks."""

    metadata: PriorMetadata

    def _module(self) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------ properties
    @property
    def objective(self) -> dict[str, Any]:
        """What the network was trained for: ``{"kind": ..., parameters}``."""
        return self.metadata.objective

    @property
    def representation(self) -> str:
        """The representation: "image", "volume" or "points"."""
        return self.metadata.representation

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W), (C, D, H, W) or (max_nodes, 3)."""
        return self.metadata.shape

    @property
    def pixel_size(self) -> float | None:
        """Å/px of the training data (None for points)."""
        return self.metadata.pixel_size

    @property
    def box(self) -> int | None:
        """Side length in pixels of a square/cubic grid prior (None for points)."""
        if self.representation == "points":
            return None
        return int(max(self.metadata.spatial_shape))

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        p = next(self._module().parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self: _P, device: torch.device | str) -> _P:
        """Move the weights to ``device`` (in place); returns self."""
        self._module().to(device)
        return self

    # ------------------------------------------------------------------ normalisation
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Physical values → network space: ``(x - offset) / scale``."""
        n = self.metadata.normalisation
        return (x - n["offset"]) / n["scale"]

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Network space → physical values: ``scale * x + offset``."""
        n = self.metadata.normalisation
        return x * n["scale"] + n["offset"]

    # ------------------------------------------------------------------ checks
    def check_compatible(
        self,
        box: int | Sequence[int] | None = None,
        pixel_size: float | None = None,
        representation: str | None = None,
        n_nodes: int | None = None,
        rtol: float = 1e-3,
    ) -> None:
        """Raise :class:`InputError` saying what differs if data of this kind cannot use the
        prior: ``representation``; ``box`` (an int for a square/cubic grid or the spatial
        shape); ``pixel_size`` (Å/px, equal within ``rtol``); ``n_nodes`` (points: at most
        the prior's ``max_nodes``)."""
        meta = self.metadata
        if representation is not None and representation != meta.representation:
            raise InputError(
                f"this prior models {meta.representation}s, the data are {representation}s; "
                f"use a {representation} prior"
            )
        if box is not None:
            if meta.representation == "points":
                raise InputError("a point-cloud prior has no box; pass n_nodes instead")
            spatial = meta.spatial_shape
            want = tuple(box) if isinstance(box, Sequence) else (int(box),) * len(spatial)
            if tuple(int(b) for b in want) != spatial:
                raise InputError(
                    f"the prior was trained on {'x'.join(map(str, spatial))}-pixel "
                    f"{meta.representation}s but the data are {'x'.join(map(str, want))}; "
                    "crop, pad or resample the data to the prior's box, or train a prior "
                    "at this box"
                )
        if pixel_size is not None and meta.pixel_size is not None:
            if not math.isclose(float(pixel_size), meta.pixel_size, rel_tol=rtol):
                raise InputError(
                    f"the prior was trained at {meta.pixel_size:g} Å/px but the data are at "
                    f"{float(pixel_size):g} Å/px; resample the data to {meta.pixel_size:g} "
                    "Å/px or train a prior at this pixel size"
                )
        if n_nodes is not None and meta.representation == "points":
            if not 1 <= int(n_nodes) <= meta.shape[0]:
                raise InputError(
                    f"the prior handles clouds of up to {meta.shape[0]} points, got {n_nodes}"
                )

    # ------------------------------------------------------------------ sampling
    def node_mask(self, n: int, n_nodes: int | Sequence[int]) -> torch.Tensor:
        """A (n, max_nodes) node mask with the first ``n_nodes`` (per sample) nodes real."""
        counts = [int(n_nodes)] * n if isinstance(n_nodes, int) else [int(c) for c in n_nodes]
        if len(counts) != n:
            raise InputError(f"n_nodes has {len(counts)} entries for {n} samples")
        for c in counts:
            self.check_compatible(n_nodes=c)
        idx = torch.arange(self.shape[0])
        return (idx[None, :] < torch.tensor(counts)[:, None]).float()


@dataclass
class Prior(_PriorBase):
    """A denoiser with its metadata; samples and normalisation in physical units.

    Objective "denoising" (an unconditional prior) or "sr3" (a conditional denoiser; it
    cannot :meth:`sample` without its low-resolution input).
    """

    denoiser: Denoiser
    metadata: PriorMetadata

    def _module(self) -> nn.Module:
        return self.denoiser

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: str = "ddim",
        steps: int = 50,
        generator: torch.Generator | None = None,
        *,
        n_nodes: int | Sequence[int] | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        show_progress: bool = False,
        **sampler_kwargs: Any,
    ) -> torch.Tensor:
        """Draw ``n`` samples in physical units, shape (n, *shape).

        ``sampler`` is one of ``cryoprior.diffusion.SAMPLERS`` (ddim, ddpm, sde, pc, ode)
        with ``steps`` steps; ``generator`` makes it reproducible. For point clouds
        ``n_nodes`` (an int or one per sample) sets how many nodes are real (default all);
        padded nodes are 0. ``batch_size`` splits the work; ``sampler_kwargs`` go to the
        sampler (e.g. ``eta`` for DDIM).
        """
        _require_denoising(self.metadata, "drawn unconditionally")
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if int(n) < 1 or int(steps) < 1:
            raise InputError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
        points = self.representation == "points"
        mask = None
        if points and n_nodes is not None:
            mask = self.node_mask(n, n_nodes)
        device = torch.device(device) if device is not None else self.device
        self.denoiser.to(device).eval()
        chunk = int(batch_size) if batch_size else int(n)
        out = []
        for start in range(0, int(n), chunk):
            b = min(chunk, int(n) - start)
            m = None if mask is None else mask[start : start + b].to(device)
            x = SAMPLERS[sampler](
                self.denoiser,
                (b, *self.shape),
                n_steps=int(steps),
                generator=generator,
                mask=m,
                device=device,
                show_progress=show_progress,
                **sampler_kwargs,
            )
            x = self.denormalise(x)
            if m is not None:
                x = x * m[..., None].to(x.dtype)
            out.append(x)
        return torch.cat(out)


def _require_denoising(meta: PriorMetadata, what: str) -> None:
    kind = meta.objective_kind
    if kind != "denoising":
        use = (
            "points"
            if kind == "heat_restoration"
            else meta.representation.replace("volume", "map").replace("image", "images")
        )
        raise InputError(
            f"this is a {kind} prior, not a denoising prior: it cannot be {what}; "
            f"use it with `cryoprior superres {use}`"
        )


@dataclass
class NetworkPrior(_PriorBase):
    """A trained network that is not a diffusion denoiser, with its metadata.

    Objectives "regression" (the SR3 regression baseline: a U-Net called as
    ``net(up(y), 0, extra_scalars=s)``) and "heat_restoration" (an EGNN restoring
    heat-kernel-blurred clouds, ``x̂0 = x_t + net(x_t, t, mask, h)`` in network units).
    The network is in eval mode without gradients; ``metadata.objective`` holds the
    parameters that use it (see ``cryoprior.train.objectives``).
    """

    net: nn.Module
    metadata: PriorMetadata

    def _module(self) -> nn.Module:
        return self.net

    @property
    def denoiser(self) -> Denoiser:
        """Not available: this prior is not a diffusion model (raises InputError)."""
        _require_denoising(self.metadata, "used as a denoiser")
        raise AssertionError("unreachable")

    def sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Not available: this prior is not a diffusion model (raises InputError)."""
        _require_denoising(self.metadata, "sampled")
        raise AssertionError("unreachable")
