"""The configuration of an MFN fit: the coarse-to-fine stage schedule and the fit's settings.

A schedule is a sequence of :class:`Stage` (band, epochs, network outputs, what happens to
the poses), written on the command line as ``BAND:EPOCHS:OUTPUTS[:POSES]`` items
(:func:`parse_stages`, :func:`format_stages`). :class:`MFNFitConfig` holds everything that
defines a fit, validates it and round-trips through JSON (saved with every checkpoint);
:func:`make_network` builds its network. The fit itself is
:func:`cryoprior.solvers.mfn_fit.fit_mfn`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.networks.mfn import MultiplicativeFilterNetwork, marching_fractions
from cryoprior.networks.registry import build_network
from cryoprior.physics.fourier_slice import check_kernel
from cryoprior.physics.projection import padded_size

NETWORKS = ("bacon", "residual_mfn")
INITS = ("default", "marching", "bacon")
POSE_MODES = ("all", "search", "adam", "shifts", "fixed")
POSE_SEARCHES = ("local", "adam")
SEARCH_ESTIMATES = ("mean", "best")


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


__all__ = [
    "INITS",
    "MFNFitConfig",
    "NETWORKS",
    "POSE_MODES",
    "POSE_SEARCHES",
    "SEARCH_ESTIMATES",
    "Stage",
    "format_stages",
    "make_network",
    "parse_stages",
]
