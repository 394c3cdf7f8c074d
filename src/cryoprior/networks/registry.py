"""Build a network from a JSON-serialisable config, and read the config back from a network.

A prior file stores ``network_config(model)``, e.g. ``{"name": "unet", "dims": 3, ...}``;
``build_network`` rebuilds the same architecture, onto which the saved weights load.
Networks registered here store their constructor arguments in ``self.config`` (lists in
place of tuples, only JSON types).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from torch import nn

from cryoprior.core.errors import InputError
from cryoprior.networks.egnn import EGNN
from cryoprior.networks.mfn import BACON, ResidualMFN
from cryoprior.networks.mlp import MLP
from cryoprior.networks.unet import UNet

NETWORKS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "egnn": EGNN,
    "mlp": MLP,
    "bacon": BACON,
    "residual_mfn": ResidualMFN,
}


def register_network(name: str, cls: type[nn.Module]) -> None:
    """Make ``cls`` buildable as ``{"name": name, ...}``; it must set ``self.config``."""
    if name in NETWORKS and NETWORKS[name] is not cls:
        raise InputError(f"a different network is already registered as {name!r}")
    NETWORKS[name] = cls


def build_network(config: dict[str, Any]) -> nn.Module:
    """Construct the network named by ``config["name"]`` with the remaining keys as kwargs."""
    if not isinstance(config, dict) or "name" not in config:
        raise InputError(f"a network config is a dict with a 'name' key, got {config!r}")
    kwargs = dict(config)
    name = kwargs.pop("name")
    if name not in NETWORKS:
        raise InputError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    cls = NETWORKS[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        raise InputError(
            f"unknown option(s) {unknown} for network {name!r}; "
            f"valid: {sorted(p for p in params if p != 'self')}"
        )
    return cls(**kwargs)


def network_config(model: nn.Module) -> dict[str, Any]:
    """The config that rebuilds ``model``'s architecture: ``{"name": ..., **model.config}``.

    The result survives ``json.dumps``/``json.loads`` unchanged.
    """
    for name, cls in NETWORKS.items():
        if type(model) is cls:
            config = {"name": name, **model.config}
            json.dumps(config)  # raises TypeError if a value is not JSON-serialisable
            return config
    raise InputError(
        f"{type(model).__name__} is not a registered network; known: "
        f"{sorted(NETWORKS)} (register it with register_network)"
    )
