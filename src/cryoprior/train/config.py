"""Training configuration: the trainer's knobs and the run config of ``cryoprior train``.

Two levels (STYLE.md point 7, after EDM's ``training_options.json`` and cryoDRGN's saved
config):

- :class:`TrainConfig`: what the generic :class:`~cryoprior.train.trainer.Trainer` needs
  (steps, batch size, learning rate, EMA, checkpoint cadence, seed, device, ...).
- the *run config*: a plain nested dict with the sections ``data``, ``network``,
  ``diffusion``, ``objective``, ``train`` and ``output``, read from TOML or JSON,
  overridden from the command line with ``--set section.key=value``, resolved against the
  defaults below and saved with the run (``config.json``: the resolved config, cryoprior
  version, command line, time and host), so that a run can be repeated exactly.

Unknown sections and unknown keys in ``train`` / ``output`` / ``diffusion`` /
``objective`` are an :class:`~cryoprior.core.errors.InputError` naming the key; ``data``
keys are checked by the data builder of the chosen kind and ``network`` keys by the network
registry.

``[objective]`` says what is trained (:data:`OBJECTIVE_DEFAULTS` lists every kind's keys;
``cryoprior.train.objectives`` builds the model and loss):

- ``kind = "denoising"`` (default when the section is absent): a diffusion prior,
  denoising score matching with the ``[diffusion]`` section.
- ``kind = "heat_restoration"``: an EGNN cold-diffusion restorer of point clouds under the
  heat-kernel blur (``max_radius`` Å, ``process`` "gaussian" or "semigroup", ``schedule``,
  ``length_scale`` Å, ``noise_std`` Å, ``node_features`` "elements", "none" or "auto").
- ``kind = "sr3"``: a conditional U-Net denoiser for super-resolution by ``factors``
  (low-resolution inputs made on the fly by ``cryoprior.physics.degrade``: optional
  ``blur`` to a resolution, Fourier cropping, white noise of ``noise_std`` in network
  units), trained with the ``[diffusion]`` section's loss.
- ``kind = "regression"``: the same U-Net trained by L2 regression (SR3's baseline).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cryoprior import __version__
from cryoprior.core.errors import InputError
from cryoprior.core.files import write_text_atomic
from cryoprior.train.data_kinds import DATA_KINDS as DATA_KINDS
from cryoprior.train.data_kinds import PriorData as PriorData
from cryoprior.train.data_kinds import TensorItems as TensorItems
from cryoprior.train.data_kinds import build_data as build_data
from cryoprior.train.data_kinds import data_defaults
from cryoprior.train.data_kinds import register_data_kind as register_data_kind
from cryoprior.train.data_kinds import render_projections as render_projections
from cryoprior.train.data_kinds import synthetic_chains as synthetic_chains
from cryoprior.train.data_kinds import synthetic_gaussian_images as synthetic_gaussian_images
from cryoprior.train.prior_data import is_int as _is_int

SECTIONS = ("data", "network", "diffusion", "objective", "train", "output")

# Defaults of the free-form sections; the ``train`` defaults are TrainConfig's.
DIFFUSION_DEFAULTS: dict[str, Any] = {
    # the noise process: a name of cryoprior.diffusion.SCHEDULES and its parameters
    "schedule": "cosine",
    "schedule_params": {},
    # the denoiser (cryoprior.diffusion.Denoiser)
    "prediction": "eps",  # what the network predicts: "eps", "x0" or "v"
    "c_noise": "log_snr",  # the network's noise label: "log_snr" or "t"
    "precondition": False,  # EDM preconditioning (needs prediction = "x0")
    "sigma_data": 0.5,  # EDM's data standard deviation (network space)
    # the loss (cryoprior.diffusion.dsm_loss)
    "weighting": "uniform",  # "uniform", "min_snr" or "edm"
    "target": None,  # space of the squared error; None: the prediction's
    "t_sampling": "uniform",  # "uniform", "stratified" or "lognormal"
    "t_min": 1e-3,
}
_SR_DEFAULTS: dict[str, Any] = {
    "factors": [2],  # super-resolution factors; one is drawn per batch
    "upsample": "fourier",  # how the low-res input is put on the high-res grid: or "linear"
    "noise_std": 0.0,  # white noise on the low-res input, network units (x / data scale)
    "blur": None,  # blur the high-res item first: None, "nyquist" (to 2 px_low) or Å
    "resolution_scale": 10.0,  # Å; the network embeds resolutions / this
    # regression: x̂ = up(y) + net(up(y)); sr3: the diffused variable is the detail x − up(y)
    "residual": False,
}
#: ``[objective]`` keys of every kind, with their defaults (see the module docstring)
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "denoising": {},
    "heat_restoration": {
        "max_radius": 3.0,  # Å, blur radius σ(1) of the forward process
        "process": "gaussian",  # "gaussian" (mean-shift blur) or "semigroup" (exp(-tL))
        "schedule": "linear",  # σ(t) = max_radius · t ("linear") or · t² ("quadratic")
        "length_scale": 3.0,  # Å, graph scale of the semigroup (unused by "gaussian")
        "noise_std": 0.0,  # Å, zero-COM Gaussian noise on the blurred cloud
        "node_features": "auto",  # "elements" (one-hot atom types), "none" or "auto"
    },
    "sr3": dict(_SR_DEFAULTS),
    "regression": dict(_SR_DEFAULTS),
}
OUTPUT_DEFAULTS: dict[str, Any] = {
    "dir": None,  # run folder; default runs/<config file stem>
    "prior": "prior",  # name of the prior folder written inside the run folder
}


@dataclass
class TrainConfig:
    """Knobs of the generic trainer.

    ``batch_size`` is the *global* batch: under DDP each of the ``W`` processes takes
    ``batch_size / W`` items, so a config means the same optimisation on any number of
    processes. The learning rate rises linearly over ``warmup_steps`` and then follows a
    cosine down to ``lr * min_lr_ratio`` at ``steps`` (Loshchilov & Hutter 2017, SGDR,
    eq. 5 without restarts). ``grad_clip`` is a maximum global L2 norm (``None`` or 0: no
    clipping). ``ema_decay`` is the per-step decay of the weight average. ``val_every``,
    ``ckpt_every`` and ``log_every`` are in optimiser steps (0 disables). ``threads`` sets
    torch's intra-op threads (``None``: leave the default); ``device`` is "auto", "cpu",
    "cuda" or "cuda:N".
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float | None = 1.0
    val_every: int = 500
    val_max_items: int | None = None
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid value."""

        def bad(name: str, what: str) -> InputError:
            return InputError(f"train.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("warmup_steps", "val_every", "ckpt_every", "log_every", "num_workers"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not _is_int(self.seed):
            raise bad("seed", "an integer")
        if not (_is_num(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a finite number > 0")
        if not (_is_num(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "a number >= 0")
        if not (_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise bad("min_lr_ratio", "a number in [0, 1]")
        if not (_is_num(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise bad("ema_decay", "a number in [0, 1)")
        if self.grad_clip is not None and not (_is_num(self.grad_clip) and self.grad_clip >= 0):
            raise bad("grad_clip", "null or a number >= 0")
        if self.threads is not None and not (_is_int(self.threads) and self.threads >= 1):
            raise bad("threads", "null or an integer >= 1")
        if self.val_max_items is not None and not (
            _is_int(self.val_max_items) and self.val_max_items >= 1
        ):
            raise bad("val_max_items", "null or an integer >= 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        dev = str(self.device)
        if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
            raise bad("device", '"auto", "cpu", "cuda" or "cuda:N"')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key is an :class:`InputError` naming it."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InputError(f"unknown key train.{key}; known keys: {', '.join(sorted(known))}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- run config


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run config from a ``.toml`` or ``.json`` file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise InputError(
                f"reading {path} needs Python >= 3.11 (tomllib); write the config as JSON"
            ) from None
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"config file {path} is not valid TOML: {e}") from None
    elif path.suffix.lower() == ".json":
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"config file {path} is not valid JSON: {e}") from None
        # A saved run folder's config.json holds the resolved config under "config".
        if isinstance(cfg, dict) and "config" in cfg and "cryoprior_version" in cfg:
            cfg = cfg["config"]
    else:
        raise InputError(f"config file {path} must end in .toml or .json")
    if not isinstance(cfg, dict):
        raise InputError(f"config file {path} must hold a table of sections")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` into (key path, value).

    The value is read as JSON (``1e-4``, ``true``, ``[2, 2]``, ``null``, ``"x"``) and, when
    that fails, taken as a plain string (``train.device=cpu``).
    """
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise InputError(f"--set {text!r}: the key must be section.key, e.g. train.lr")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``cfg`` with each ``section.key=value`` override set."""
    out = copy.deepcopy(dict(cfg))
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in SECTIONS:
            raise InputError(
                f"--set {text!r}: unknown section {parts[0]!r}; sections: {', '.join(SECTIONS)}"
            )
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {text!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check sections and keys and fill in defaults; returns the resolved run config.

    ``data`` must name a ``kind`` of :data:`DATA_KINDS` and only that builder's keys;
    ``network`` is passed on as given (the network registry checks it when the network is
    built); ``diffusion``, ``objective``, ``train`` and ``output`` are checked key by key
    (``objective`` defaults to ``{"kind": "denoising"}``).
    """
    for key in cfg:
        if key not in SECTIONS:
            raise InputError(f"unknown config section {key!r}; sections: {', '.join(SECTIONS)}")
        if not isinstance(cfg[key], Mapping):
            raise InputError(f"config section {key!r} must be a table of key = value")
    data = copy.deepcopy(dict(cfg.get("data", {})))
    if "kind" not in data:
        raise InputError('config section [data] needs kind = ... (e.g. kind = "digits")')
    data = data_defaults(data)
    network = copy.deepcopy(dict(cfg.get("network", {})))
    diffusion = _with_defaults("diffusion", cfg.get("diffusion", {}), DIFFUSION_DEFAULTS)
    if diffusion["prediction"] not in ("eps", "x0", "v"):
        raise InputError(
            f'diffusion.prediction must be "eps", "x0" or "v", got {diffusion["prediction"]!r}'
        )
    if not isinstance(diffusion["schedule_params"], Mapping):
        raise InputError("diffusion.schedule_params must be a table of key = value")
    objective = resolve_objective(cfg.get("objective", {}))
    train = TrainConfig.from_dict(cfg.get("train", {})).to_dict()
    output = _with_defaults("output", cfg.get("output", {}), OUTPUT_DEFAULTS)
    return {
        "data": data,
        "network": network,
        "diffusion": diffusion,
        "objective": objective,
        "train": train,
        "output": output,
    }


def resolve_objective(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[objective]`` section checked and completed with its kind's defaults.

    An empty section is ``{"kind": "denoising"}``. Raises :class:`InputError` naming an
    unknown kind or key, or an invalid value.
    """
    kind = section.get("kind", "denoising")
    if kind not in OBJECTIVE_DEFAULTS:
        raise InputError(
            f"unknown objective.kind {kind!r}; known: {', '.join(sorted(OBJECTIVE_DEFAULTS))}"
        )
    given = {k: v for k, v in section.items() if k != "kind"}
    obj = {"kind": kind, **_with_defaults(f"objective ({kind})", given, OBJECTIVE_DEFAULTS[kind])}

    def bad(key: str, what: str) -> InputError:
        return InputError(f"objective.{key} must be {what}, got {obj[key]!r}")

    if kind == "heat_restoration":
        if not (_is_num(obj["max_radius"]) and obj["max_radius"] > 0):
            raise bad("max_radius", "a number > 0 (Å)")
        if not (_is_num(obj["length_scale"]) and obj["length_scale"] > 0):
            raise bad("length_scale", "a number > 0 (Å)")
        if not (_is_num(obj["noise_std"]) and obj["noise_std"] >= 0):
            raise bad("noise_std", "a number >= 0 (Å)")
        if obj["process"] not in ("gaussian", "semigroup"):
            raise bad("process", '"gaussian" or "semigroup"')
        if obj["schedule"] not in ("linear", "quadratic"):
            raise bad("schedule", '"linear" or "quadratic"')
        if obj["node_features"] not in ("auto", "elements", "none"):
            raise bad("node_features", '"auto", "elements" or "none"')
    elif kind in ("sr3", "regression"):
        factors = obj["factors"]
        if isinstance(factors, (int, float)) and not isinstance(factors, bool):
            factors = obj["factors"] = [factors]
        if not (
            isinstance(factors, list) and factors and all(_is_num(f) and f > 1 for f in factors)
        ):
            raise bad("factors", "a list of numbers > 1, e.g. [2, 4]")
        obj["factors"] = [int(f) if float(f).is_integer() else float(f) for f in factors]
        if obj["upsample"] not in ("fourier", "linear"):
            raise bad("upsample", '"fourier" or "linear"')
        if not (_is_num(obj["noise_std"]) and obj["noise_std"] >= 0):
            raise bad("noise_std", "a number >= 0 (network units)")
        blur = obj["blur"]
        if not (blur is None or blur == "nyquist" or (_is_num(blur) and blur > 0)):
            raise bad("blur", 'null, "nyquist" or a resolution > 0 Å')
        if not (_is_num(obj["resolution_scale"]) and obj["resolution_scale"] > 0):
            raise bad("resolution_scale", "a number > 0 (Å)")
        if not isinstance(obj["residual"], bool):
            raise bad("residual", "true or false")
    return obj


def _with_defaults(section: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    for key in given:
        if key not in defaults:
            raise InputError(
                f"unknown key {section}.{key}; known keys: {', '.join(sorted(defaults))}"
            )
    out = copy.deepcopy(dict(defaults))
    out.update(copy.deepcopy(dict(given)))
    return out


def load_run_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read ``path`` (or take ``base``), apply ``--set`` overrides and resolve."""
    if (path is None) == (base is None):
        raise ValueError("give exactly one of path or base")
    cfg = read_config_file(path) if path is not None else dict(base or {})
    return resolve_config(apply_overrides(cfg, overrides))


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command line of this process, shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def run_record(config: Mapping[str, Any], command: str | None = None) -> dict[str, Any]:
    """What ``config.json`` holds: resolved config + version, command line, time, host."""
    return {
        "cryoprior_version": __version__,
        "command": command if command is not None else command_line(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "config": copy.deepcopy(dict(config)),
    }


def save_run_config(
    out_dir: str | os.PathLike, config: Mapping[str, Any], command: str | None = None
) -> Path:
    """Write ``out_dir/config.json`` atomically (see :func:`run_record`); returns its path.

    When the folder already holds one (a resumed run), the earlier record is kept and the
    new invocation is appended under ``"resumed"``.
    """
    path = Path(out_dir) / "config.json"
    record = run_record(config, command)
    if path.is_file():
        previous = json.loads(path.read_text())
        invocation = {k: record[k] for k in ("command", "created", "host", "cryoprior_version")}
        previous.setdefault("resumed", []).append(invocation)
        previous["config"] = record["config"]
        record = previous
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (sorted)."""
    keys = set(a) | set(b)
    out: list[str] = []
    for k in sorted(keys):
        name = f"{prefix}{k}"
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_differences(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


_MISSING = object()


def complete_objective(objective: Mapping[str, Any], data: PriorData) -> dict[str, Any]:
    """The resolved ``[objective]`` checked against the data, with the keys that follow
    from it filled in: ``node_features = "auto"`` becomes "elements" when the items carry
    atom types ("types") and "none" otherwise. Raises :class:`InputError` when the data do
    not suit the objective (a factor that does not divide the box, grid data for a point
    objective, ...)."""
    from cryoprior.physics.degrade import resampled_shape

    obj = copy.deepcopy(dict(objective))
    kind = obj["kind"]
    if kind == "heat_restoration":
        if data.representation != "points":
            raise InputError(
                f"objective heat_restoration needs point-cloud data, not {data.representation}"
            )
        has_types = isinstance(data.train[0], Mapping) and "types" in data.train[0]
        if obj["node_features"] == "auto":
            obj["node_features"] = "elements" if has_types else "none"
        if obj["node_features"] == "elements" and not has_types:
            raise InputError(
                'objective.node_features = "elements" needs items with atom types '
                '(data kind "molecules"); use "none"'
            )
    elif kind in ("sr3", "regression"):
        if data.representation not in ("image", "volume"):
            raise InputError(f"objective {kind} needs image or volume data")
        for f in obj["factors"]:
            resampled_shape(data.shape[1:], f)
    return obj


def complete_network_config(
    network: Mapping[str, Any], data: PriorData, objective: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``[network]`` with the keys that follow from the data filled in when absent:
    ``dims``/``in_channels``/``out_channels`` for a U-Net, ``in_features`` for an MLP; and
    from the (completed) objective: ``cond_channels`` and ``n_extra_scalars = 2`` (the
    input and output resolutions) for "sr3", ``n_extra_scalars = 2`` for "regression",
    ``in_node_features`` (one-hot atom types or 0) for "heat_restoration"."""
    net = copy.deepcopy(dict(network))
    name = net.get("name")
    if name is None:
        raise InputError('config section [network] needs name = "unet", "egnn" or "mlp"')
    grid = data.representation in ("image", "volume")
    if name == "unet":
        if not grid:
            raise InputError(f"a U-Net needs image or volume data, not {data.representation}")
        net.setdefault("dims", len(data.shape) - 1)
        net.setdefault("in_channels", data.shape[0])
        net.setdefault("out_channels", data.shape[0])
    elif name == "mlp":
        net.setdefault("in_features", math.prod(data.shape))
    elif name == "egnn" and grid:
        raise InputError(f"an EGNN needs point-cloud data, not {data.representation}")
    kind = "denoising" if objective is None else objective["kind"]
    if kind in ("sr3", "regression"):
        if name != "unet":
            raise InputError(f'objective {kind} needs network.name = "unet", got {name!r}')
        if kind == "sr3":
            net.setdefault("cond_channels", data.shape[0])
        net.setdefault("n_extra_scalars", 2)
    elif kind == "heat_restoration":
        if name != "egnn":
            raise InputError(
                f'objective heat_restoration needs network.name = "egnn", got {name!r}'
            )
        from cryoprior.data.molecules import ELEMENTS

        features = len(ELEMENTS) if objective["node_features"] == "elements" else 0
        net.setdefault("in_node_features", features)
    return net
