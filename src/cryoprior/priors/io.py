"""Prior files: a folder with ``weights.safetensors`` (the network's weights, usually the EMA
ones) and ``prior.json`` (:class:`~cryoprior.priors.prior.PriorMetadata` plus the weights'
SHA-256). Nothing is ever pickled or unpickled: weights go through safetensors, the rest is
JSON, and the network is rebuilt from its config by ``cryoprior.networks.build_network``.

:func:`load_prior` also reads a ``.zip`` or ``.tar`` (optionally compressed) archive of
such a folder, straight from the archive (nothing is extracted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from cryoprior import __version__
from cryoprior.core.errors import InputError
from cryoprior.diffusion import Denoiser
from cryoprior.networks import build_network, network_config
from cryoprior.priors.prior import (
    DIFFUSION_OBJECTIVES,
    NetworkPrior,
    Prior,
    PriorMetadata,
    build_denoiser,
    denoiser_config,
)

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "prior.json"


def _state_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state as independent contiguous CPU tensors (safetensors refuses
    shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}


def save_prior(
    folder: str | os.PathLike,
    model: nn.Module,
    metadata: PriorMetadata | Mapping[str, Any],
    overwrite: bool = True,
) -> Path:
    """Write a prior folder atomically; returns its path.

    ``model`` is a :class:`~cryoprior.diffusion.Denoiser` (its network's weights are saved,
    and ``metadata.diffusion`` is filled from it when empty) or a bare network (then, for
    the diffusion objectives "denoising" and "sr3", ``metadata.diffusion`` must be given).
    For the other objectives (``metadata.objective``) ``model`` may also be a wrapper with
    the network as its ``net`` attribute (e.g. a cold-diffusion ``RestorationModel``).
    ``metadata.network`` defaults to ``network_config(net)``, the version and creation time
    are filled in when empty.
    The folder is built beside the target under a temporary name and renamed into place,
    so a reader sees the old prior or the new one, never a half-written one.
    """
    meta = metadata if isinstance(metadata, PriorMetadata) else PriorMetadata(**dict(metadata))
    diffusion = meta.objective_kind in DIFFUSION_OBJECTIVES
    wrapped = not diffusion and isinstance(getattr(model, "net", None), nn.Module)
    net = model.net if isinstance(model, Denoiser) or wrapped else model
    if not isinstance(net, nn.Module):
        raise InputError("save_prior needs a Denoiser or an nn.Module network")
    if diffusion and not meta.diffusion:
        if not isinstance(model, Denoiser):
            raise InputError("saving a bare network needs metadata.diffusion (schedule etc.)")
        meta.diffusion = denoiser_config(model)
    if not meta.network:
        meta.network = network_config(net)
    meta.cryoprior_version = meta.cryoprior_version or __version__
    meta.created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta.validate()

    weights = save_safetensors_bytes(
        _state_tensors(net), metadata={"format": "cryoprior-prior-weights"}
    )
    record = meta.to_dict()
    record["weights"] = {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest()}
    text = json.dumps(record, indent=2) + "\n"

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise InputError(f"{folder} already exists; choose another name or allow overwriting")
    if folder.exists() and not (folder / METADATA_FILE).is_file():
        raise InputError(f"{folder} exists and is not a prior folder; refusing to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old: Path | None = None
    try:
        (tmp / WEIGHTS_FILE).write_bytes(weights)
        (tmp / METADATA_FILE).write_text(text)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.replace(old / folder.name, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def shipped_priors() -> dict[str, Path]:
    """The priors that ship with the package: {name: folder} (``cryoprior/assets/priors``)."""
    from importlib import resources

    root = Path(str(resources.files("cryoprior") / "assets" / "priors"))
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / METADATA_FILE).is_file()}


def resolve_prior(path: str | os.PathLike) -> Path:
    """A prior's location: ``path`` itself when it exists, else the shipped prior of that
    name (e.g. ``volume_32``); an InputError listing the shipped priors otherwise."""
    p = Path(path)
    if p.exists():
        return p
    shipped = shipped_priors()
    if str(path) in shipped:
        return shipped[str(path)]
    names = ", ".join(shipped) or "none"
    raise InputError(
        f"prior {path} does not exist: give a prior folder or archive, or the name of a "
        f"shipped prior ({names})"
    )


def _read_members(path: Path) -> tuple[bytes, bytes]:
    """(prior.json bytes, weights bytes) from a folder, zip or tar archive."""
    if path.is_dir():
        meta_path, weights_path = path / METADATA_FILE, path / WEIGHTS_FILE
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise InputError(f"{path} is not a prior folder: {p.name} is missing")
        return meta_path.read_bytes(), weights_path.read_bytes()
    if not path.is_file():
        raise InputError(f"prior {path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            return (
                zf.read(_member(names, METADATA_FILE, path)),
                zf.read(_member(names, WEIGHTS_FILE, path)),
            )
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
            out = []
            for want in (METADATA_FILE, WEIGHTS_FILE):
                f = tf.extractfile(_member(names, want, path))
                if f is None:
                    raise InputError(f"{path}: cannot read {want} from the archive")
                out.append(f.read())
            return out[0], out[1]
    raise InputError(f"{path} is neither a prior folder nor a .zip/.tar archive of one")


def _member(names: list[str], want: str, path: Path) -> str:
    hits = [n for n in names if n == want or n.endswith("/" + want)]
    if len(hits) != 1:
        raise InputError(f"{path}: expected exactly one {want} in the archive, found {len(hits)}")
    return hits[0]


def read_prior_metadata(path: str | os.PathLike) -> PriorMetadata:
    """Only the metadata of a prior folder or archive (no weights are built)."""
    path = resolve_prior(path)
    meta_bytes, _ = _read_members(path)
    return PriorMetadata.from_dict(_parse_json(meta_bytes, path), source=str(path))


def _parse_json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: {METADATA_FILE} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: {METADATA_FILE} must hold a JSON object")
    return d


def load_prior(path: str | os.PathLike, device: torch.device | str = "cpu") -> Prior | NetworkPrior:
    """Read a prior folder (or a .zip/.tar of one, or a shipped prior by name) on ``device``.

    Rebuilds the network from its config and loads the safetensors weights (strictly:
    every tensor must match); checks the weights' SHA-256 against ``prior.json``. Never
    unpickles anything. Diffusion objectives ("denoising", the default of files without an
    objective, and "sr3") give a :class:`Prior` (schedule and denoiser rebuilt from the
    diffusion config); "regression" and "heat_restoration" give a :class:`NetworkPrior`.
    """
    path = resolve_prior(path)
    meta_bytes, weights = _read_members(path)
    record = _parse_json(meta_bytes, path)
    meta = PriorMetadata.from_dict(record, source=str(path))
    expected = record.get("weights", {}).get("sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise InputError(f"{path}: {WEIGHTS_FILE} does not match the checksum in {METADATA_FILE}")
    try:
        tensors = load_safetensors_bytes(weights)
    except Exception as e:
        raise InputError(f"{path}: {WEIGHTS_FILE} cannot be read ({e})") from None
    net = build_network(dict(meta.network))
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: the weights do not fit the network config ({e})") from None
    if meta.objective_kind not in DIFFUSION_OBJECTIVES:
        net.eval().requires_grad_(False).to(device)
        return NetworkPrior(net=net, metadata=meta)
    denoiser = build_denoiser(net, meta.diffusion)
    denoiser.eval().requires_grad_(False).to(device)
    return Prior(denoiser=denoiser, metadata=meta)
