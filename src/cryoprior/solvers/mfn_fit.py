"""Coordinate-network reconstruction: fit a band-limited MFN to particle images, refining poses.

The map is a multiplicative filter network V(x) = a · y_k(x) (:mod:`cryoprior.networks.mfn`:
BACON, or the residual MFN of Shekarforoush et al., NeurIPS 2022), whose output k is
band-limited to a known band b_k (cycles per box). Each image i is modelled as

    Ŷ_i = FT[ crop( shift_{-s_i} ( CTF_i · P(R_i) FT(V) ) ) ],    R_i = exp([δ_i]×) R⁰_i,

the physics core's forward model (:class:`cryoprior.physics.projection.Projector`, the CTF
of :mod:`cryoprior.physics.ctf` on the padded slice grid, then the crop; exactly what
:mod:`cryoprior.physics.simulator` renders), with R⁰_i the initial pose (from the STAR file),
δ_i a small axis-angle update in the microscope frame (radians) and s_i the RELION origin
in Å (the particle centre sits at -s_i). The loss of a batch is the squared distance
between model and observed image spectra over the frequencies |k| ≤ band of the current
stage (the images low-passed to the stage's band), divided by the observed power there:

    L = Σ_i Σ_{|k| ≤ band} |Y_i(k) - Ŷ_i(k)|² / Σ_i Σ_{|k| ≤ band} |Y_i(k)|².

Stages (coarse to fine; Shekarforoush et al. §3.3, "frequency marching"): stage j fits
with the network's outputs 1..k_j active and only their layers trainable
(``set_stage(k_j)``), compares images up to its band, and runs ``epochs`` passes over the
particles in random batches. On each batch the network takes ``net_steps`` Adam steps with
the poses fixed, then the batch's poses are refined with the map fixed (alternating
minimisation, as in the authors' code; the map is the one the last network step started
from, which saves rendering it again): first a local exhaustive search, then
``pose_steps`` Adam steps. Every step keeps a particle's pose unless the new one has a
lower loss under the forward model above, so a visit never increases its image's misfit
for the current map.

Local pose search (``pose_search="local"``; what RELION and cryoSPARC do in local
refinement). For each image, candidate rotations exp([δ]×) R_i with δ on a cubic lattice
of spacing Δ inside the ball |δ| ≤ ρ (δ = 0 included), and for each candidate every
shift s_i + t on a square lattice inside |t| ≤ ``search_max_shift``: the band loss
Σ_k |Y(k) − Ŷ_R(k) e^{2πik·(s+t)/L}|² = const + P_R − 2 Re Σ_k conj(Ŷ_R,s(k)) Y(k)
e^{-2πik·t/L}, so one model spectrum per rotation gives the loss at all shifts (a matrix
product with phase ramps). Then ``search_levels`` − 1 finer levels each try the 3³ cube
of spacing Δ/3^l around the estimate, and the 3² square of a third of the shift spacing
(:func:`cryoprior.solvers.poses.lattice_search`, shared with :mod:`~cryoprior.solvers.poses`).
The estimate of a level is the posterior mean of δ and t under white Gaussian noise
(weights exp(−L/2σ²), σ² the image's misfit per Fourier coefficient at its current pose:
noise plus what the map does not explain yet), or the best candidate
(``search_estimate="best"``); the posterior mean stays put where the band cannot
distinguish the candidates, where the best candidate would follow the noise. The
candidates' spectra come from :class:`BandSearchModel`: trilinear samples of the
projector's padded 3-D FT at the band's frequencies (half plane, Hermitian weights) times
the CTF with its point-spread function cropped to the box — :func:`model_spectra` without
per-candidate FFTs, 10-14× cheaper; the fit's own model decides whether a particle moves.
At the first searching stage ρ and Δ are ``search_radius_deg`` and ``search_step_deg``; at
a later one Δ is scaled by (first band / this band) and ρ = ``search_refine_steps`` · Δ.
The shift spacing is L/(4b) (a quarter period at the band edge b, box length L).

Cost of the search, per image and visit: C₀ + 27 (levels − 1) model spectra, C₀ ≈ 4.19
(ρ/Δ)³ (ρ = 45°, Δ = 10°: 382; a later stage's ball of 2 steps: 33), each n trilinear
samples (n ≈ π b²/2 half-band frequencies) plus n·S products for the S shifts. Measured
on one (shared) CPU thread, 64² data at 1.5 Å/px, batches of 128: ~3 ms per image at the
10 Å band (b = 9.6 cycles/box, D' = 22) with ρ = 45°, Δ = 10°, against ~10 ms for the
network step and 0.8 ms for 5 Adam pose steps there; ~5 ms per image at 3.75 Å (b = 25.6,
D' = 54) with ρ = 7.4°, Δ = 3.7°. Peak memory: chunks of 2²⁰ candidate × image ×
frequency values, about 80 MB whatever the batch or ball.

Working grid. Only frequencies below the stage's band b (cycles per box) enter the loss,
so a stage projects on a grid D' = 2⌈b⌉ + 2 (same physical box, pixel size p·D/D') and
compares with the Fourier-cropped images. The network (a continuous function) is
evaluated on the smallest grid whose Nyquist exceeds its active output's band (so the
samples do not alias) and Fourier-cropped to D'. Projections sum D' instead of D voxels
and spectra D'² instead of D² pixels, so model spectra are scaled by (D/D')³. Coarse
stages are many times cheaper; stages at the full band use the full grid.

Initialisation. A Wiener back-projection from the initial poses
(:func:`cryoprior.solvers.backprojection.reconstruct_source`) sets the network's output
scale a (its standard deviation) and, with ``warm_start_steps`` > 0, a target for a short
regression of output k_1 onto the map low-passed to the first stage's band (on the working
grid, no projections). Nothing else is taken from it.

Global frame. The data fix the map only up to a rigid motion: a map V(Aᵀ(r - c)) with
poses R_i Aᵀ and shifts s_i + (R_i Aᵀ c)_xy explains the images equally well. The fit does
not pin this gauge; it is anchored only by the initial poses (their errors average out).
:func:`~cryoprior.solvers.poses.global_alignment` finds (A, c) against reference poses,
:func:`~cryoprior.solvers.poses.pose_errors` reports
errors before and after removing it, and :func:`render_aligned` renders the network in the
reference frame exactly (the network is a function, so no interpolation is needed).

Checkpoints. With ``out_dir``, the network, optimiser, poses, stage results and history
are written atomically to ``out_dir/checkpoint.pt`` every ``checkpoint_every`` batches
and at the end of each stage, and each stage's map to ``out_dir/stage{j}.mrc``. Batch
order is a function of (seed, stage, epoch), so a killed run resumed with
``resume=True`` continues exactly where its last checkpoint was written.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.files import atomic_path
from cryoprior.core.runtime import progress, seed_everything
from cryoprior.geometry.fft import fft2_c, fft3_c, ifft2_c, ifft3_c
from cryoprior.geometry.grids import frequency_grid
from cryoprior.geometry.rotations import axis_angle_to_matrix, matrix_to_euler
from cryoprior.io.star import read_particle_images
from cryoprior.networks.mfn import MultiplicativeFilterNetwork, marching_fractions, render_grid
from cryoprior.networks.registry import build_network, network_config
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.fourier_slice import check_kernel
from cryoprior.physics.projection import Projector, crop_centred, padded_size
from cryoprior.physics.shifts import shift_spectra
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.poses import (
    BandModel,
    PosePrior,
    ReferenceProjector,
    SearchGrid,
    band_box,
    lattice_search,
    rotation_log,
)

NETWORKS = ("bacon", "residual_mfn")
INITS = ("default", "marching", "bacon")
POSE_MODES = ("all", "search", "adam", "shifts", "fixed")
POSE_SEARCHES = ("local", "adam")
SEARCH_ESTIMATES = ("mean", "best")
CHECKPOINT_FORMAT = "cryoprior-mfn-fit"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Stage:
    """One stage of the coarse-to-fine schedule.

    band: low-pass of the images (and of the loss) as a fraction of the Nyquist frequency
        (0, 1]; None uses the band of network output ``outputs`` (capped at Nyquist).
    epochs: passes over the particle set (fractions allowed).
    outputs: network stage k: outputs 1..k are active and only their layers train.
    poses: ``"all"`` (refine rotations and shifts with the config's ``pose_search``),
        ``"search"`` (local search, then Adam steps), ``"adam"`` (Adam steps only),
        ``"shifts"`` (shifts only) or ``"fixed"``.
    """

    band: float | None
    epochs: float
    outputs: int
    poses: str = "all"

    def validate(self, num_layers: int) -> None:
        """Raise InputError for a stage the network cannot run."""
        require(
            self.band is None or 0 < float(self.band) <= 1,
            f"a stage band is a fraction of Nyquist in (0, 1] (or auto), got {self.band}",
        )
        require(
            math.isfinite(self.epochs) and self.epochs > 0,
            f"stage epochs must be > 0, got {self.epochs}",
        )
        require(
            isinstance(self.outputs, int) and 1 <= self.outputs <= num_layers,
            f"stage outputs must be an integer in 1..{num_layers} (the network's layers), "
            f"got {self.outputs!r}",
        )
        require(
            self.poses in POSE_MODES,
            f"stage poses must be one of {POSE_MODES}, got {self.poses!r}",
        )


def parse_stages(text: str, pixel_size: float | None = None) -> tuple[Stage, ...]:
    """Parse a stage schedule ``BAND:EPOCHS:OUTPUTS[:POSES]`` separated by commas.

    BAND is a fraction of Nyquist (``0.5``), a resolution in Å (``12A``; needs
    ``pixel_size``) or ``auto`` (the band of network output OUTPUTS). EPOCHS is the number
    of passes over the particles; OUTPUTS the network stage k (outputs 1..k trainable).
    POSES is ``all`` (default: refine rotations and shifts as the config's ``pose_search``
    says), ``search`` (local exhaustive search, then Adam steps), ``adam`` (Adam steps
    only), ``shifts`` or ``fixed``. Example: ``auto:1:1:search,0.3:1:2,0.6:2:2:adam``.
    """
    stages = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in POSE_MODES):
            raise InputError(
                f"stage {item!r}: expected BAND:EPOCHS:OUTPUTS[:POSES] with POSES one of "
                f"{', '.join(POSE_MODES)}, e.g. 0.5:2:1 or 12A:2:2:search"
            )
        band_text = parts[0].strip()
        try:
            if band_text.lower() == "auto":
                band = None
            elif band_text[-1:] in ("A", "a", "Å"):
                require(pixel_size is not None, "a band in Å needs the pixel size")
                resolution = require_positive(float(band_text[:-1]), "stage resolution (Å)")
                band = 2.0 * float(pixel_size) / resolution
                require(
                    band <= 1 + 1e-9,
                    f"stage resolution {resolution} Å is finer than Nyquist "
                    f"({2 * float(pixel_size):g} Å)",
                )
                band = min(band, 1.0)
            else:
                band = float(band_text)
            stages.append(
                Stage(band, float(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else "all")
            )
        except ValueError:
            raise InputError(
                f"stage {item!r}: BAND must be a number, NN A or auto; EPOCHS a number; "
                f"OUTPUTS an integer"
            ) from None
    require(len(stages) > 0, f"no stages in {text!r}")
    return tuple(stages)


def format_stages(stages: tuple[Stage, ...]) -> str:
    """The inverse of :func:`parse_stages` (bands as fractions of Nyquist)."""
    return ",".join(
        f"{'auto' if s.band is None else f'{s.band:g}'}:{s.epochs:g}:{s.outputs}"
        + ("" if s.poses == "all" else f":{s.poses}")
        for s in stages
    )


@dataclass(frozen=True)
class MFNFitConfig:
    """Everything that defines an MFN fit (saved with every checkpoint).

    network: ``"residual_mfn"`` or ``"bacon"``; init: ``"marching"`` (the residual paper's
    new initialisation), ``"bacon"`` (uniform in the band) or ``"default"`` (marching for
    the residual MFN, BACON's for BACON). BACON (and ``init="bacon"``) gets the band
    fractions of the marching init (:func:`cryoprior.networks.mfn.marching_fractions`), so
    every network has the same band per output and only the initialisation and the
    residual connections differ. spread/offset: λ₁, λ₂ of the marching init. max_band:
    the band of the network's finest output as a fraction of Nyquist (below 1 the fine
    stages run on a smaller working grid; the map cannot hold finer detail).
    base_output: give the residual MFN a head on its first filter (see
    :class:`cryoprior.networks.mfn.ResidualMFN`; without it the marching init cannot
    represent the lowest Fourier shells). stages: the schedule (None: see
    :meth:`resolved_stages`).
    lr: network Adam step; net_steps / pose_steps: Adam steps per batch (pose_steps 0
    disables pose refinement); pose_lr_deg: rotation step in degrees, pose_lr_angstrom:
    shift step in Å (Adam, per particle), both at the Nyquist band and divided by the
    stage's band fraction; refine_shifts: refine in-plane shifts too; pose_accept: keep a
    particle's new pose only if its misfit drops by more than pose_accept times what
    fitting noise would give (0: any decrease).
    pose_search: ``"local"`` (stages whose poses are ``"all"`` run the local exhaustive
    search of :func:`.poses.lattice_search` on each batch before the Adam steps; ``"shifts"``
    stages search shifts) or ``"adam"`` (Adam steps only). search_radius_deg /
    search_step_deg: the search's rotation radius and lattice spacing (degrees) at the
    first searching stage; the radius should cover the expected pose error (the default
    45° / 10° tries 382 rotations). At a later searching stage the spacing is multiplied
    by (first searching stage's band / this stage's band) and the radius is
    search_refine_steps spacings (default 2: 33 rotations). search_levels: lattice levels
    (each further one tries the 3³ cube of a third of the spacing around the estimate).
    search_max_shift: the largest shift move (Å) per visit (None: 3 pixels of the data; 0:
    no shift search); the shift lattice spacing is L/(4 b) Å at band b (cycles per box,
    box length L), a third of it per further level. search_estimate: ``"mean"`` (the
    posterior mean pose over the candidates under white noise whose power is the image's
    misfit at its current pose) or ``"best"`` (the lowest-misfit candidate).
    pose_prior_deg: the expected rms rotation error (degrees) of the starting poses (what
    RELION's ``--sigma_ang`` states): the search then weighs each candidate by a Gaussian
    prior on its rotation away from the starting pose, exp(−|log(R R₀ᵀ)|² / 2σ²) with σ =
    pose_prior_deg / √3 per axis, and a particle moves only if its posterior (misfit
    likelihood × prior) rises; None: a uniform prior (the search may move a particle
    anywhere in its ball where the band's noise says so).
    warm_start_steps: regression steps onto the initial back-projection (0: none).
    pad, kernel: the projector's oversampling and Fourier interpolation.
    """

    network: str = "residual_mfn"
    init: str = "default"
    hidden_features: int = 128
    num_layers: int = 2
    max_band: float = 1.0
    base_output: bool = True
    spread: float = 0.3
    offset: float = 2.0
    stages: tuple[Stage, ...] | None = None
    batch_size: int = 128
    lr: float = 1e-2
    net_steps: int = 1
    pose_steps: int = 10
    pose_lr_deg: float = 0.3
    pose_lr_angstrom: float = 0.1
    refine_shifts: bool = True
    pose_accept: float = 0.0
    pose_search: str = "local"
    search_radius_deg: float = 45.0
    search_step_deg: float = 10.0
    search_refine_steps: float = 2.0
    search_levels: int = 2
    search_max_shift: float | None = None
    search_estimate: str = "mean"
    pose_prior_deg: float | None = None
    warm_start_steps: int = 200
    pad: float = 2.0
    kernel: str = "linear"
    checkpoint_every: int = 50
    seed: int = 0

    def resolved_stages(self) -> tuple[Stage, ...]:
        """The schedule; the default runs each coarser output at its own band for one
        epoch refining shifts only (a coarse output is too poor a map to orient particles
        by), then the finest output at half its band and at its full band, two epochs each,
        refining all poses: ``auto:1:1:shifts,0.5:2:2,1:2:2`` for two layers and max_band 1."""
        if self.stages is not None:
            return tuple(self.stages)
        last = self.num_layers
        coarse = [Stage(None, 1.0, k, "shifts") for k in range(1, last)]
        return (*coarse, Stage(self.max_band / 2, 2.0, last), Stage(self.max_band, 2.0, last))

    def validate(self) -> None:
        """Raise InputError for values that cannot be fitted."""
        require(
            self.network in NETWORKS, f"network must be one of {NETWORKS}, got {self.network!r}"
        )
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        require(
            not (self.network == "bacon" and self.init == "marching"),
            "the marching init belongs to the residual MFN; use --mfn-network residual_mfn",
        )
        require(self.hidden_features >= 1, "hidden_features must be >= 1")
        require(self.num_layers >= 1, "num_layers must be >= 1")
        require(
            0 < self.max_band <= 1,
            f"max_band (the network's band as a fraction of Nyquist) must be in (0, 1], "
            f"got {self.max_band}",
        )
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require_positive(self.lr, "network learning rate")
        require(self.net_steps >= 0 and self.pose_steps >= 0, "step counts must be >= 0")
        require_positive(self.pose_lr_deg, "pose rotation step (degrees)")
        require_positive(self.pose_lr_angstrom, "pose shift step (Å)")
        require(self.warm_start_steps >= 0, "warm_start_steps must be >= 0")
        require(self.pose_accept >= 0, "pose_accept must be >= 0")
        require(
            self.pose_search in POSE_SEARCHES,
            f"pose_search must be one of {POSE_SEARCHES}, got {self.pose_search!r}",
        )
        require(
            math.isfinite(self.search_radius_deg) and 0 <= self.search_radius_deg <= 180,
            f"search radius must be in [0, 180] degrees, got {self.search_radius_deg}",
        )
        require(
            math.isfinite(self.search_step_deg) and self.search_step_deg > 0,
            f"search step must be > 0 degrees, got {self.search_step_deg}",
        )
        require(
            self.search_radius_deg / self.search_step_deg <= 12,
            f"a search radius of {self.search_radius_deg}° at a {self.search_step_deg}° step "
            f"tries ~{4.19 * (self.search_radius_deg / self.search_step_deg) ** 3:.0f} "
            "rotations per image; keep radius/step <= 12 (use a larger step)",
        )
        require(
            math.isfinite(self.search_refine_steps) and 0 <= self.search_refine_steps <= 6,
            f"search_refine_steps (the radius of later searches in lattice steps) must be in "
            f"[0, 6], got {self.search_refine_steps}",
        )
        require(
            isinstance(self.search_levels, int) and 1 <= self.search_levels <= 4,
            f"search_levels must be an integer in 1..4, got {self.search_levels!r}",
        )
        require(
            self.search_estimate in SEARCH_ESTIMATES,
            f"search_estimate must be one of {SEARCH_ESTIMATES}, got {self.search_estimate!r}",
        )
        require(
            self.search_max_shift is None
            or (math.isfinite(self.search_max_shift) and self.search_max_shift >= 0),
            f"search max shift must be >= 0 Å (or None: 3 pixels), got {self.search_max_shift}",
        )
        require(
            self.pose_prior_deg is None
            or (math.isfinite(self.pose_prior_deg) and self.pose_prior_deg > 0),
            f"pose prior (rms rotation error of the starting poses) must be > 0 degrees or "
            f"None, got {self.pose_prior_deg}",
        )
        require(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        check_kernel(self.kernel)
        padded_size(8, self.pad)
        for stage in self.resolved_stages():
            stage.validate(self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stages as a list of dicts, the resolved schedule)."""
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.resolved_stages()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MFNFitConfig:
        """Rebuild from :meth:`to_dict`."""
        d = dict(d)
        if d.get("stages") is not None:
            d["stages"] = tuple(Stage(**s) for s in d["stages"])
        return cls(**d)


def make_network(config: MFNFitConfig, box: int) -> MultiplicativeFilterNetwork:
    """The network of ``config`` for a ``box``-voxel map (band up to Nyquist, box/2)."""
    common = {
        "in_features": 3,
        "out_features": 1,
        "hidden_features": config.hidden_features,
        "num_layers": config.num_layers,
        "box_size": box,
        "max_frequency": config.max_band * box / 2,
    }
    fractions = marching_fractions(config.num_layers, config.spread, config.offset)
    if config.network == "bacon":
        spec = {"name": "bacon", **common, "band_fractions": fractions, "quantize": False}
    else:
        init = "marching" if config.init == "default" else config.init
        spec = {
            "name": "residual_mfn",
            **common,
            "spread": config.spread,
            "offset": config.offset,
            "init": init,
            "base_output": config.base_output,
        }
    return build_network(spec)


# ---------------------------------------------------------------------------------------
# the fitted map in a reference frame


def render_aligned(
    net: MultiplicativeFilterNetwork,
    box: int,
    pixel_size: float,
    amplitude: float,
    rotation: torch.Tensor | None = None,
    translation: torch.Tensor | None = None,
    scale: int | None = None,
) -> torch.Tensor:
    """The fitted map (D, D, D) moved into a reference frame: a · y(Aᵀ(r - c)).

    ``rotation`` A and ``translation`` c (Å) as returned by
    :func:`cryoprior.solvers.poses.global_alignment`;
    None renders the map in its own frame. Exact (the network is evaluated at the moved
    coordinates).
    """
    ref = net.filters[0].frequency
    shift = None
    if translation is not None:
        shift = torch.as_tensor(translation, dtype=ref.dtype) / (box * pixel_size)
    rot = None if rotation is None else torch.as_tensor(rotation, dtype=ref.dtype)
    with torch.no_grad():
        return amplitude * render_grid(net, box, scale=scale, rotation=rot, shift=shift)


# ---------------------------------------------------------------------------------------
# the forward model on a stage's working grid


@dataclass(frozen=True)
class WorkingGrid:
    """A stage's working grid: the same physical box sampled by D' ≤ D voxels.

    full: the data's box D; box: D', where maps are projected; render_box: where the
    network is evaluated (its Nyquist exceeds the network output's band, so sampling does
    not alias; the map is then Fourier-cropped to D'); pixel_size: Å/px of the working grid
    (p·D/D'); band: the loss band in cycles per box; mask: (D', D') bool, the centred
    frequencies with |k| ≤ band; spectral_scale: (D/D')³, which makes spectra of D'-grid
    projections comparable with the D-grid images' spectra.
    """

    full: int
    box: int
    render_box: int
    pixel_size: float
    band: float  # cycles per box
    mask: torch.Tensor  # (D', D') bool: |k| <= band
    spectral_scale: float  # (D / D')^3


def working_grid(full: int, pixel_size: float, band: float, net_band: float) -> WorkingGrid:
    """The working grid of a stage: projections on D' = 2⌈band⌉ + 2 (at most D), whose
    Nyquist exceeds the loss band, and the network rendered on a grid whose Nyquist exceeds
    the output's band ``net_band`` (cycles per box), so neither aliases."""
    box = band_box(full, band)
    render_box = max(box, band_box(full, net_band))
    k = frequency_grid((box, box), 1.0 / box, torch.float64).norm(dim=-1)  # cycles/box
    return WorkingGrid(
        full=full,
        box=box,
        render_box=render_box,
        pixel_size=pixel_size * full / box,
        band=band,
        mask=k <= band + 1e-9,
        spectral_scale=(full / box) ** 3,
    )


def fourier_crop(volume: torch.Tensor, box: int) -> torch.Tensor:
    """A (D, D, D) map resampled on a coarser (box,)*3 grid of the same physical box by
    cropping its centred spectrum (voxel values kept: scaled by (box/D)³)."""
    size = volume.shape[-1]
    if box == size:
        return volume
    spectrum = crop_centred(fft3_c(volume), box, 3) * (box / size) ** 3
    return ifft3_c(spectrum).real.to(volume.dtype)


def render_volume(
    net: MultiplicativeFilterNetwork, grid: WorkingGrid, amplitude: float, scale: int
) -> torch.Tensor:
    """Output ``scale`` of the network times ``amplitude`` on the working grid (D'³):
    rendered on ``grid.render_box`` and Fourier-cropped to D'. Differentiable."""
    volume = amplitude * render_grid(net, grid.render_box, scale=scale)
    return fourier_crop(volume, grid.box)


def data_spectra(images: torch.Tensor, grid: WorkingGrid) -> torch.Tensor:
    """Observed spectra in the band, (B, n_mask) complex: the centred 2-D FTs of the (B, D, D)
    images, cropped to the working grid's D' × D' frequencies and masked to the band."""
    spec = crop_centred(fft2_c(images), grid.box, 2)
    return spec[:, grid.mask]


def model_spectra(
    projector: Projector,
    rotations: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    ctf_padded: torch.Tensor | None,
    grid: WorkingGrid,
) -> torch.Tensor:
    """Model spectra in the band (B, n_mask), comparable with :func:`data_spectra`.

    ``projector`` holds the map sampled on the working grid (D'³, voxel values as on the
    full grid). Slices of its padded FT at poses ``rotations`` are multiplied by
    ``ctf_padded`` (the CTFs on the padded working grid, or None), moved so the particle
    centre sits at -``shifts_angstrom`` (RELION origins, Å), cropped to D' × D', Fourier
    transformed, masked to the band and scaled by (D/D')³: the simulator's images
    (:class:`cryoprior.physics.simulator.ParticleRenderer`) low-passed to the band.
    """
    spec = projector.project_ft(rotations)
    if ctf_padded is not None:
        spec = spec * ctf_padded
    spec = shift_spectra(spec, -shifts_angstrom / grid.pixel_size)
    images = projector.images_from_ft(spec)
    return fft2_c(images)[:, grid.mask] * grid.spectral_scale


# ---------------------------------------------------------------------------------------
# results


@dataclass
class StageResult:
    """What one stage produced: its map (D, D, D), the poses after it, the network state.

    band: the loss band as a fraction of Nyquist; outputs: the network stage; losses: the
    mean relative loss of every batch (network steps); seconds: wall time of the stage.
    """

    index: int
    band: float
    outputs: int
    map: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor
    network_state: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float


@dataclass
class MFNFitResult:
    """The fit: final map (D, D, D) in the source's pixel size, poses, per-stage results.

    rotations (N, 3, 3) float64 and shifts (N, 2) float64 (RELION origins, Å) are the
    refined poses; initial_rotations / initial_shifts what the fit started from;
    initial_map the Wiener back-projection from the initial poses; network/amplitude give
    the map as a function (:func:`render_aligned`); resumed says whether a checkpoint was
    continued; finished is False when ``max_steps`` stopped the run early.
    """

    map: torch.Tensor
    pixel_size: float
    rotations: torch.Tensor
    shifts: torch.Tensor
    initial_rotations: torch.Tensor
    initial_shifts: torch.Tensor
    initial_map: torch.Tensor
    stages: list[StageResult]
    network: MultiplicativeFilterNetwork
    amplitude: float
    config: MFNFitConfig
    resumed: bool
    finished: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# the fit


class _PoseState:
    """Per-particle pose parameters: δ (N, 3) radians, microscope frame; s (N, 2) Å."""

    def __init__(self, rotations: torch.Tensor, shifts: torch.Tensor) -> None:
        self.base = rotations.to(torch.float64)
        self.delta = torch.zeros(rotations.shape[0], 3, dtype=torch.float64)
        self.shifts = shifts.to(torch.float64).clone()

    def rotations(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base if idx is None else self.base[idx]
        delta = self.delta if idx is None else self.delta[idx]
        return axis_angle_to_matrix(delta) @ base


def _batch_indices(seed: int, stage: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Positions [step·B, (step+1)·B) of the concatenated per-epoch permutations."""
    start = step * batch
    parts, have = [], 0
    epoch = start // n
    offset = start - epoch * n
    while have < batch:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + stage * 10_007 + epoch)
        perm = torch.randperm(n, generator=g)[offset:]
        parts.append(perm[: batch - have])
        have += parts[-1].shape[0]
        epoch, offset = epoch + 1, 0
    return torch.cat(parts)


def _stage_band(stage: Stage, net: MultiplicativeFilterNetwork, box: int) -> float:
    """The loss band of a stage in cycles per box."""
    nyquist = box / 2
    if stage.band is None:
        return min(float(net.bands[stage.outputs - 1]), nyquist)
    return float(stage.band) * nyquist


def _initial_map(
    source: ParticleSource, rotations: torch.Tensor, shifts: torch.Tensor, config: MFNFitConfig
) -> torch.Tensor:
    """Wiener back-projection (FSC-based SSNR) from the initial poses."""
    from cryoprior.solvers.backprojection import reconstruct_source

    particles = replace(
        source.particles,
        angles=matrix_to_euler(rotations).numpy(),
        shifts=shifts.numpy(),
        has_poses=True,
    )
    start = ParticleSource(particles, check=False)
    return reconstruct_source(
        start, pad=config.pad, seed=config.seed, batch_size=max(config.batch_size, 256)
    ).full.to(torch.float32)


def _warm_start(
    net: MultiplicativeFilterNetwork,
    target: torch.Tensor,
    amplitude: float,
    grid: WorkingGrid,
    k: int,
    steps: int,
    lr: float,
) -> None:
    """Fit output k to ``target`` low-passed to the grid's band, on the working grid."""
    if steps == 0:
        return
    f = frequency_grid((grid.box,) * 3, 1.0 / grid.box, torch.float64).norm(dim=-1)
    mask = f <= grid.band + 1e-9
    want = crop_centred(fft3_c(target.to(torch.float32)), grid.box, 3)[mask]
    want = want * (grid.box / grid.full) ** 3 / amplitude
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    norm = float((want.abs() ** 2).sum())
    for _ in range(steps):
        opt.zero_grad()
        got = fft3_c(render_volume(net, grid, 1.0, k))[mask]
        loss = ((got - want).abs() ** 2).sum() / norm
        loss.backward()
        opt.step()


def _adam_pose_steps(
    projector: Projector,
    poses: _PoseState,
    idx: torch.Tensor,
    data: torch.Tensor,
    ctf: torch.Tensor | None,
    grid: WorkingGrid,
    config: MFNFitConfig,
    rotations: bool = True,
) -> None:
    """``pose_steps`` Adam steps on the batch's poses (fresh moments), map fixed.

    The step sizes are ``pose_lr_deg`` and ``pose_lr_angstrom`` divided by the stage's band
    as a fraction of Nyquist (coarse stages take proportionally larger steps). Each
    particle keeps the pose with the lowest loss met along the way, and only if it beats
    the starting loss L₀ by ``pose_accept`` · p · L₀ / m (p parameters, m masked Fourier
    coefficients; L₀/m estimates the noise power per coefficient, and fitting p parameters
    to pure noise removes about p times that), so a visit never increases its image's
    misfit for the current map and, with ``pose_accept`` > 0, ignores moves that noise
    alone would explain.
    """
    delta = poses.delta[idx].to(torch.float32).clone().requires_grad_(rotations)
    shifts = poses.shifts[idx].to(torch.float32).clone().requires_grad_(config.refine_shifts)
    base = poses.base[idx].to(torch.float32)
    params = [p for p in (delta, shifts) if p.requires_grad]
    scale = grid.full / (2 * grid.band)  # steps grow with the stage's resolution: 1/band
    lr = {
        id(delta): math.radians(config.pose_lr_deg) * scale,
        id(shifts): config.pose_lr_angstrom * scale,
    }
    b1, b2, eps = 0.9, 0.9, 1e-12  # betas as in the authors' pose optimiser
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    best_loss = torch.full((idx.shape[0],), math.inf)
    best_delta, best_shifts = delta.detach().clone(), shifts.detach().clone()
    start_loss = best_loss
    for t in range(config.pose_steps + 1):
        model = model_spectra(projector, axis_angle_to_matrix(delta) @ base, shifts, ctf, grid)
        per_image = ((model - data).abs() ** 2).sum(-1)
        with torch.no_grad():
            if t == 0:
                # a move must beat the misfit that fitting noise alone would remove:
                # about (loss / n_coefficients) per parameter (see the docstring)
                n_params = sum(p.shape[-1] for p in params)
                start_loss = per_image - config.pose_accept * n_params * per_image / data.shape[-1]
            else:
                better = per_image < best_loss
                best_loss = torch.where(better, per_image, best_loss)
                best_delta[better] = delta[better]
                best_shifts[better] = shifts[better]
        if t == config.pose_steps:
            break
        grads = torch.autograd.grad(per_image.sum(), params)
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                mi.mul_(b1).add_(g, alpha=1 - b1)
                vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = (mi / (1 - b1 ** (t + 1))) / ((vi / (1 - b2 ** (t + 1))).sqrt() + eps)
                p.sub_(lr[id(p)] * step)
    accept = best_loss < start_loss
    poses.delta[idx[accept]] = best_delta[accept].to(torch.float64)
    poses.shifts[idx[accept]] = best_shifts[accept].to(torch.float64)


# ---------------------------------------------------------------------------------------
# local exhaustive pose search


class BandSearchModel(BandModel):
    """Model spectra of many candidate poses on a working grid's band, for the pose search.

    A :class:`~cryoprior.solvers.poses.BandModel` on the working grid: the projector's
    padded 3-D FT (its ``"linear"`` kernel's gridding correction matches the trilinear
    sampling) sliced at the half-band frequencies of D' (a
    :class:`~cryoprior.solvers.poses.ReferenceProjector` with scale (D/D')³), times the
    effective CTF, times the phase of the shift. The effective CTF is the FT of the CTF's
    point-spread function cropped to the D' box (the padded-grid CTF, inverse transformed,
    cropped, transformed): :func:`model_spectra` crops the CTF-modulated projection to the
    box after the shift, which for a particle at the centre is this. It is
    :func:`model_spectra` up to the part of the CTF's delocalisation that an off-centre
    particle moves across the box edge, at a fraction of its cost (no per-candidate FFTs,
    only the band's frequencies). Relative error against :func:`model_spectra` (1fki,
    64² at 1.5 Å/px, defocus 1-2.5 µm): 3% at band 0.18 × Nyquist, 6% at 0.3, 21% at 0.6,
    27% at 1 (correlations 0.9995, 0.998, 0.978, 0.965); it ranks candidates, and the
    fit's own model decides whether a particle moves (:func:`_search_pose_steps`).
    """

    def __init__(self, projector: Projector, grid: WorkingGrid, ctf: torch.Tensor | None) -> None:
        require(projector.kernel == "linear", "the pose search needs a trilinear projector")
        length = grid.box * grid.pixel_size  # Å
        reference = ReferenceProjector(
            projector.volume_ft, grid.box, grid.band, length, grid.spectral_scale
        )
        effective = None  # (B, n): the effective CTFs of the batch on the half band
        if ctf is not None:
            psf = crop_centred(ifft2_c(ctf.to(torch.complex64)), grid.box, 2)
            effective = fft2_c(psf)[:, reference.plane]
        super().__init__(reference, effective)
        self.select = reference.half_of_band  # entries of data_spectra on the half plane

    def half(self, data: torch.Tensor) -> torch.Tensor:
        """The half-plane entries (B, n) of band spectra (B, n_mask) (:func:`data_spectra`)."""
        return data[:, self.select]


def search_grid(
    config: MFNFitConfig,
    grid: WorkingGrid,
    scale: float = 1.0,
    rotations: bool = True,
    refine: bool = False,
) -> SearchGrid:
    """The :class:`SearchGrid` of ``config`` on a working grid: radius and step (degrees in
    the config, radians here) times ``scale``; the shift lattice spacing L/(4 b) Å (L the
    box length in Å, b the band in cycles per box: a quarter period at the band edge);
    max shift ``search_max_shift`` Å (None: 3 pixels of the data; 0 without
    ``refine_shifts``). ``rotations`` False searches shifts only."""
    length = grid.box * grid.pixel_size
    max_shift = (
        3 * length / grid.full if config.search_max_shift is None else config.search_max_shift
    )
    step = math.radians(config.search_step_deg) * scale
    radius = config.search_refine_steps * step if refine else math.radians(config.search_radius_deg)
    return SearchGrid(
        radius=radius if rotations else 0.0,
        step=step,
        levels=config.search_levels,
        max_shift=max_shift if config.refine_shifts else 0.0,
        shift_step=length / (4 * grid.band),
    )


def _search_pose_steps(
    projector: Projector,
    volume: torch.Tensor,
    poses: _PoseState,
    idx: torch.Tensor,
    data: torch.Tensor,
    ctf: torch.Tensor | None,
    grid: WorkingGrid,
    search: SearchGrid,
    estimate: str = "mean",
    prior_deg: float | None = None,
) -> None:
    """Local exhaustive search (:func:`~cryoprior.solvers.poses.lattice_search`) for the
    batch's poses, map fixed.

    ``projector`` holds ``volume`` (the map on the working grid); ``data`` are the batch's
    band spectra (:func:`data_spectra`) and ``ctf`` its CTFs on the padded working grid (or
    None). ``estimate`` ``"mean"`` takes the posterior mean with the noise power σ² of
    each image estimated as its misfit per Fourier coefficient at the current pose (noise
    plus what the map does not yet explain, so an imperfect map gives a broader
    posterior), ``"best"`` the lowest-misfit candidate. A particle moves to the pose
    the search found only if its loss under the fit's forward model
    (:func:`model_spectra`, which the search approximates) is lower there, so a visit never
    increases its image's misfit for the current map. With ``prior_deg`` (the rms rotation
    error of the starting poses ``poses.base``) the search weighs candidates by a Gaussian
    prior on the rotation away from the start (:class:`PosePrior`, σ = prior_deg/√3 per
    axis) and a particle moves only if its posterior rises (misfit / 2σ²_noise + −log
    prior falls).
    """
    linear = projector
    if projector.kernel != "linear":  # the search samples trilinearly
        linear = Projector(volume, projector.padded_size / projector.size, "linear")
    model = BandSearchModel(linear, grid, ctf)
    rot = poses.rotations(idx)
    shifts = poses.shifts[idx]
    with torch.no_grad():
        before = model_spectra(projector, rot.float(), shifts.float(), ctf, grid)
    loss = ((before - data).abs() ** 2).sum(-1)
    noise, prior = None, None
    if estimate == "mean" or prior_deg is not None:
        noise = (loss / data.shape[-1]).clamp_min(1e-6 * float((data.abs() ** 2).mean()))
    if prior_deg is not None:
        prior = PosePrior(poses.base[idx], math.radians(prior_deg) / math.sqrt(3.0))
    new_rot, new_shifts, _ = lattice_search(
        model, model.half(data), rot, shifts, search, noise, prior, estimate
    )
    with torch.no_grad():
        after = model_spectra(projector, new_rot.float(), new_shifts.float(), ctf, grid)
    new_loss = ((after - data).abs() ** 2).sum(-1)
    if prior is None:
        accept = new_loss < loss
    else:  # compare −log posteriors, in units of loss
        scale = 2 * noise.to(torch.float64)
        accept = new_loss + scale * prior.penalty(new_rot) < loss + scale * prior.penalty(rot)
    moved = idx[accept]
    poses.delta[moved] = rotation_log(new_rot[accept] @ poses.base[moved].transpose(-1, -2))
    poses.shifts[moved] = new_shifts[accept]


def refine_poses(
    volume: torch.Tensor,
    pixel_size: float,
    images: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    ctf: CTFParams | None = None,
    band: float = 1.0,
    visits: int = 1,
    config: MFNFitConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine poses of ``images`` against a fixed map, as the fit's pose steps do.

    ``volume`` (D, D, D) and ``images`` (N, D, D) share the pixel size (Å/px); rotations
    (N, 3, 3) and shifts (N, 2) (RELION origins, Å) are the starting poses; ``band`` the
    low-pass as a fraction of Nyquist. Each of ``visits`` passes runs, per batch of
    ``config.batch_size``, the local search of ``config`` (when ``pose_search`` is
    ``"local"``; radius and step as in the config, :func:`search_grid`), then
    ``config.pose_steps`` Adam steps (see :func:`fit_mfn`). Returns the refined (N, 3, 3)
    rotations and (N, 2) shifts, float64.
    """
    config = config or MFNFitConfig()
    config.validate()
    d = volume.shape[-1]
    require(
        images.ndim == 3 and images.shape[-2:] == (d, d),
        f"images must be (N, {d}, {d}) like the map, got {tuple(images.shape)}",
    )
    require(0 < band <= 1, f"band must be a fraction of Nyquist in (0, 1], got {band}")
    grid = working_grid(d, pixel_size, band * d / 2, band * d / 2)
    cropped = fourier_crop(volume.to(torch.float32), grid.box)
    projector = Projector(cropped, config.pad, config.kernel)
    poses = _PoseState(torch.as_tensor(rotations), torch.as_tensor(shifts))
    dp = padded_size(grid.box, config.pad)
    for _ in range(visits):
        for start in range(0, images.shape[0], config.batch_size):
            idx = torch.arange(start, min(images.shape[0], start + config.batch_size))
            data = data_spectra(images[idx].to(torch.float32), grid)
            batch_ctf = None
            if ctf is not None:
                batch_ctf = compute_ctf(ctf.index(idx), (dp, dp), grid.pixel_size)
            if config.pose_search == "local":
                search = search_grid(config, grid)
                _search_pose_steps(
                    projector,
                    cropped,
                    poses,
                    idx,
                    data,
                    batch_ctf,
                    grid,
                    search,
                    config.search_estimate,
                    config.pose_prior_deg,
                )
            if config.pose_steps > 0:
                _adam_pose_steps(projector, poses, idx, data, batch_ctf, grid, config)
    return poses.rotations(), poses.shifts.clone()


class _Fit:
    """The state of one fit (network, optimiser, poses, stage results) and its steps."""

    def __init__(
        self,
        source: ParticleSource,
        config: MFNFitConfig,
        rotations: torch.Tensor,
        shifts: torch.Tensor,
        out_dir: Path | None,
    ) -> None:
        self.source, self.config, self.out_dir = source, config, out_dir
        self.n, self.box, self.px = len(source), source.box, source.pixel_size
        self.stages = config.resolved_stages()
        self.fingerprint = float(
            rotations.sum() + (rotations[:, 0, :] * torch.arange(1, 4)).sum() + shifts.sum()
        )
        seed_everything(config.seed)
        self.net = make_network(config, self.box)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.poses = _PoseState(rotations, shifts)
        self.initial_shifts = shifts.to(torch.float64).clone()
        self.amplitude = 1.0
        self.initial_map = torch.zeros(0)
        self.stage_index, self.step_in_stage = 0, 0
        self.stages_done: list[StageResult] = []
        self.losses: list[float] = []
        self.history: list[dict[str, float]] = []
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.stage_started = self.started

    @property
    def checkpoint(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def n_steps(self, stage: Stage) -> int:
        return max(1, math.ceil(stage.epochs * self.n / self.config.batch_size))

    def grid(self, stage: Stage) -> WorkingGrid:
        self.net.set_stage(stage.outputs)
        band = _stage_band(stage, self.net, self.box)
        return working_grid(self.box, self.px, band, float(self.net.bands[stage.outputs - 1]))

    def pose_mode(self, stage: Stage) -> str:
        """What a stage does to the poses: search, adam, shifts (searched too when the
        config searches) or fixed."""
        if stage.poses == "all":
            return "search" if self.config.pose_search == "local" else "adam"
        return stage.poses

    def search(self, stage: Stage, grid: WorkingGrid) -> SearchGrid | None:
        """The stage's local search (None: none). Radius and step are the config's at the
        first searching stage, scaled by (its band / this stage's band) at later ones."""
        mode = self.pose_mode(stage)
        if mode == "shifts" and self.config.pose_search == "local" and self.config.refine_shifts:
            return search_grid(self.config, grid, rotations=False)
        if mode != "search":
            return None
        first = next(i for i, s in enumerate(self.stages) if self.pose_mode(s) == "search")
        scale = min(1.0, _stage_band(self.stages[first], self.net, self.box) / grid.band)
        return search_grid(self.config, grid, scale, refine=self.stage_index != first)

    # -- start: fresh or from a checkpoint

    def initialise(self) -> None:
        """Initial map from the initial poses, output scale, warm start of output k_1."""
        self.initial_map = _initial_map(
            self.source, self.poses.base, self.poses.shifts, self.config
        )
        self.amplitude = float(self.initial_map.std()) or 1.0
        first = self.stages[0]
        _warm_start(
            self.net,
            self.initial_map,
            self.amplitude,
            self.grid(first),
            first.outputs,
            self.config.warm_start_steps,
            self.config.lr,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "n_particles": self.n,
            "box": self.box,
            "fingerprint": self.fingerprint,
            "network": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "amplitude": self.amplitude,
            "initial_map": self.initial_map,
            "delta": self.poses.delta,
            "shifts": self.poses.shifts,
            "stage": self.stage_index,
            "step": self.step_in_stage,
            "stages_done": [asdict(s) for s in self.stages_done],
            "losses": list(self.losses),
            "history": list(self.history),
            "elapsed": self.elapsed(),
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def save(self) -> None:
        if self.checkpoint is None:
            return
        with atomic_path(self.checkpoint) as tmp:
            torch.save(self.state_dict(), tmp)

    def load(self) -> None:
        path = self.checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"checkpoint {path} cannot be read ({e}); delete it to restart") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not an MFN fit checkpoint")
        saved, now = state["config"], self.config.to_dict()
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise InputError(
                f"cannot resume {path}: it was written with different settings "
                f"({', '.join(diff)}); resume with the same options or use a new output folder"
            )
        same_poses = abs(state["fingerprint"] - self.fingerprint) <= 1e-6 * max(
            1.0, abs(self.fingerprint)
        )
        if state["n_particles"] != self.n or state["box"] != self.box or not same_poses:
            raise InputError(
                f"cannot resume {path}: it was written for a different particle set or "
                "initial poses; use a new output folder"
            )
        self.stage_index, self.step_in_stage = int(state["stage"]), int(state["step"])
        self.net.set_stage(self.stages[min(self.stage_index, len(self.stages) - 1)].outputs)
        self.net.load_state_dict(state["network"])
        self.opt.load_state_dict(state["optimizer"])
        self.amplitude = float(state["amplitude"])
        self.initial_map = state["initial_map"]
        self.poses.delta = state["delta"]
        self.poses.shifts = state["shifts"]
        self.stages_done = [StageResult(**s) for s in state["stages_done"]]
        self.losses = list(state["losses"])
        self.history = list(state["history"])
        self.elapsed_before = float(state["elapsed"])

    # -- one batch

    def step(self, stage: Stage, grid: WorkingGrid) -> float:
        """Network steps, then pose steps, on the next batch; returns the last loss."""
        config, k = self.config, stage.outputs
        idx = _batch_indices(
            config.seed, self.stage_index, self.step_in_stage, config.batch_size, self.n
        )
        data = data_spectra(read_particle_images(self.source.particles, idx.numpy()), grid)
        power = float((data.abs() ** 2).sum())
        dp = padded_size(grid.box, config.pad)
        ctf = None
        if self.source.ctf is not None:
            ctf = compute_ctf(self.source.ctf.index(idx), (dp, dp), grid.pixel_size)
        rotations = self.poses.rotations(idx).to(torch.float32)
        shifts = self.poses.shifts[idx].to(torch.float32)
        loss_value = float("nan")
        volume = None
        for _ in range(config.net_steps):
            self.opt.zero_grad()
            volume = render_volume(self.net, grid, self.amplitude, k)
            projector = Projector(volume, config.pad, config.kernel)
            model = model_spectra(projector, rotations, shifts, ctf, grid)
            loss = ((model - data).abs() ** 2).sum() / power
            loss.backward()
            self.opt.step()
            loss_value = float(loss.detach())
        mode = self.pose_mode(stage)
        search = self.search(stage, grid)
        if mode != "fixed" and (config.pose_steps > 0 or search is not None):
            # the map the last network step started from (rendering is the costliest part
            # of a step; with net_steps = 0 the current map)
            with torch.no_grad():
                if volume is None:
                    volume = render_volume(self.net, grid, self.amplitude, k)
                volume = volume.detach()
                projector = Projector(volume, config.pad, config.kernel)
            if search is not None:
                _search_pose_steps(
                    projector,
                    volume,
                    self.poses,
                    idx,
                    data,
                    ctf,
                    grid,
                    search,
                    config.search_estimate,
                    config.pose_prior_deg,
                )
            if config.pose_steps > 0:
                _adam_pose_steps(
                    projector, self.poses, idx, data, ctf, grid, config, mode != "shifts"
                )
        self.losses.append(loss_value)
        self.step_in_stage += 1
        return loss_value

    def finish_stage(self, stage: Stage, grid: WorkingGrid) -> None:
        """Record the stage's map, poses and network; write stage{j}.mrc."""
        with torch.no_grad():
            stage_map = self.amplitude * render_grid(self.net, self.box, scale=stage.outputs)
        band = grid.band / (self.box / 2)
        result = StageResult(
            index=self.stage_index,
            band=band,
            outputs=stage.outputs,
            map=stage_map,
            rotations=self.poses.rotations().clone(),
            shifts=self.poses.shifts.clone(),
            network_state={name: t.clone() for name, t in self.net.state_dict().items()},
            losses=list(self.losses),
            seconds=time.perf_counter() - self.stage_started,
        )
        self.stages_done.append(result)
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        self.history.append(
            {
                "stage": self.stage_index + 1,
                "band_fraction": band,
                "resolution_angstrom": 2 * self.px / band,
                "outputs": stage.outputs,
                "working_box": grid.box,
                "batches": len(self.losses),
                "final_loss": float(np.mean(tail)) if tail else float("nan"),
                "seconds": result.seconds,
            }
        )
        if self.out_dir is not None:
            from cryoprior.io.mrc import write_map

            write_map(self.out_dir / f"stage{self.stage_index + 1}.mrc", Volume(stage_map, self.px))
        self.losses = []
        self.stage_index += 1
        self.step_in_stage = 0
        self.stage_started = time.perf_counter()

    # -- the schedule

    def run(self, max_steps: int | None, show_progress: bool) -> bool:
        """Run the remaining schedule; returns False when stopped by ``max_steps``."""
        steps = [self.n_steps(s) for s in self.stages]
        done = sum(steps[: self.stage_index]) + self.step_in_stage
        bar = progress(
            range(sum(steps) - done), total=sum(steps) - done, desc="mfn", enabled=show_progress
        )
        budget = math.inf if max_steps is None else max_steps
        while self.stage_index < len(self.stages):
            stage = self.stages[self.stage_index]
            grid = self.grid(stage)
            while self.step_in_stage < steps[self.stage_index]:
                if budget <= 0:
                    self.save()
                    if hasattr(bar, "close"):
                        bar.close()
                    return False
                loss = self.step(stage, grid)
                budget -= 1
                if hasattr(bar, "update"):
                    bar.update(1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(stage=self.stage_index + 1, loss=f"{loss:.4f}")
                if self.step_in_stage % self.config.checkpoint_every == 0:
                    self.save()
            self.finish_stage(stage, grid)
            self.save()
        if hasattr(bar, "close"):
            bar.close()
        return True

    def result(self, finished: bool, resumed: bool) -> MFNFitResult:
        k = self.stages[max(0, min(self.stage_index, len(self.stages)) - 1)].outputs
        self.net.set_stage(k)
        with torch.no_grad():
            final = self.amplitude * render_grid(self.net, self.box)
        return MFNFitResult(
            map=final,
            pixel_size=self.px,
            rotations=self.poses.rotations(),
            shifts=self.poses.shifts.clone(),
            initial_rotations=self.poses.base,
            initial_shifts=self.initial_shifts,
            initial_map=self.initial_map,
            stages=self.stages_done,
            network=self.net,
            amplitude=self.amplitude,
            config=self.config,
            resumed=resumed,
            finished=finished,
            seconds=self.elapsed(),
            history=self.history,
        )


def fit_mfn(
    source: ParticleSource,
    config: MFNFitConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    initial_rotations: torch.Tensor | None = None,
    initial_shifts: torch.Tensor | np.ndarray | None = None,
    max_steps: int | None = None,
) -> MFNFitResult:
    """Fit an MFN map to a particle set with staged coarse-to-fine training and pose refinement.

    Args:
        source: the particles (images, CTFs; its poses are the initial poses unless given).
        config: network, schedule and optimiser settings (:class:`MFNFitConfig`).
        out_dir: folder for ``checkpoint.pt`` and ``stage{j}.mrc``; None writes nothing.
        resume: continue from ``out_dir/checkpoint.pt`` (the config, particle count and
            initial poses must match). Without it a folder holding a checkpoint is refused.
        show_progress: a progress bar over all batches.
        initial_rotations / initial_shifts: (N, 3, 3) poses and (N, 2) RELION origins (Å)
            to start from instead of the STAR file's (e.g. from
            :func:`cryoprior.solvers.poses.perturb_poses`).
        max_steps: stop after this many batches in this call (a checkpoint is written);
            a later call with ``resume=True`` continues. None runs to the end.

    Returns:
        :class:`MFNFitResult` (maps in the source's pixel size, poses, per-stage results).
    """
    config.validate()
    n = len(source)
    rot0 = source.rotations if initial_rotations is None else torch.as_tensor(initial_rotations)
    rot0 = rot0.to(torch.float64)
    shifts = source.particles.shifts if initial_shifts is None else initial_shifts
    sh0 = torch.as_tensor(np.asarray(shifts), dtype=torch.float64)
    require(
        rot0.shape == (n, 3, 3), f"initial rotations must be ({n}, 3, 3), got {tuple(rot0.shape)}"
    )
    require(sh0.shape == (n, 2), f"initial shifts must be ({n}, 2) Å, got {tuple(sh0.shape)}")
    require(max_steps is None or max_steps >= 0, "max_steps must be >= 0")
    out = Path(out_dir) if out_dir is not None else None
    fit = _Fit(source, config, rot0, sh0, out)
    if fit.checkpoint is not None and fit.checkpoint.is_file() and not resume:
        raise InputError(
            f"{out} already holds an MFN fit; pass --resume to continue it or choose "
            "another output folder"
        )
    resumed = bool(resume and fit.checkpoint is not None and fit.checkpoint.is_file())
    if resumed:
        fit.load()
    else:
        fit.initialise()
    finished = fit.run(max_steps, show_progress)
    return fit.result(finished, resumed)


def network_summary(result: MFNFitResult) -> dict[str, Any]:
    """The network's config (JSON) and bands in cycles/Å, for reports."""
    box = result.map.shape[-1]
    return {
        "network": network_config(result.network),
        "bands_per_angstrom": [b / (box * result.pixel_size) for b in result.network.bands],
    }


__all__ = [
    "BandSearchModel",
    "MFNFitConfig",
    "search_grid",
    "MFNFitResult",
    "Stage",
    "StageResult",
    "fit_mfn",
    "format_stages",
    "make_network",
    "network_summary",
    "parse_stages",
    "WorkingGrid",
    "data_spectra",
    "fourier_crop",
    "render_volume",
    "model_spectra",
    "refine_poses",
    "render_aligned",
    "working_grid",
]
