"""What a data builder of ``cryoprior train`` returns: :class:`PriorData`, and
:class:`TensorItems`, an indexable dataset over a stacked tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def is_int(v: Any) -> bool:
    """True for a Python int that is not a bool (config values)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class PriorData:
    """What a data builder returns for ``cryoprior train``.

    ``train`` / ``val`` are indexable datasets whose items are already in the network's
    space (a tensor, or a dict with ``"x"`` and, for point clouds, ``"mask"``).
    ``normalisation`` maps them back to physical units: ``x_phys = scale * x + offset``.
    ``shape`` is one item's shape; ``pixel_size`` is Å/px (None for points). ``summary``
    and ``split`` (names or ids per split, test included when known) go into the prior file.
    """

    train: Any
    val: Any | None
    representation: str
    shape: tuple[int, ...]
    pixel_size: float | None
    normalisation: dict[str, float]
    summary: dict[str, Any]
    split: dict[str, Any]


class TensorItems:
    """An indexable dataset over a stacked tensor (and an optional node mask)."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.x = x.contiguous()
        self.mask = None if mask is None else mask.contiguous()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.mask is None:
            return self.x[i]
        return {"x": self.x[i], "mask": self.mask[i]}
