"""Residual MLP score/denoiser network for small images and vectors.

``x`` of any shape (B, ...) with ``prod(x.shape[1:]) == in_features`` is flattened,
concatenated with the flattened ``cond`` (if any), and passed through residual blocks

    h ← h + W_2 · dropout(SiLU(W_1 · SiLU(h) + W_e · emb))

where ``emb`` is the noise (+ extra scalars) embedding, added inside every block. The
output layer is zero-initialised (an untrained net outputs 0) and reshaped to ``x``'s
shape. Suitable for the 5×5 Gaussian-image prior of the MTD study and other small inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cryoprior.core.errors import InputError, require
from cryoprior.networks.embeddings import (
    ConditionEmbedding,
    batch_noise_label,
    resolve_extra_scalars,
)


class _Block(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.dropout = nn.Dropout(dropout)
        self.lin2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        u = F.silu(self.lin1(F.silu(h)) + self.emb(emb))
        return h + self.lin2(self.dropout(u))


class MLP(nn.Module):
    """MLP denoiser: ``forward(x (B, ...), c_noise (B,), cond=None, extra_scalars=None)``.

    Args:
        in_features: number of values per sample, ``prod(x.shape[1:])`` (e.g. 25 for 5×5).
        hidden_features: width of the hidden layers.
        num_blocks: residual blocks.
        cond_features: values per sample of the optional ``cond`` tensor (flattened).
        n_extra_scalars: length k of per-sample ``extra_scalars`` (B, k).
        embedding_dim: width of the noise embedding.
        dropout: dropout rate inside the blocks.
        embedding_scale: scale of ``c_noise`` before the sinusoids.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int = 256,
        num_blocks: int = 3,
        cond_features: int = 0,
        n_extra_scalars: int = 0,
        embedding_dim: int = 128,
        dropout: float = 0.0,
        embedding_scale: float = 100.0,
    ) -> None:
        super().__init__()
        require(in_features > 0, f"in_features must be > 0, got {in_features}")
        require(
            hidden_features > 0 and num_blocks >= 1,
            f"hidden_features and num_blocks must be >= 1, got {hidden_features}, {num_blocks}",
        )
        require(cond_features >= 0, f"cond_features must be >= 0, got {cond_features}")
        require(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
        self.config = {
            "in_features": int(in_features),
            "hidden_features": int(hidden_features),
            "num_blocks": int(num_blocks),
            "cond_features": int(cond_features),
            "n_extra_scalars": int(n_extra_scalars),
            "embedding_dim": int(embedding_dim),
            "dropout": float(dropout),
            "embedding_scale": float(embedding_scale),
        }
        self.in_features = in_features
        self.cond_features = cond_features
        self.embedding = ConditionEmbedding(embedding_dim, n_extra_scalars, scale=embedding_scale)
        self.lin_in = nn.Linear(in_features + cond_features, hidden_features)
        self.blocks = nn.ModuleList(
            _Block(hidden_features, embedding_dim, dropout) for _ in range(num_blocks)
        )
        self.lin_out = nn.Linear(hidden_features, in_features)
        nn.init.zeros_(self.lin_out.weight)
        nn.init.zeros_(self.lin_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor | float,
        cond: torch.Tensor | None = None,
        extra_scalars: torch.Tensor | None = None,
        class_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output with ``x``'s shape."""
        b = x.shape[0]
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise InputError(
                f"MLP(in_features={self.in_features}) needs x of shape (B, ...) "
                f"with {self.in_features} values per sample, got {tuple(x.shape)}"
            )
        flat = x.reshape(b, -1)
        if self.cond_features:
            if cond is None or cond.shape[0] != b or cond[0].numel() != self.cond_features:
                got = None if cond is None else tuple(cond.shape)
                raise InputError(
                    f"this MLP needs cond with {self.cond_features} values per "
                    f"sample and batch {b}, got {got}"
                )
            flat = torch.cat([flat, cond.reshape(b, -1).to(x.dtype)], dim=1)
        else:
            require(
                cond is None,
                "cond was given but the MLP was built with "
                "cond_features=0; rebuild it with cond_features=...",
            )
        emb = F.silu(
            self.embedding(
                batch_noise_label(c_noise, x), resolve_extra_scalars(extra_scalars, class_emb)
            )
        )
        h = self.lin_in(flat)
        for block in self.blocks:
            h = block(h, emb)
        return self.lin_out(F.silu(h)).reshape(x.shape)
