"""Cα point-cloud training sets for equivariant (EGNN) priors.

Item ``i`` of a :class:`CalphaDataset` is protein ``i // n_per_structure``: its Cα trace,
cropped to a contiguous segment of at most ``max_nodes`` residues (random start), centred
to zero centre of mass over the real nodes, rotated uniformly at random, divided by a
fixed length ``scale`` (Å per unit) and zero-padded to ``max_nodes`` rows. Randomness is
seeded by ``(seed, i)``, so an index always gives the same cloud. ``scale`` is fixed from
the TRAINING set (mean radius of gyration of its Cα traces) and recorded; pass
``train.scale`` to validation and test sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.data.volumes import item_generator
from cryoprior.geometry.rotations import random_rotations


def _as_trace(item: Any, k: int) -> tuple[str, np.ndarray]:
    if hasattr(item, "calpha") and hasattr(item, "name"):  # ProteinRecord
        return item.name, np.asarray(item.calpha(), dtype=np.float64)
    arr = np.asarray(item, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise InputError(
            f"structure {k}: expected a ProteinRecord or an (N, 3) array of Cα "
            f"coordinates in Å, got shape {arr.shape}"
        )
    return f"structure{k}", arr


def radius_of_gyration(coords: np.ndarray) -> float:
    """Radius of gyration in Å of points (N, 3) with equal weights."""
    c = coords - coords.mean(0, keepdims=True)
    return float(np.sqrt((c * c).sum(1).mean()))


class CalphaDataset(Dataset):
    """Cα clouds as {"x": (max_nodes, 3) float32, "mask": (max_nodes,) float32}.

    Args:
        structures: :class:`~cryoprior.data.corpus.ProteinRecord` objects or (N, 3) arrays
            of Cα coordinates in Å (chain order).
        max_nodes: rows of every item; longer chains are cropped to a contiguous segment.
        scale: Å per unit of ``x``; None sets it to the mean Cα radius of gyration of these
            structures (do that for the TRAINING set only).
        rotations: "random" (uniform on SO(3), per item) or "none".
        n_per_structure: items per structure; seed: seeds rotations and crops per item.
        split: the split the structures come from, recorded in :attr:`metadata`.

    ``x`` has zero mean over the real nodes (mask 1) and zeros in the padding rows; the
    default collate stacks items into {"x": (B, max_nodes, 3), "mask": (B, max_nodes)}.
    """

    def __init__(
        self,
        structures: Sequence[Any],
        max_nodes: int,
        scale: float | None = None,
        rotations: str = "random",
        n_per_structure: int = 1,
        seed: int = 0,
        split: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.max_nodes = int(max_nodes)
        require(self.max_nodes >= 2, f"max_nodes must be >= 2, got {max_nodes}")
        require(
            rotations in ("random", "none"),
            f"rotations must be 'random' or 'none', got {rotations!r}",
        )
        require(int(n_per_structure) >= 1, f"n_per_structure must be >= 1, got {n_per_structure}")
        self.rotations = rotations
        self.n_per_structure = int(n_per_structure)
        self.seed = int(seed)
        self.split = {k: list(v) for k, v in split.items()} if split else None
        self._traces = [_as_trace(item, k) for k, item in enumerate(structures)]
        require(len(self._traces) > 0, "no structures given")
        if scale is None:
            self.scale = float(np.mean([radius_of_gyration(t) for _, t in self._traces]))
            self.scale_source = "mean Cα radius of gyration of this data set"
        else:
            self.scale = require_positive(scale, "scale (Å per unit)")
            self.scale_source = "given"

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._traces]

    def __len__(self) -> int:
        return len(self._traces) * self.n_per_structure

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clouds")
        index = index % len(self)
        _, trace = self._traces[index // self.n_per_structure]
        g = item_generator(self.seed, index)
        n = trace.shape[0]
        if n > self.max_nodes:
            start = int(torch.randint(0, n - self.max_nodes + 1, (1,), generator=g))
            trace = trace[start : start + self.max_nodes]
        xyz = torch.from_numpy(trace - trace.mean(0, keepdims=True))
        if self.rotations == "random":
            xyz = xyz @ random_rotations(1, g, torch.float64)[0].T
        m = xyz.shape[0]
        x = torch.zeros(self.max_nodes, 3, dtype=torch.float32)
        x[:m] = (xyz / self.scale).to(torch.float32)
        x[:m] -= x[:m].mean(0, keepdim=True)  # zero COM in float32 too
        mask = torch.zeros(self.max_nodes, dtype=torch.float32)
        mask[:m] = 1.0
        return {"x": x, "mask": mask}

    @property
    def metadata(self) -> dict[str, Any]:
        """What is needed to reproduce or match this data set."""
        return {
            "max_nodes": self.max_nodes,
            "scale": self.scale,
            "scale_source": self.scale_source,
            "units": "Å / scale",
            "rotations": self.rotations,
            "n_per_structure": self.n_per_structure,
            "seed": self.seed,
            "names": self.names,
            "n_residues": [int(t.shape[0]) for _, t in self._traces],
            "split": self.split,
        }
