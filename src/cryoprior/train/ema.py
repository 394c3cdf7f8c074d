"""Exponential moving average (EMA) of a model's weights.

After each optimiser step, every floating-point parameter and buffer of the averaged copy
is updated as

    θ_ema ← d_n θ_ema + (1 − d_n) θ,      d_n = min(d, (1 + n) / (10 + n))

where ``n`` is the number of updates so far and ``d`` the configured decay. The warm-up
``(1 + n) / (10 + n)`` is TensorFlow's ``ExponentialMovingAverage(num_updates=...)``; it
keeps the average from being dominated by the random initial weights early in training
(switch it off with ``warmup=False``). Integer buffers (counters) are copied. Diffusion
models are evaluated and sampled with the EMA weights (Song & Ermon 2020, "Improved
techniques", §3.5; Karras et al. 2022, EDM, Appendix F).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen copy of ``model`` whose weights track an exponential moving average."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay ``d_n`` the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        d = self.current_decay()
        ema_state = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point() or target.is_complex():
                target.lerp_(value.detach().to(target.dtype), 1.0 - d)
            else:
                target.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights and update count (tensors and ints only: loads with weights_only)."""
        return {
            "model": self.model.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
