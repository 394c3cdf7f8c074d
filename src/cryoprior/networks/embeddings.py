"""Embeddings of per-sample scalars (noise level, resolution in Å, ...) into feature vectors.

Every network takes a per-sample noise label ``c_noise`` of shape (B,) (for example
log-SNR/4 or the diffusion time t) and, optionally, extra per-sample scalars of shape (B, k)
(for SR3: the input and output resolution in Å). Each scalar is mapped to sinusoidal
features (the transformer positional encoding of Vaswani et al. 2017, used for the time
step by Ho et al. 2020 and, in this form, by Karras et al. 2022 ``PositionalEmbedding``),
then through a small MLP; the extra scalars' embedding is added to the noise embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cryoprior.core.errors import InputError, require


class SinusoidalEmbedding(nn.Module):
    """Map a scalar per sample, shape (B,), to (B, dim) sinusoidal features.

    Features are ``[cos(s·c·f_k), sin(s·c·f_k)]`` with frequencies
    ``f_k = max_period**(-k/(dim/2))``, k = 0..dim/2-1 (radians per unit of ``c``), and
    ``s = scale``. With the default ``scale=100`` the fastest feature turns by 1 rad when c
    changes by 0.01 and the slowest by 0.01 rad over the range of c in [-5, 5]: suitable
    for t in [0, 1], log-SNR/4, or a resolution in Å.
    """

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 100.0) -> None:
        super().__init__()
        require(dim >= 2 and dim % 2 == 0, f"embedding dim must be even and >= 2, got {dim}")
        self.dim = int(dim)
        self.scale = float(scale)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, dim) in the dtype of ``c``."""
        dt = torch.float64 if c.dtype == torch.float64 else torch.float32
        arg = (self.scale * c.to(dt))[:, None] * self.freqs.to(device=c.device, dtype=dt)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).to(c.dtype)


class ScalarEmbedding(nn.Module):
    """Sinusoidal features of a (B,) scalar followed by a two-layer SiLU MLP -> (B, out_dim)."""

    def __init__(self, out_dim: int, frequency_dim: int = 64, scale: float = 100.0) -> None:
        super().__init__()
        self.sinusoid = SinusoidalEmbedding(frequency_dim, scale=scale)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, out_dim)."""
        return self.mlp(self.sinusoid(c))


class ConditionEmbedding(nn.Module):
    """Embed the noise label and optional extra scalars into one (B, out_dim) vector.

    ``emb = MLP_t(sin(c_noise)) + MLP_s([sin(s_1), ..., sin(s_k)])`` where the second term
    is present only when ``n_extra_scalars = k > 0``.
    """

    def __init__(
        self, out_dim: int, n_extra_scalars: int = 0, frequency_dim: int = 64, scale: float = 100.0
    ) -> None:
        super().__init__()
        require(n_extra_scalars >= 0, f"n_extra_scalars must be >= 0, got {n_extra_scalars}")
        self.n_extra_scalars = int(n_extra_scalars)
        self.time = ScalarEmbedding(out_dim, frequency_dim, scale)
        self.extra: nn.Module | None = None
        if n_extra_scalars > 0:
            self.extra_sinusoid = SinusoidalEmbedding(frequency_dim, scale=scale)
            self.extra = nn.Sequential(
                nn.Linear(n_extra_scalars * frequency_dim, out_dim),
                nn.SiLU(),
                nn.Linear(out_dim, out_dim),
            )

    def forward(
        self, c_noise: torch.Tensor, extra_scalars: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``c_noise`` (B,), ``extra_scalars`` (B, k) -> (B, out_dim)."""
        emb = self.time(c_noise)
        if self.extra is None:
            require(
                extra_scalars is None,
                "extra_scalars were given but the network was built with "
                "n_extra_scalars=0; rebuild it with n_extra_scalars=k",
            )
            return emb
        if extra_scalars is None:
            raise InputError(
                f"this network needs extra_scalars of shape (B, "
                f"{self.n_extra_scalars}); pass extra_scalars=..."
            )
        b = c_noise.shape[0]
        s = extra_scalars.to(c_noise.dtype)
        if s.ndim == 1:
            s = s[:, None]
        require(
            tuple(s.shape) == (b, self.n_extra_scalars),
            f"extra_scalars must have shape ({b}, {self.n_extra_scalars}), "
            f"got {tuple(extra_scalars.shape)}",
        )
        feats = self.extra_sinusoid(s.reshape(-1)).reshape(b, -1)
        return emb + self.extra(feats)


def batch_noise_label(c_noise: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return the noise label as a (B,) tensor in ``x``'s dtype and device.

    A Python number or a 0-d tensor is broadcast to the batch size ``x.shape[0]``.
    """
    c = torch.as_tensor(c_noise, dtype=x.dtype, device=x.device)
    b = x.shape[0]
    if c.ndim == 0:
        return c.expand(b)
    c = c.reshape(-1)
    require(c.shape[0] == b, f"c_noise must be a scalar or have shape ({b},), got {tuple(c.shape)}")
    return c


def resolve_extra_scalars(
    extra_scalars: torch.Tensor | None, class_emb: torch.Tensor | None
) -> torch.Tensor | None:
    """Accept the per-sample extra scalars under either name (``class_emb`` is an alias)."""
    if extra_scalars is not None and class_emb is not None:
        raise InputError("pass extra_scalars or class_emb (an alias), not both")
    return extra_scalars if extra_scalars is not None else class_emb
