"""Density-map training sets: real structures rendered as maps in random orientations.

Item ``i`` of a :class:`MapDataset` is structure ``i // n_per_structure``, centred on its
atoms' centroid, rotated by a rotation drawn uniformly from SO(3) with a generator seeded
by ``(seed, i)`` (so an index always gives the same map: validation is stable, and
augmentation differs between items), and rendered with
:func:`cryoprior.physics.atoms.atoms_to_map` (band-limited five-Gaussian potential,
Å^-2 units). The map is divided by one global ``scale`` fixed from the TRAINING set (the
standard deviation of its voxels over all its maps) and recorded, so validation and test
sets are normalised exactly as the training set was.

:meth:`MapDataset.precompute` renders the items once and caches them (optionally to a
safetensors file with the metadata, split included, as JSON); :class:`CachedMapDataset`
reads such a file back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.files import atomic_path
from cryoprior.core.runtime import progress
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.atoms import atoms_to_map

MAP_CACHE_FORMAT = "cryoprior-maps/1"


def item_generator(seed: int, index: int) -> torch.Generator:
    """A torch Generator seeded from (seed, index): every item has its own stream."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def _as_atoms(item: Any, k: int) -> tuple[str, np.ndarray, list[str], np.ndarray]:
    """(name, coords (N,3) Å, elements, B-factors) from a record, Structure or tuple."""
    if hasattr(item, "atoms") and hasattr(item, "name"):  # ProteinRecord
        coords, elements, bfac = item.atoms()
        return item.name, coords, elements, bfac
    if hasattr(item, "coords") and hasattr(item, "elements"):  # io.structure.Structure
        bfac = getattr(item, "b_factors", np.zeros(len(item.elements)))
        return f"structure{k}", np.asarray(item.coords), list(item.elements), np.asarray(bfac)
    if isinstance(item, tuple) and len(item) in (2, 3):
        coords = np.asarray(item[0], dtype=np.float64)
        bfac = np.asarray(item[2]) if len(item) == 3 else np.zeros(len(coords))
        return f"structure{k}", coords, list(item[1]), bfac
    raise InputError(
        f"structure {k}: expected a ProteinRecord, a Structure or a tuple "
        f"(coords, elements[, bfactors]), got {type(item).__name__}"
    )


def auto_bfactor(pixel_size: float) -> float:
    """The "auto" B-factor of rendered maps, 16 · pixel_size² Å²: its Debye-Waller factor
    exp(-B q²/4) is exp(-1) at Nyquist, which keeps atoms_to_map's band-limit ringing small."""
    return 16.0 * float(pixel_size) ** 2


class MapDataset(Dataset):
    """Maps (1, D, D, D) float32 [z, y, x] of structures in random orientations.

    Args:
        structures: :class:`~cryoprior.data.corpus.ProteinRecord` objects,
            ``cryoprior.io.structure.Structure`` objects, or (coords (N,3) Å, elements
            [, B-factors]) tuples.
        box: map side in voxels; pixel_size: Å per voxel.
        rotations: "random" (uniform on SO(3), per item) or "none" (the centred model as is).
        n_per_structure: items (orientations) per structure.
        seed: seed of the per-item rotations.
        bfactor: "auto" = uniform B of 16 pixel_size^2 Å², whose Debye-Waller factor
            exp(-B q^2 / 4) is exp(-1) at Nyquist (q = 1 / (2 pixel_size)), which keeps the
            band-limit ringing of atoms_to_map small (measured on the demo protein at
            1.5 and 3 Å/px: negative lobes -25 to -29 % of the peak at B = 4 px^2, -8 to -9 %
            at B = 16 px^2);
            "file" = the models' own B-factors (they differ between sources: several
            shipped files carry a constant 100 Å²); or a number = uniform B in Å².
        scale: the normalisation divisor. None estimates it from this data set (std of all
            voxels of up to ``scale_maps`` maps, one per structure, identity orientation):
            do that for the TRAINING set only and pass ``train.scale`` to the others.
        on_oversize: "error" or "skip" for structures that could leave the box when
            rotated (an atom further than box * pixel_size / 2 from the centroid).
        split: the split the structures come from, recorded in :attr:`metadata`.
    """

    def __init__(
        self,
        structures: Sequence[Any],
        box: int,
        pixel_size: float,
        rotations: str = "random",
        n_per_structure: int = 1,
        seed: int = 0,
        bfactor: float | str = "auto",
        scale: float | None = None,
        scale_maps: int = 8,
        on_oversize: str = "error",
        split: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.box = int(box)
        require(self.box >= 8, f"box must be >= 8 voxels, got {box}")
        self.pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
        require(
            rotations in ("random", "none"),
            f"rotations must be 'random' or 'none', got {rotations!r}",
        )
        require(int(n_per_structure) >= 1, f"n_per_structure must be >= 1, got {n_per_structure}")
        require(
            on_oversize in ("error", "skip"),
            f"on_oversize must be 'error' or 'skip', got {on_oversize!r}",
        )
        if isinstance(bfactor, str):
            require(
                bfactor in ("auto", "file"),
                f"bfactor must be 'auto', 'file' or a number of Å², got {bfactor!r}",
            )
        else:
            require(float(bfactor) >= 0, f"bfactor must be >= 0 Å², got {bfactor}")
        self.rotations = rotations
        self.n_per_structure = int(n_per_structure)
        self.seed = int(seed)
        self.bfactor = bfactor
        self.split = {k: list(v) for k, v in split.items()} if split else None

        half = self.box * self.pixel_size / 2
        self._atoms: list[tuple[str, torch.Tensor, list[str], torch.Tensor]] = []
        oversize = []
        for k, item in enumerate(structures):
            name, coords, elements, bfac = _as_atoms(item, k)
            if len(coords) == 0:
                raise InputError(f"{name}: no atoms")
            centred = coords - coords.mean(0, keepdims=True)
            radius = float(np.linalg.norm(centred, axis=1).max())
            if radius >= half:
                oversize.append(f"{name} ({radius:.1f} Å)")
                continue
            b = self._bfactors(bfac, len(coords))
            self._atoms.append((name, torch.from_numpy(centred), elements, b))
        if oversize and on_oversize == "error":
            raise InputError(
                f"{len(oversize)} structure(s) reach beyond the box radius {half:.1f} Å "
                f"(box {self.box} x {self.pixel_size} Å/px): {', '.join(oversize[:5])}; use "
                "a larger box or pixel size, fewer residues, or on_oversize='skip'"
            )
        require(len(self._atoms) > 0, "no structure fits in the box; use a larger box")
        self.skipped = [s.split(" ")[0] for s in oversize]
        self._cache: torch.Tensor | None = None
        self.scale = float(scale) if scale is not None else self._estimate_scale(scale_maps)
        require_positive(self.scale, "map scale")
        self.scale_source = "given" if scale is not None else "estimated from this data set"

    def _bfactors(self, bfac: np.ndarray, n: int) -> torch.Tensor:
        if self.bfactor == "file":
            return torch.as_tensor(np.asarray(bfac, dtype=np.float64).clip(min=0))
        value = auto_bfactor(self.pixel_size) if self.bfactor == "auto" else float(self.bfactor)
        return torch.full((n,), value, dtype=torch.float64)

    @property
    def names(self) -> list[str]:
        """Names of the structures, in order."""
        return [a[0] for a in self._atoms]

    def __len__(self) -> int:
        return len(self._atoms) * self.n_per_structure

    def rotation(self, index: int) -> torch.Tensor:
        """The rotation (3, 3) float64 applied to item ``index`` (r' = R r)."""
        if self.rotations == "none":
            return torch.eye(3, dtype=torch.float64)
        return random_rotations(1, item_generator(self.seed, index), torch.float64)[0]

    def render(self, index: int) -> torch.Tensor:
        """Item ``index`` before normalisation: the potential (D, D, D) float32 in Å^-2."""
        name, coords, elements, bfac = self._atoms[index // self.n_per_structure]
        rotated = coords @ self.rotation(index).T
        return atoms_to_map(rotated, elements, self.box, self.pixel_size, bfactors=bfac)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} maps")
        index = index % len(self)
        if self._cache is not None and index < self._cache.shape[0]:
            return self._cache[index]
        return (self.render(index) / self.scale).unsqueeze(0).to(torch.float32)

    def _estimate_scale(self, n_maps: int) -> float:
        """Std over all voxels of up to ``n_maps`` maps (one per structure, unrotated)."""
        total = total_sq = count = 0.0
        for _, coords, elements, bfac in self._atoms[: max(1, int(n_maps))]:
            m = atoms_to_map(coords, elements, self.box, self.pixel_size, bfactors=bfac)
            total += float(m.double().sum())
            total_sq += float((m.double() ** 2).sum())
            count += m.numel()
        mean = total / count
        return float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))

    @property
    def metadata(self) -> dict[str, Any]:
        """Everything needed to reproduce or match this data set (saved with caches)."""
        return {
            "format": MAP_CACHE_FORMAT,
            "box": self.box,
            "pixel_size": self.pixel_size,
            "rotations": self.rotations,
            "n_per_structure": self.n_per_structure,
            "seed": self.seed,
            "bfactor": self.bfactor,
            "scale": self.scale,
            "scale_source": self.scale_source,
            "units": "atoms_to_map potential (Å^-2) / scale",
            "names": self.names,
            "skipped_oversize": self.skipped,
            "split": self.split,
        }

    def precompute(
        self,
        n: int | None = None,
        path: str | os.PathLike | None = None,
        show_progress: bool = True,
    ) -> torch.Tensor:
        """Render the first ``n`` items (all by default) once and serve them from memory.

        Returns the (n, 1, D, D, D) float32 tensor; with ``path`` also saves it as a
        safetensors file with :attr:`metadata` (read it with :class:`CachedMapDataset`).
        """
        n = len(self) if n is None else int(n)
        require(1 <= n <= len(self), f"n must be in 1..{len(self)}, got {n}")
        self._cache = None
        maps = torch.empty(n, 1, self.box, self.box, self.box, dtype=torch.float32)
        for i in progress(range(n), total=n, desc="rendering maps", enabled=show_progress):
            maps[i] = self[i]
        self._cache = maps
        if path is not None:
            save_map_cache(path, maps, {**self.metadata, "n_maps": n})
        return maps


def save_map_cache(
    path: str | os.PathLike, maps: torch.Tensor, metadata: Mapping[str, Any]
) -> None:
    """Save maps (n, 1, D, D, D) and their metadata (as JSON) to a safetensors file."""
    require(
        maps.ndim == 5 and maps.shape[1] == 1,
        f"maps must have shape (n, 1, D, D, D), got {tuple(maps.shape)}",
    )
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(
            {"maps": maps.contiguous()},
            str(tmp),
            metadata={"cryoprior": json.dumps(dict(metadata))},
        )


def load_map_cache(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """Maps (n, 1, D, D, D) float32 and metadata from :func:`save_map_cache`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"map cache {path} not found; make one with `cryoprior data maps`")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("cryoprior", "{}"))
        maps = load_file(str(path))["maps"]
    except Exception as e:  # safetensors raises its own error types
        raise InputError(f"{path} is not a cryoprior map cache ({e})") from None
    if meta.get("format") != MAP_CACHE_FORMAT:
        raise InputError(f"{path} is not a {MAP_CACHE_FORMAT} file")
    return maps, meta


class CachedMapDataset(Dataset):
    """Maps read from a cache file written by :meth:`MapDataset.precompute`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.maps, self.metadata = load_map_cache(path)
        self.box = int(self.metadata["box"])
        self.pixel_size = float(self.metadata["pixel_size"])
        self.scale = float(self.metadata["scale"])

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.maps[index]
