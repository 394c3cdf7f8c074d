"""Local lattice search: scoring candidate poses of particle images against a reference.

Candidates exp([δ]×) R_i around each image's current rotation (δ on a cubic lattice),
each at the shifts s_i + t of a square lattice, are scored by the band misfit
L = Σ_band |X − CTF · P_R e^{2πik·s/L}|² of :mod:`cryoprior.solvers.poses` (one slice per
candidate gives every shift); levels of finer cubes refine the estimate, the best
candidate or the posterior mean (weights exp(−L/2σ²)), optionally under a Gaussian prior
on the move (:class:`PosePrior`). :func:`~cryoprior.solvers.poses.local_search` and
:func:`~cryoprior.solvers.poses.refine_local` drive it over batches of images; the MFN
fit calls :func:`lattice_search` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoprior.core.errors import require
from cryoprior.geometry.rotations import axis_angle_to_matrix
from cryoprior.solvers.pose_grids import (
    SearchGrid,
    cube_offsets,
    rotation_log,
    search_offsets,
    shift_offsets,
)
from cryoprior.solvers.pose_reference import BandModel

ESTIMATES = ("best", "mean")

# Candidate × image × frequency values handled per chunk of a local search (bounds its
# work arrays: about 80 MB).
_SEARCH_VALUES_PER_CHUNK = 2**20


# ---------------------------------------------------------------------------------------
# scoring candidates


@dataclass
class PosePrior:
    """A Gaussian prior on each particle's rotation away from its starting pose R₀:
    −log p(R) = |log(R R₀ᵀ)|² / 2σ² + const (σ radians per axis; RELION's sigma_ang)."""

    start: torch.Tensor  # (B, 3, 3) the batch's starting rotations
    sigma: float  # radians

    def penalty(self, rotations: torch.Tensor) -> torch.Tensor:
        """−log prior (up to a constant) of rotations (..., B, 3, 3): (..., B)."""
        start = self.start.to(torch.float64)
        dev = rotation_log(rotations.to(torch.float64) @ start.transpose(-1, -2))
        return (dev**2).sum(-1) / (2 * self.sigma**2)


class Top:
    """The K lowest losses met so far for each of B images, with their rotations (B, K, 3,
    3) and shifts (B, K, 2), sorted (lowest first)."""

    def __init__(self, b: int, k: int) -> None:
        self.loss = torch.full((b, k), math.inf, dtype=torch.float64)
        self.rotation = torch.eye(3, dtype=torch.float64).expand(b, k, 3, 3).clone()
        self.shift = torch.zeros(b, k, 2, dtype=torch.float64)

    @property
    def k(self) -> int:
        return int(self.loss.shape[1])

    def merge(self, loss: torch.Tensor, rotation: torch.Tensor, shift: torch.Tensor) -> None:
        """Merge candidates: loss (B, c), rotation (B, c, 3, 3), shift (B, c, 2)."""
        loss = torch.cat([self.loss, loss.to(torch.float64)], 1)
        order = loss.topk(self.k, dim=1, largest=False).indices  # sorted, lowest first
        rot = torch.cat([self.rotation, rotation.to(torch.float64)], 1)
        sh = torch.cat([self.shift, shift.to(torch.float64)], 1)
        self.loss = loss.gather(1, order)
        self.rotation = rot.gather(1, order[..., None, None].expand(-1, -1, 3, 3))
        self.shift = sh.gather(1, order[..., None].expand(-1, -1, 2))


@dataclass
class _Scores:
    """What one search level found for each of B images: the best candidate (loss, rotation
    (B, 3, 3) float64, relative shift (B, 2) Å), the posterior means of the rotation
    offset δ (B, 3) radians and of the relative shift (B, 2) Å (None without a noise
    power), and the K best rotations at their best relative shifts (None unless asked)."""

    loss: torch.Tensor
    rotation: torch.Tensor
    shift: torch.Tensor
    mean_delta: torch.Tensor | None
    mean_shift: torch.Tensor | None
    top: Top | None = None


def _score_candidates(
    model: BandModel,
    data: torch.Tensor,
    centres: torch.Tensor,
    deltas: torch.Tensor,
    shifts: torch.Tensor,
    offsets: torch.Tensor,
    max_shift: float,
    noise: torch.Tensor | None,
    prior: PosePrior | None = None,
    top_k: int = 0,
) -> _Scores:
    """Score rotations exp([δ_c]×) · centre_i (δ (C, 3) radians, centres (B, 3, 3)) at
    relative shifts ``offsets`` (S, 2) or (B, S, 2) Å with |offset| ≤ max_shift.

    Keeps the lowest loss per image and, with ``noise`` σ² (B,) (the power per Fourier
    coefficient of the noise), the posterior means of δ and of the offset under a uniform
    prior on the candidates: weights exp(−(L − L_min) / 2σ²), the likelihood of white
    Gaussian noise (real images; L sums |Y − Ŷ|² over the whole band). Accumulated over
    chunks of candidates (``_SEARCH_VALUES_PER_CHUNK``) with a running maximum. With a
    ``prior`` (needs ``noise``) the weights are multiplied by the prior of each candidate
    rotation (:class:`PosePrior`) and the "best" candidate is the posterior mode. With
    ``top_k`` > 0 also the ``top_k`` best rotations, each at its best shift.
    """
    require(prior is None or noise is not None, "a pose prior needs the noise power")
    b, n = data.shape
    per_image = offsets.expand(b, *offsets.shape[-2:]).to(torch.float64)  # (B, S, 2)
    allowed = per_image.norm(dim=-1) <= max_shift * (1 + 1e-9) + 1e-12  # (B, S)
    ramps = model.ramps(offsets)
    chunk = max(1, _SEARCH_VALUES_PER_CHUNK // max(1, b * n))
    rows = torch.arange(b)
    best = _Scores(
        torch.full((b,), math.inf),
        centres.clone(),
        torch.zeros(b, 2, dtype=torch.float64),
        None,
        None,
        Top(b, top_k) if top_k > 0 else None,
    )
    peak = torch.full((b,), -math.inf, dtype=torch.float64)  # running max of log weights
    mass = torch.zeros(b, dtype=torch.float64)
    moment_delta = torch.zeros(b, 3, dtype=torch.float64)
    moment_shift = torch.zeros(b, 2, dtype=torch.float64)
    for start in range(0, deltas.shape[0], chunk):
        delta = deltas[start : start + chunk]
        cand = axis_angle_to_matrix(delta)[:, None] @ centres[None]  # (c, B, 3, 3) float64
        loss = model.losses(model.spectra(cand, shifts), data, ramps)  # (c, B, S)
        loss = torch.where(allowed[None], loss, math.inf)
        if prior is not None:  # in units of loss: 2σ² · (−log prior)
            penalty = prior.penalty(cand) * (2 * noise.to(torch.float64))
            loss = loss + penalty[..., None].to(loss.dtype)
        value, where = loss.permute(1, 0, 2).reshape(b, -1).min(-1)
        better = value < best.loss
        ci, si = where // allowed.shape[1], where % allowed.shape[1]
        best.loss = torch.where(better, value, best.loss)
        best.rotation = torch.where(better[:, None, None], cand[ci, rows], best.rotation)
        best.shift = torch.where(better[:, None], per_image[rows, si], best.shift)
        if best.top is not None:
            per_rotation, at = loss.min(-1)  # (c, B): each rotation at its best shift
            vals, idx = per_rotation.T.topk(min(top_k, cand.shape[0]), dim=1, largest=False)
            best.top.merge(
                vals, cand[idx, rows[:, None]], per_image[rows[:, None], at.T.gather(1, idx)]
            )
        if noise is None:
            continue
        log_w = -loss.to(torch.float64) / (2 * noise.to(torch.float64)[:, None])  # (c, B, S)
        new_peak = torch.maximum(peak, log_w.amax(dim=(0, 2)))
        keep = torch.exp(peak - new_peak)
        w = torch.exp(log_w - new_peak[:, None])
        mass = mass * keep + w.sum(dim=(0, 2))
        moment_delta = moment_delta * keep[:, None] + torch.einsum("cb,cd->bd", w.sum(2), delta)
        moment_shift = moment_shift * keep[:, None] + torch.einsum(
            "bs,bsd->bd", w.sum(0), per_image
        )
        peak = new_peak
    if noise is not None:
        best.mean_delta = moment_delta / mass[:, None]
        best.mean_shift = moment_shift / mass[:, None]
    return best


def lattice_search(
    model: BandModel,
    data: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    search: SearchGrid,
    noise: torch.Tensor | None = None,
    prior: PosePrior | None = None,
    estimate: str = "mean",
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, Top | None]:
    """Exhaustive local search around each image's pose against a fixed map.

    Level 0 tries every rotation exp([δ]×) R_i for δ on :func:`search_offsets` (radius,
    step), and for each the shifts s_i + t with t on :func:`shift_offsets` (``max_shift``,
    ``shift_step``) (all shifts of one rotation from one spectrum, :class:`BandModel`).
    Level l ≥ 1 tries the 3³ rotations exp([δ]×) R̂ with δ on step/3^l·{-1, 0, 1}³ and the
    3² shifts t̂ + shift_step/3^l·{-1, 0, 1}² (still |t| ≤ max_shift) around the previous
    level's estimate (R̂, t̂).

    Without ``noise`` the estimate of a level is its lowest-loss candidate (the starting
    pose is a candidate, so the model loss never rises). With ``noise`` σ² (B,) (noise
    power per Fourier coefficient, e.g. the misfit per coefficient at the current pose) it
    is the posterior mean under a uniform prior on the candidates and white Gaussian noise:
    δ̄ = Σ w δ / Σ w, t̄ likewise, w = exp(−L / 2σ²), R̂ = exp([δ̄]×) R. Where the band cannot
    tell the candidates apart the weights are flat and the pose stays near where it was,
    instead of jumping to the largest noise peak in the ball.

    Args:
        model: the map and CTFs of the batch (:class:`BandModel`).
        data: (B, n) half-plane data spectra.
        rotations: (B, 3, 3) current rotations; shifts: (B, 2) current shifts (Å).
        search: the lattices (:class:`SearchGrid`).
        noise: (B,) noise power per Fourier coefficient, or None (best candidate).
        prior: a Gaussian prior on the rotation away from the starting pose (needs
            ``noise``); the posterior then weighs the candidates by it.
        estimate: ``"mean"`` (posterior mean, when ``noise`` is given) or ``"best"``
            (the lowest-loss candidate; with a prior the posterior mode).
        top_k: with > 0, also return the last level's ``top_k`` best rotations, each at its
            best shift (absolute shifts, Å), losses in the ``Top``.

    Returns:
        rotations (B, 3, 3) and shifts (B, 2) (Å), float64, and the top candidates or None.

    Cost: C₀ + 27 (levels − 1) spectra per image (C₀ ≈ 4.19 (radius/step)³), each n
    trilinear samples, plus n·S₀ (level 0, S₀ shifts) or 9 n products per spectrum for the
    shifts. Memory: chunks of ≤ 2²⁰ candidate × image × frequency values, ~60 bytes
    each (sample coordinates, samples, complex products): a peak of about 80 MB (measured),
    plus the (chunk, B, S₀) loss table.
    """
    require(estimate in ESTIMATES, f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    data = data.to(torch.complex64)
    centre = rotations.to(torch.float64)
    s = shifts.to(torch.float32)
    offsets = shift_offsets(search.max_shift, search.shift_step)
    square = cube_offsets(1.0, 2) if offsets.shape[0] > 1 else offsets
    deltas = search_offsets(search.radius, search.step)
    t_hat = torch.zeros(centre.shape[0], 2, dtype=torch.float64)
    found = None
    for level in range(search.levels):
        if level > 0:
            deltas = cube_offsets(search.step / 3**level, 3)
            offsets = t_hat[:, None, :] + square * (search.shift_step / 3**level)
        last = level == search.levels - 1
        found = _score_candidates(
            model,
            data,
            centre,
            deltas,
            s,
            offsets,
            search.max_shift,
            noise,
            prior,
            top_k if last else 0,
        )
        if found.mean_delta is None or estimate == "best":
            centre, t_hat = found.rotation, found.shift
        else:
            centre = axis_angle_to_matrix(found.mean_delta) @ centre
            t_hat = found.mean_shift
    top = None if found is None else found.top
    if top is not None:
        top.shift = top.shift + shifts.to(torch.float64)[:, None, :]
    return centre, shifts.to(torch.float64) + t_hat, top


__all__ = ["ESTIMATES", "PosePrior", "Top", "lattice_search"]
