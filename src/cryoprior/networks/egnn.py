"""E(3)-equivariant graph network (EGNN) for point clouds, as used by the E(3) diffusion model.

Implements the EGNN of Satorras, Hoogeboom & Welling (2021, eqs. 3-6) in the form of
Hoogeboom et al. (2022, "Equivariant diffusion for molecule generation", EDM; code
``egnn/egnn_new.py``). Each equivariant block runs ``inv_sublayers`` graph convolutions

    m_ij = φ_e(h_i, h_j, d²_ij, d0²_ij)                 (edge MLP; d0 = input distances)
    m_ij ← m_ij · sigmoid(φ_att(m_ij))                  (optional attention gate)
    h_i  ← h_i + φ_h(h_i, Σ_j e_ij m_ij / Z_i)          (Z = normalization_factor or degree)

followed by one coordinate update (EDM ``EquivariantUpdate``)

    x_i ← x_i + Σ_j e_ij (x_i − x_j)/(‖x_i − x_j‖ + norm_constant)
                    · tanh(φ_x(h_i, h_j, d²_ij, d0²_ij)) · coords_range/num_layers / Z_i

where e_ij is the edge mask (real sender and receiver, i ≠ j, inside the neighbourhood,
times the user's edge mask). Padding nodes (mask 0) neither send nor receive messages and
are not moved, so a padded cloud gives the same output on its real nodes as the unpadded
cloud. The network returns the displacement field ``x_final − x_input`` (zero on padding
nodes) with its mean over real nodes removed when ``remove_mean`` (EDM
``egnn_dynamics``), which is E(3)-equivariant: it rotates and reflects with the input,
does not change under a translation of the input, and permutes with the nodes.

The noise label ``c_noise`` (B,) is embedded (sinusoids + MLP) and concatenated, with the
optional node features ``h`` (e.g. one-hot atom types), to the input of the node
embedding. Inputs should be in units where inter-node distances are O(1) (EDM feeds Å to
molecules with ~1.5 Å bonds; scale protein coordinates accordingly).

Neighbourhoods: ``"full"`` (all pairs, as in EDM), ``"knn"`` (the k nearest real nodes)
or ``"radius"`` (the real nodes within ``cutoff``, at most the k nearest). kNN and radius
neighbourhoods are computed once from the input coordinates, from exact pairwise
distances, so they are equivariant except where two distances tie exactly.

Memory: edge features are never built for all pairs at once. The first layer of each
edge MLP is split, W[h_i, h_j, e_ij] = W_i h_i + W_j h_j + W_e e_ij, so node terms are
computed per node; edges are processed in chunks of receiving nodes, and with gradients
enabled each chunk is recomputed in the backward pass (activation checkpointing), so
only (B, N, hidden) tensors are stored per layer. The peak is one chunk's
(B, chunk, K, hidden) intermediates, K = N for "full" and k otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from cryoprior.core.errors import InputError, require
from cryoprior.networks.embeddings import (
    ConditionEmbedding,
    batch_noise_label,
    resolve_extra_scalars,
)

NEIGHBOURS = ("full", "knn", "radius")
AGGREGATIONS = ("sum", "mean")
_EDGE_BUDGET = 2**24  # elements of one (B, chunk, K, hidden) tensor in the automatic chunking


@dataclass
class _Graph:
    """Neighbourhoods of one batch: K = N (idx None, all nodes) or k (idx (B, N, k))."""

    idx: torch.Tensor | None  # (B, N, k) neighbour indices, or None for all nodes
    edge_mask: torch.Tensor  # (B, N, K) float: 1 for a real edge j -> i
    norm: torch.Tensor  # (B, N, 1) aggregation normaliser Z_i
    node_mask: torch.Tensor  # (B, N, 1) float
    x0: torch.Tensor  # (B, N, 3) input coordinates (masked)
    chunk: int  # receiving nodes per chunk
    use_checkpoint: bool


def _neighbours(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Sender features for receivers: (B, N, F) -> (B, c, k, F), or (B, 1, N, F) if all."""
    if idx is None:
        return t[:, None]
    batch = torch.arange(t.shape[0], device=t.device).reshape(-1, 1, 1)
    return t[batch, idx]


def _edge_geometry(
    x: torch.Tensor, x_i: torch.Tensor, idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differences x_i − x_j (B, c, K, 3) and squared distances (B, c, K, 1)."""
    diff = x_i[:, :, None, :] - _neighbours(x, idx)
    return diff, (diff * diff).sum(-1, keepdim=True)


def _over_receivers(fn, graph: _Graph, per_receiver: list, shared: list) -> torch.Tensor:
    """Run ``fn(*receiver_slices, *shared)`` on chunks of receiving nodes; concatenate."""
    n = graph.edge_mask.shape[1]
    outs = []
    for i0 in range(0, n, graph.chunk):
        sl = slice(i0, i0 + graph.chunk)
        args = [None if t is None else t[:, sl] for t in per_receiver] + shared
        if graph.use_checkpoint:
            outs.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            outs.append(fn(*args))
    return torch.cat(outs, dim=1)


class _EdgeInput(nn.Module):
    """First layer of an edge MLP on [h_i, h_j, d²_ij, d0²_ij], split into node terms."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.linear = nn.Linear(2 * hidden + 2, hidden)

    def node_terms(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Receiver term W_i h_i + b and sender term W_j h_j, each (B, N, hidden)."""
        w, n = self.linear.weight, self.hidden
        return F.linear(h, w[:, :n], self.linear.bias), F.linear(h, w[:, n : 2 * n])

    def edges(
        self,
        a_i: torch.Tensor,
        p: torch.Tensor,
        idx: torch.Tensor | None,
        d2: torch.Tensor,
        d02: torch.Tensor,
    ) -> torch.Tensor:
        """Pre-activation (B, c, K, hidden) from node terms and the two squared distances."""
        w_e = self.linear.weight[:, 2 * self.hidden :]
        pre = a_i[:, :, None] + _neighbours(p, idx)
        return pre.addcmul_(d2, w_e[:, 0]).addcmul_(d02, w_e[:, 1])


class GCL(nn.Module):
    """Invariant graph convolution: h_i ← h_i + φ_h(h_i, Σ_j e_ij m_ij / Z_i) (EDM ``GCL``)."""

    def __init__(self, hidden: int, attention: bool) -> None:
        super().__init__()
        self.edge_in = _EdgeInput(hidden)
        self.edge_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.att = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def _messages(self, a_i, x_i, x0_i, idx, emask, norm, p, x, x0):
        _, d2 = _edge_geometry(x, x_i, idx)
        _, d02 = _edge_geometry(x0, x0_i, idx)
        m = self.edge_mlp(self.edge_in.edges(a_i, p, idx, d2, d02))
        if self.att is not None:
            m = m * self.att(m)
        return torch.einsum("bckh,bck->bch", m, emask) / norm

    def forward(self, h: torch.Tensor, x: torch.Tensor, graph: _Graph) -> torch.Tensor:
        a, p = self.edge_in.node_terms(h)
        agg = _over_receivers(
            self._messages,
            graph,
            [a, x, graph.x0, graph.idx, graph.edge_mask, graph.norm],
            [p, x, graph.x0],
        )
        return (h + self.node_mlp(torch.cat([h, agg], dim=-1))) * graph.node_mask


class EquivariantUpdate(nn.Module):
    """Coordinate update x_i += Σ_j e_ij (x_i−x_j)/(‖x_i−x_j‖+C)·tanh(φ_x)·range / Z_i."""

    def __init__(self, hidden: int, coords_range: float, norm_constant: float) -> None:
        super().__init__()
        self.coords_range = coords_range
        self.norm_constant = norm_constant
        self.edge_in = _EdgeInput(hidden)
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # EDM: start with tiny moves
        self.coord_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), last)

    def _moves(self, a_i, x_i, x0_i, idx, emask, norm, p, x, x0):
        diff, d2 = _edge_geometry(x, x_i, idx)
        _, d02 = _edge_geometry(x0, x0_i, idx)
        phi = self.coord_mlp(self.edge_in.edges(a_i, p, idx, d2, d02))
        unit = diff / (torch.sqrt(d2 + 1e-8) + self.norm_constant)
        trans = unit * torch.tanh(phi) * self.coords_range
        return (trans * emask[..., None]).sum(2) / norm

    def forward(self, h: torch.Tensor, x: torch.Tensor, graph: _Graph) -> torch.Tensor:
        a, p = self.edge_in.node_terms(h)
        move = _over_receivers(
            self._moves,
            graph,
            [a, x, graph.x0, graph.idx, graph.edge_mask, graph.norm],
            [p, x, graph.x0],
        )
        return (x + move) * graph.node_mask


class EquivariantBlock(nn.Module):
    """``inv_sublayers`` GCLs then one coordinate update (EDM ``EquivariantBlock``)."""

    def __init__(
        self,
        hidden: int,
        inv_sublayers: int,
        attention: bool,
        coords_range: float,
        norm_constant: float,
    ) -> None:
        super().__init__()
        self.gcls = nn.ModuleList(GCL(hidden, attention) for _ in range(inv_sublayers))
        self.update = EquivariantUpdate(hidden, coords_range, norm_constant)

    def forward(
        self, h: torch.Tensor, x: torch.Tensor, graph: _Graph
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for gcl in self.gcls:
            h = gcl(h, x, graph)
        return h, self.update(h, x, graph)


class EGNN(nn.Module):
    """EGNN denoiser for point clouds: ``forward(x (B,N,3), c_noise (B,), mask, h) -> (B,N,3)``.

    Args:
        hidden_features: width of node features and of every MLP.
        num_layers: equivariant blocks.
        in_node_features: F of the optional node features ``h`` (B, N, F); 0 for none.
        inv_sublayers: invariant GCLs per block (EDM default 1).
        attention: sigmoid attention gate on messages.
        coords_range: total coordinate-update range; each block uses
            ``coords_range / num_layers`` (EDM: 15).
        norm_constant: C in (x_i − x_j)/(‖x_i − x_j‖ + C) (EDM: 1).
        normalization_factor: Z for ``aggregation="sum"`` (EDM default 100, QM9 runs 1).
        aggregation: ``"sum"`` (divide by normalization_factor) or ``"mean"`` (divide by
            the number of real neighbours).
        neighbours: ``"full"``, ``"knn"`` or ``"radius"``.
        k: neighbours per node for ``"knn"``; the maximum kept for ``"radius"``.
        cutoff: radius (input units) for ``"radius"``.
        remove_mean: subtract the mean over real nodes from the output.
        embedding_dim: width of the noise embedding concatenated to the node input.
        n_extra_scalars: length k of per-sample ``extra_scalars`` (B, k).
        embedding_scale: scale of ``c_noise`` before the sinusoids.
        chunk_size: receiving nodes per edge chunk (None: automatic, about 2**24 elements).
        checkpoint: recompute edge chunks in the backward pass (saves memory; disable for
            ``torch.func`` transforms).
    """

    def __init__(
        self,
        hidden_features: int = 128,
        num_layers: int = 4,
        in_node_features: int = 0,
        inv_sublayers: int = 1,
        attention: bool = False,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 100.0,
        aggregation: str = "sum",
        neighbours: str = "full",
        k: int = 16,
        cutoff: float | None = None,
        remove_mean: bool = True,
        embedding_dim: int = 64,
        n_extra_scalars: int = 0,
        embedding_scale: float = 100.0,
        chunk_size: int | None = None,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        require(
            hidden_features > 0 and num_layers > 0 and inv_sublayers > 0,
            "hidden_features, num_layers and inv_sublayers must be > 0, got "
            f"{hidden_features}, {num_layers}, {inv_sublayers}",
        )
        require(in_node_features >= 0, f"in_node_features must be >= 0, got {in_node_features}")
        require(
            neighbours in NEIGHBOURS, f"neighbours must be one of {NEIGHBOURS}, got {neighbours!r}"
        )
        require(
            aggregation in AGGREGATIONS,
            f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}",
        )
        require(
            normalization_factor > 0,
            f"normalization_factor must be > 0, got {normalization_factor}",
        )
        require(neighbours == "full" or k >= 1, f"k must be >= 1, got {k}")
        if neighbours == "radius":
            require(
                cutoff is not None and cutoff > 0,
                f"neighbours='radius' needs cutoff > 0 (input units), got {cutoff}",
            )
        require(
            chunk_size is None or chunk_size >= 1,
            f"chunk_size must be None or >= 1, got {chunk_size}",
        )
        self.config = {
            "hidden_features": int(hidden_features),
            "num_layers": int(num_layers),
            "in_node_features": int(in_node_features),
            "inv_sublayers": int(inv_sublayers),
            "attention": bool(attention),
            "coords_range": float(coords_range),
            "norm_constant": float(norm_constant),
            "normalization_factor": float(normalization_factor),
            "aggregation": aggregation,
            "neighbours": neighbours,
            "k": int(k),
            "cutoff": None if cutoff is None else float(cutoff),
            "remove_mean": bool(remove_mean),
            "embedding_dim": int(embedding_dim),
            "n_extra_scalars": int(n_extra_scalars),
            "embedding_scale": float(embedding_scale),
            "chunk_size": chunk_size,
            "checkpoint": bool(checkpoint),
        }
        self.hidden = hidden_features
        self.in_node_features = in_node_features
        self.neighbours = neighbours
        self.k = k
        self.cutoff = cutoff
        self.aggregation = aggregation
        self.normalization_factor = normalization_factor
        self.remove_mean = remove_mean
        self.chunk_size = chunk_size
        self.checkpoint = checkpoint
        self.embedding = ConditionEmbedding(embedding_dim, n_extra_scalars, scale=embedding_scale)
        self.embed_in = nn.Linear(in_node_features + embedding_dim, hidden_features)
        self.blocks = nn.ModuleList(
            EquivariantBlock(
                hidden_features, inv_sublayers, attention, coords_range / num_layers, norm_constant
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor | float,
        mask: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
        edge_mask: torch.Tensor | None = None,
        extra_scalars: torch.Tensor | None = None,
        class_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Equivariant displacement field (B, N, 3), zero on padding nodes.

        ``x``: (B, N, 3) coordinates. ``c_noise``: (B,) noise label (or a number).
        ``mask``: (B, N) bool/float, 1 for real nodes (default all real). ``h``: (B, N, F)
        node features (required when ``in_node_features > 0``). ``edge_mask``: (B, N, N)
        bool/float, 1 where the message j -> i is allowed (entry [b, i, j]).
        ``extra_scalars`` (alias ``class_emb``): (B, k).
        """
        node_mask = self._check_input(x, mask, h, edge_mask)
        b, n, _ = x.shape
        m3 = node_mask[..., None]
        x0 = x * m3
        emb = self.embedding(
            batch_noise_label(c_noise, x), resolve_extra_scalars(extra_scalars, class_emb)
        )
        feats = [emb[:, None, :].expand(b, n, emb.shape[-1])]
        if self.in_node_features:
            feats.insert(0, h.to(x.dtype) * m3)
        hh = self.embed_in(torch.cat(feats, dim=-1)) * m3
        graph = self._graph(x0, node_mask, edge_mask)
        xx = x0
        for block in self.blocks:
            hh, xx = block(hh, xx, graph)
        vel = (xx - x0) * m3
        if self.remove_mean:
            mean = vel.sum(1, keepdim=True) / m3.sum(1, keepdim=True).clamp(min=1)
            vel = (vel - mean) * m3
        return vel

    def _check_input(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        h: torch.Tensor | None,
        edge_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Validate inputs; return the node mask as a (B, N) float tensor."""
        if x.ndim != 3 or x.shape[-1] != 3:
            raise InputError(f"EGNN needs x of shape (B, N, 3), got {tuple(x.shape)}")
        b, n, _ = x.shape
        if mask is None:
            node_mask = torch.ones(b, n, dtype=x.dtype, device=x.device)
        else:
            require(
                tuple(mask.shape) == (b, n),
                f"mask must have shape ({b}, {n}), got {tuple(mask.shape)}",
            )
            node_mask = mask.to(x.dtype)
        if self.in_node_features:
            if h is None or tuple(h.shape) != (b, n, self.in_node_features):
                got = None if h is None else tuple(h.shape)
                raise InputError(
                    f"this EGNN needs node features h of shape "
                    f"({b}, {n}, {self.in_node_features}), got {got}"
                )
        else:
            require(
                h is None,
                "node features h were given but the EGNN was built with "
                "in_node_features=0; rebuild it with in_node_features=F",
            )
        if edge_mask is not None:
            require(
                tuple(edge_mask.shape) == (b, n, n),
                f"edge_mask must have shape ({b}, {n}, {n}), got {tuple(edge_mask.shape)}",
            )
        return node_mask

    def _graph(
        self, x0: torch.Tensor, node_mask: torch.Tensor, edge_mask: torch.Tensor | None
    ) -> _Graph:
        """Neighbour indices, edge mask (real, i ≠ j, in neighbourhood) and normaliser."""
        b, n, _ = x0.shape
        if self.neighbours == "full":
            idx = None
            off_diag = 1.0 - torch.eye(n, dtype=x0.dtype, device=x0.device)
            emask = node_mask[:, :, None] * node_mask[:, None, :] * off_diag
            if edge_mask is not None:
                emask = emask * edge_mask.to(x0.dtype)
        else:
            idx, dist = self._nearest(x0, node_mask)
            emask = node_mask[:, :, None] * torch.isfinite(dist).to(x0.dtype)
            if self.neighbours == "radius":
                emask = emask * (dist <= self.cutoff).to(x0.dtype)
            if edge_mask is not None:
                emask = emask * torch.gather(edge_mask.to(x0.dtype), 2, idx)
        if self.aggregation == "mean":
            norm = emask.sum(-1, keepdim=True).clamp(min=1.0)
        else:
            norm = torch.full(
                (b, n, 1), self.normalization_factor, dtype=x0.dtype, device=x0.device
            )
        k_all = emask.shape[-1]
        chunk = self.chunk_size or max(1, _EDGE_BUDGET // max(1, b * k_all * self.hidden))
        return _Graph(
            idx=idx,
            edge_mask=emask,
            norm=norm,
            node_mask=node_mask[..., None],
            x0=x0,
            chunk=chunk,
            use_checkpoint=self.checkpoint and torch.is_grad_enabled(),
        )

    @torch.no_grad()
    def _nearest(
        self, x0: torch.Tensor, node_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, N, k) of the k nearest real nodes j ≠ i and their distances (inf
        where fewer than k exist), from exact differences, in chunks of rows."""
        b, n, _ = x0.shape
        k = min(self.k, max(n - 1, 0))
        rows = max(1, _EDGE_BUDGET // max(1, 4 * b * n))
        ar = torch.arange(n, device=x0.device)
        excluded = node_mask[:, None, :] <= 0  # (B, 1, N): padding senders
        idx_parts, dist_parts = [], []
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            diff = x0[:, i0:i1, None, :] - x0[:, None, :, :]
            d = torch.sqrt((diff * diff).sum(-1))  # (B, c, N)
            self_edge = (ar[i0:i1, None] == ar[None, :])[None]
            d = d.masked_fill(excluded | self_edge, float("inf"))
            dist, idx = torch.topk(d, k, dim=-1, largest=False, sorted=True)
            idx_parts.append(idx)
            dist_parts.append(dist)
        return torch.cat(idx_parts, dim=1), torch.cat(dist_parts, dim=1)
