"""Data kinds of ``cryoprior train``: what ``[data] kind = ...`` builds.

Each builder takes ``seed`` plus the other keys of the run config's ``[data]`` section
and returns a :class:`PriorData`: train / validation datasets already in the network's
space, the normalisation back to physical units, one item's shape and pixel size, a
summary and the split (by protein or molecule identity where the data are real), all of
which go into the prior file. :data:`DATA_KINDS` is the registry;
:func:`register_data_kind` adds to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from cryoprior.core.errors import InputError
from cryoprior.train.data_structures import (
    calpha_clouds,
    ccd_molecules,
    protein_map_patches,
    protein_maps,
    protein_projections,
    render_projections,
)
from cryoprior.train.data_synthetic import (
    digit_images,
    gaussian_blobs,
    mnist_images,
    synthetic_chains,
    synthetic_gaussian_images,
    synthetic_gaussian_volumes,
)
from cryoprior.train.prior_data import PriorData, TensorItems

DataBuilder = Callable[..., PriorData]

#: ``[data] kind`` → builder(seed=..., **the other keys of [data])
DATA_KINDS: dict[str, DataBuilder] = {
    "synthetic-gaussian-images": synthetic_gaussian_images,
    "synthetic-gaussian-volumes": synthetic_gaussian_volumes,
    "synthetic-chains": synthetic_chains,
    "mnist": mnist_images,
    "digits": digit_images,
    "maps": protein_maps,
    "map_patches": protein_map_patches,
    "calpha": calpha_clouds,
    "molecules": ccd_molecules,
    "projections": protein_projections,
}


def register_data_kind(name: str, builder: DataBuilder) -> None:
    """Make ``[data] kind = name`` build datasets with ``builder(seed=..., **params)``."""
    DATA_KINDS[name] = builder


def _builder(section: Mapping[str, Any]) -> tuple[str, DataBuilder, dict[str, Any]]:
    kind = section.get("kind")
    if kind not in DATA_KINDS:
        raise InputError(f"unknown data kind {kind!r}; known: {', '.join(sorted(DATA_KINDS))}")
    builder = DATA_KINDS[kind]
    params = inspect.signature(builder).parameters
    for key in section:
        if key != "kind" and key not in params:
            known = ", ".join(sorted(set(params) | {"kind"}))
            raise InputError(f"unknown key data.{key} for data kind {kind!r}; known keys: {known}")
    return kind, builder, dict(params)


def data_defaults(section: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` with the chosen builder's default for every key not given (``seed``
    left out: it defaults to ``train.seed``)."""
    _, _, params = _builder(section)
    out = dict(section)
    for name, p in params.items():
        if name != "seed" and name not in out and p.default is not inspect.Parameter.empty:
            d = p.default
            out[name] = list(d) if isinstance(d, tuple) else d
    return out


def build_data(section: Mapping[str, Any], seed: int) -> PriorData:
    """Build the datasets described by a run config's ``[data]`` section.

    ``seed`` (the run's ``train.seed``) is used unless the section sets ``seed``.
    """
    _, builder, _ = _builder(section)
    kwargs = {k: v for k, v in section.items() if k != "kind"}
    kwargs.setdefault("seed", int(seed))
    return builder(**kwargs)


__all__ = [
    "DATA_KINDS",
    "PriorData",
    "TensorItems",
    "build_data",
    "data_defaults",
    "gaussian_blobs",
    "register_data_kind",
    "render_projections",
    "synthetic_chains",
    "synthetic_gaussian_images",
]
