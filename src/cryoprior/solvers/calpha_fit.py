"""Cα clouds from particle images at known poses: likelihood fitting without a prior and
posterior sampling with the Cα EGNN diffusion prior (issue 4).

Measurement model. A segment of N residues is N Cα positions r_n (Å, box frame: origin at
index D//2). Each residue is an isotropic Gaussian blob of standard deviation σ (Å) and
integral a (the per-residue amplitude, unknown, equal for all residues); an image is the
exact line integral of the blobs along z after the pose R_k, then the CTF (on the padded
grid, as the particle simulator renders particles) and the known in-plane shift
(:class:`~cryoprior.physics.operators.CalphaProjectionOperator`, images in the voxel units
of :class:`~cryoprior.physics.operators.ProjectionCTFOperator`), plus white Gaussian
noise: y_k = a · A_k(r) + n_k, n_k ~ N(0, s² I), with the SNR convention of DESIGN.md
(var(noiseless CTF image) / s², over the whole box).

σ = 2 Å (:data:`DEFAULT_SIGMA`) by default: a residue's scattering mass (backbone plus
side chain) spread about its Cα, a blob of full width at half maximum 2.355 σ ≈ 4.7 Å,
i.e. a map of about 5 Å resolution; consecutive Cα (3.8 Å apart) overlap but stay
separable. Larger σ smooths the likelihood (easier fitting) but blurs neighbours together.

Amplitude a, never from the truth (``amplitude=``):

- ``"profile"`` (default): a is maximised out of the likelihood. For coordinates r the best
  amplitude is the least-squares a*(r) = max(⟨y, A(r)⟩, 0)/‖A(r)‖² (A with unit amplitude;
  a ≥ 0, as a scattering potential is positive), and the profile misfit is
  ‖y − a*(r) A(r)‖². By the envelope theorem its gradient in r is that of ‖y − a A(r)‖² at
  a = a*(r) held fixed, so a* is computed without a graph
  (:class:`ProfiledAmplitudeOperator`). It uses every pixel and never fails, but where the
  coordinates fit part of the noise it comes out high (measured at SNR 0.1 on 64-residue
  segments: ×1.1–1.3 with the prior, ×1.2–1.6 without, K = 10 … 1).
- ``"dc"``: from the images' DC terms, a = ∫V d³r / N
  (:func:`~cryoprior.physics.measurement.estimate_map_integral`, CTF(0) included). The DC
  term carries only the amplitude-contrast part of the CTF (CTF(0) ≈ 0.1), so with a few
  noisy images this estimate is noisy (measured ×1.04 at K = 10, ×1.5 at K = 3, ×3 at
  K = 1, SNR 0.1; it can even come out negative: then an InputError says so) and the CTF
  fringes lost outside a small box bias it; :func:`estimate_amplitude`.
- a number: that amplitude.

Fitting without a prior (:func:`fit_calpha_no_prior`): maximum likelihood over the N × 3
coordinates (N known from the sequence), from ``n_starts`` random clouds (Gaussian about the
box centre with the radius of gyration of a compact chain of N residues, see
:func:`radius_of_gyration_guess`), by Adam with a cosine-decaying step (Å). The model blob
width is annealed from ``anneal`` · σ down to σ over the first 60 % of the iterations
(a continuation method: the wide blobs' likelihood has fewer local optima; the final
iterations and the selection use the true σ). Coordinates are kept inside the box. The
start with the best final likelihood is returned. Nothing ties neighbouring residues
together, so this is the fit a prior has to beat.

Fitting with the prior (:func:`fit_calpha_with_prior`): posterior samples by
:func:`cryoprior.solvers.dps.dps_sample` with the prior's zero-centre-of-mass EGNN diffusion
(Hoogeboom et al. 2022), nodes beyond N masked out. Coordinates are in the prior's network
units x_net = r / scale (``scale`` from the prior's metadata: the training set's mean Cα
radius of gyration; never from the truth), so the operator seen by the sampler is
x_net ↦ a · A(scale · x_net). The default guidance is ``"dps_x0"``: each step's x̂0 is
moved to argmin ‖y − A(x)‖²/(2s²) + ‖x − x̂0‖²/(2 r_t²) by ``n_inner`` L-BFGS iterations
(the likelihood's proximal step; no back-propagation through the network), with r_t² the
posterior variance of a Gaussian prior of per-coordinate standard deviation ``data_std``
(default: a compact chain of N residues, ``radius_of_gyration_guess(N) / (√3 · scale)``).
``"dps"`` (Chung et al. 2023, Alg. 1) takes the step ζ ∇_{x_t}‖y − A(x̂0(x_t))‖ instead;
ζ (network units) must be tuned: of order 1/‖∂A/∂x_net‖. The noise s comes from the
images' background (:func:`~cryoprior.physics.measurement.estimate_noise_sigma`) unless
given. The zero centre of mass of the prior fixes the segment's centre at the box centre:
the particles must be centred on the segment (the known shifts do that).

The samples are summarised by their mean after matching them to each other: neither the
likelihood (all residues have the same blob) nor the prior (an EGNN without residue-index
features is permutation-equivariant) says which point is which residue, so each sample's
points are assigned to the reference's by the Hungarian algorithm and the sample is
superposed on it (Kabsch); the data fix the absolute frame, so the superposition only
removes the small rigid differences before averaging (:func:`average_clouds`). For the
same reason a reconstruction is compared with the truth by :func:`matched_kabsch_rmsd`
(optimal assignment, then Kabsch RMSD).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.runtime import progress
from cryoprior.core.tensors import expand_like
from cryoprior.diffusion import DenoiserOutput, remove_mean
from cryoprior.geometry.rotations import kabsch
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.fourier_slice import check_rotations
from cryoprior.physics.measurement import estimate_map_integral, estimate_noise_sigma
from cryoprior.physics.noise import add_noise, noise_sigma_for_snr
from cryoprior.physics.operators import (
    CalphaProjectionOperator,
    Operator,
)
from cryoprior.physics.projection import padded_size
from cryoprior.priors import Prior, load_prior
from cryoprior.solvers.dps import dps_sample

#: default blob standard deviation (Å) of a residue (see the module docstring)
DEFAULT_SIGMA = 2.0
AMPLITUDES = ("profile", "dc")


# ---------------------------------------------------------------------------------------
# the measurement


@dataclass(frozen=True)
class CalphaMeasurement:
    """Particle images of one Cα segment at known poses, with what the model needs.

    ``images`` (K, D, D) in the voxel units of the projection operators; ``rotations``
    (K, 3, 3) (r_mic = R r_vol); ``pixel_size`` Å/px; ``sigma`` the blob standard deviation
    (Å); ``ctf`` (K, Dp, Dp) on the padded grid (Dp = round(pad · D), the simulator's model)
    or (K, D, D) (applied on the image grid) or None; ``shifts`` (K, 2) pixels or None.
    """

    images: torch.Tensor
    rotations: torch.Tensor
    pixel_size: float
    sigma: float = DEFAULT_SIGMA
    ctf: torch.Tensor | None = None
    shifts: torch.Tensor | None = None
    pad: float = 2.0

    def __post_init__(self) -> None:
        im = self.images
        require(
            isinstance(im, torch.Tensor)
            and im.ndim == 3
            and im.shape[-1] == im.shape[-2]
            and im.is_floating_point(),
            f"images must be a real (K, D, D) tensor, got {tuple(getattr(im, 'shape', ()))}",
        )
        require(im.shape[0] >= 1 and im.shape[-1] >= 4, "need at least one image of >= 4 px")
        require(bool(torch.isfinite(im).all()), "images contain NaN or infinite values")
        check_rotations(self.rotations)
        require(
            self.rotations.shape[0] == im.shape[0],
            f"got {self.rotations.shape[0]} rotations for {im.shape[0]} images",
        )
        object.__setattr__(self, "pixel_size", require_positive(self.pixel_size, "pixel size"))
        object.__setattr__(self, "sigma", require_positive(self.sigma, "blob sigma (Å)"))
        require(float(self.pad) >= 1.0, f"pad must be >= 1, got {self.pad}")
        if self.ctf is not None:
            dp = padded_size(self.box, self.pad)
            require(
                isinstance(self.ctf, torch.Tensor)
                and self.ctf.ndim == 3
                and self.ctf.shape[0] == im.shape[0]
                and tuple(self.ctf.shape[1:]) in ((dp, dp), (self.box, self.box)),
                f"ctf must have shape ({im.shape[0]}, {dp}, {dp}) (padded grid) or "
                f"({im.shape[0]}, {self.box}, {self.box}), got "
                f"{tuple(getattr(self.ctf, 'shape', ()))}",
            )
        if self.shifts is not None:
            require(
                isinstance(self.shifts, torch.Tensor)
                and tuple(self.shifts.shape) == (im.shape[0], 2),
                f"shifts must have shape ({im.shape[0]}, 2) pixels, got "
                f"{tuple(getattr(self.shifts, 'shape', ()))}",
            )

    @property
    def box(self) -> int:
        """Image side D (px)."""
        return int(self.images.shape[-1])

    @property
    def n_images(self) -> int:
        """K."""
        return int(self.images.shape[0])

    def operator(
        self,
        n_atoms: int,
        amplitude: float = 1.0,
        mask: torch.Tensor | None = None,
        sigma: float | None = None,
    ) -> CalphaProjectionOperator:
        """A(r) for (*batch, n_atoms, 3) clouds in Å, each blob of integral ``amplitude``
        and standard deviation ``sigma`` (default the measurement's)."""
        return CalphaProjectionOperator(
            self.rotations,
            self.box,
            self.pixel_size,
            self.sigma if sigma is None else sigma,
            n_atoms,
            amplitudes=amplitude,
            mask=mask,
            ctf=self.ctf,
            shifts=self.shifts,
            pad=self.pad,
        )

    @property
    def ctf_at_zero(self) -> torch.Tensor:
        """CTF(0) of every image (K,) (ones without a CTF)."""
        return self.operator(1).ctf_at_zero


@dataclass
class SimulatedCalpha:
    """A simulated measurement with its noiseless images and the noise σ used."""

    measurement: CalphaMeasurement
    clean: torch.Tensor
    noise_sigma: float | None


def simulate_calpha_images(
    coords: torch.Tensor,
    rotations: torch.Tensor,
    box: int,
    pixel_size: float,
    snr: float | None,
    *,
    ctf_params: CTFParams | None = None,
    shifts: torch.Tensor | None = None,
    sigma: float = DEFAULT_SIGMA,
    amplitude: float = 1.0,
    pad: float = 2.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> SimulatedCalpha:
    """Particle images of the Cα cloud ``coords`` (N, 3) Å at ``rotations`` (K, 3, 3).

    Blobs of ``sigma`` Å and integral ``amplitude`` each, CTFs from ``ctf_params``
    evaluated on the padded grid (pad · box), ``shifts`` (K, 2) px, then white noise at
    ``snr`` (var(noiseless image)/σ², whole box; None: no noise) from ``generator``.
    """
    require(
        isinstance(coords, torch.Tensor) and coords.ndim == 2 and coords.shape[-1] == 3,
        f"coords must be an (N, 3) tensor in Å, got {tuple(getattr(coords, 'shape', ()))}",
    )
    check_rotations(rotations)
    box = int(box)
    require(box >= 4, f"box must be >= 4 px, got {box}")
    px = require_positive(pixel_size, "pixel size (Å/px)")
    if snr is not None:
        snr = require_positive(snr, "SNR")
    ctf = None
    if ctf_params is not None:
        require(
            len(ctf_params) == rotations.shape[0],
            f"got {len(ctf_params)} CTFs for {rotations.shape[0]} poses",
        )
        dp = padded_size(box, pad)
        ctf = compute_ctf(ctf_params, (dp, dp), px, torch.float64).to(dtype)
    rot = rotations.to(dtype)
    shifts = None if shifts is None else shifts.to(dtype)
    empty = torch.zeros(rotations.shape[0], box, box, dtype=dtype)
    op = CalphaMeasurement(empty, rot, px, sigma, ctf, shifts, pad).operator(
        coords.shape[0], require_positive(amplitude, "amplitude")
    )
    with torch.no_grad():
        clean = op(coords.to(dtype))
    noise_sigma = None
    images = clean
    if snr is not None:
        noise_sigma = noise_sigma_for_snr(clean, snr)
        images = add_noise(clean, noise_sigma, generator)
    meas = CalphaMeasurement(images, rot, px, sigma, ctf, shifts, pad)
    return SimulatedCalpha(meas, clean, noise_sigma)


# ---------------------------------------------------------------------------------------
# amplitude and likelihood


def _flat_dot(a: torch.Tensor, b: torch.Tensor, event_ndim: int) -> torch.Tensor:
    return (a * b).flatten(a.ndim - event_ndim).sum(-1)


def profile_amplitude(y: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """a* = max(⟨y, m⟩, 0)/‖m‖², the least-squares non-negative amplitude of unit-amplitude
    images ``model`` (*batch, *y.shape) for the measurement ``y``; shape (*batch), no
    gradient. A scattering potential is positive: without the bound, a cloud anti-correlated
    with the data would fit it with inverted contrast."""
    with torch.no_grad():
        num = _flat_dot(model, y.expand_as(model), y.ndim).clamp_min(0.0)
        den = _flat_dot(model, model, y.ndim)
        return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class ProfiledAmplitudeOperator(Operator):
    """r ↦ a*(r) · A(r): ``base`` (unit amplitude) scaled by the least-squares amplitude for
    ``y`` (:func:`profile_amplitude`), per sample, held fixed in the gradient (exact for
    the profile misfit ‖y − a*(r) A(r)‖², by the envelope theorem)."""

    def __init__(self, base: Operator, y: torch.Tensor) -> None:
        base.range_batch_shape(y)
        require(
            tuple(y.shape) == tuple(base.range_shape),
            f"y must have the operator's range shape {base.range_shape}, got {tuple(y.shape)}",
        )
        self.base, self.y = base, y
        self.domain_shape, self.range_shape = base.domain_shape, base.range_shape
        #: the amplitude of the latest forward call, shape (*batch)
        self.last_amplitude: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """a*(x) · A(x), (*batch, *range_shape)."""
        m = self.base.forward(x)
        a = profile_amplitude(self.y.to(m), m)
        self.last_amplitude = a
        return m * a.reshape(*a.shape, *([1] * len(self.range_shape)))


def estimate_amplitude(measurement: CalphaMeasurement, n_residues: int) -> float:
    """Per-residue amplitude from the images' DC terms: ∫V d³r / N (map units × Å³).

    :func:`~cryoprior.physics.measurement.estimate_map_integral` with the images' CTF(0);
    N = ``n_residues`` (from the sequence). Raises InputError when the estimate is not
    positive (too few or too noisy images: use the profile amplitude).
    """
    n = _check_n(n_residues)
    est = estimate_map_integral(measurement.images, measurement.ctf_at_zero, measurement.pixel_size)
    if not est.integral > 0:
        raise InputError(
            f"the images' DC terms give a non-positive map integral ({est.integral:.3g} ± "
            f"{est.stderr:.3g}): too few or too noisy images for amplitude='dc'; use "
            "amplitude='profile' or give the amplitude"
        )
    return est.integral / n


def calpha_log_likelihood(
    measurement: CalphaMeasurement,
    coords: torch.Tensor,
    noise_sigma: float,
    amplitude: float | str = "profile",
) -> torch.Tensor:
    """log N(y; a · A(r), s² I) of clouds ``coords`` (*batch, N, 3) Å, shape (*batch).

    = −‖y − a A(r)‖²/(2s²) − (M/2) log(2π s²), M = K D² pixels; ``amplitude`` a number or
    ``"profile"`` (a = a*(r) per cloud, see the module docstring). Differentiable in
    ``coords`` (for "profile", the gradient of the profile likelihood).
    """
    s = require_positive(noise_sigma, "noise sigma")
    require(
        isinstance(coords, torch.Tensor) and coords.ndim >= 2 and coords.shape[-1] == 3,
        f"coords must have shape (*batch, N, 3), got {tuple(getattr(coords, 'shape', ()))}",
    )
    y = measurement.images.to(coords.dtype)
    op = _model_operator(measurement, coords.shape[-2], amplitude, y)
    r = op(coords) - y
    m = y.numel()
    return -_flat_dot(r, r, y.ndim) / (2 * s * s) - 0.5 * m * math.log(2 * math.pi * s * s)


def _model_operator(
    measurement: CalphaMeasurement,
    n_atoms: int,
    amplitude: float | str,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma: float | None = None,
) -> Operator:
    if isinstance(amplitude, str):
        require(
            amplitude == "profile", f"amplitude must be 'profile' or a number, got {amplitude!r}"
        )
        return ProfiledAmplitudeOperator(measurement.operator(n_atoms, 1.0, mask, sigma), y)
    a = require_positive(amplitude, "amplitude")
    return measurement.operator(n_atoms, a, mask, sigma)


def _resolve_amplitude(
    measurement: CalphaMeasurement, n: int, amplitude: float | str
) -> float | str:
    """ "profile" stays; "dc" becomes the DC estimate; a number is checked."""
    if isinstance(amplitude, str):
        require(amplitude in AMPLITUDES, f"amplitude must be one of {AMPLITUDES} or a number")
        return estimate_amplitude(measurement, n) if amplitude == "dc" else amplitude
    return require_positive(amplitude, "amplitude")


# ---------------------------------------------------------------------------------------
# comparing and averaging clouds


def radius_of_gyration_guess(n_residues: int) -> float:
    """Rg ≈ 2.2 N^0.38 Å of a compact chain of N residues (Skolnick, Kolinski & Ortiz,
    J. Mol. Biol. 265, 217 (1997), the fit to globular proteins). Used only to size the
    random starts and the prior's data_std; never taken from a structure."""
    return 2.2 * float(_check_n(n_residues)) ** 0.38


def _assignment(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """perm with p[perm[i]] matched to q[i], minimising Σ ‖p[perm[i]] − q[i]‖² (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(q.double(), p.double()).pow(2).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, dtype=torch.long, device=p.device)


def _superpose(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p rigidly superposed on q (Kabsch, proper rotation)."""
    R, t = kabsch(p.double(), q.double())
    return (p.double() @ R.T + t).to(p.dtype)


def match_cloud(
    p: torch.Tensor, q: torch.Tensor, n_iter: int = 10, superpose: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder (and superpose) cloud ``p`` (N, 3) onto ``q`` (N, 3): returns (p', perm).

    Alternates the optimal assignment (Hungarian algorithm on squared distances) with the
    Kabsch superposition of the matched pairs, starting from the given frame, until the
    assignment stops changing (an ICP with exact assignments). ``p'`` is ``p[perm]``
    superposed on ``q`` (or only reordered when ``superpose`` is False).
    """
    require(
        p.ndim == 2 and p.shape == q.shape and p.shape[-1] == 3,
        f"clouds must both be (N, 3), got {tuple(p.shape)} and {tuple(q.shape)}",
    )
    perm = _assignment(p, q)
    if not superpose:
        return p[perm], perm
    for _ in range(int(n_iter)):
        R, t = kabsch(p[perm].double(), q.double())
        new = _assignment(p.double() @ R.T + t, q)
        if bool((new == perm).all()):
            break
        perm = new
    return _superpose(p[perm], q), perm


def matched_kabsch_rmsd(p: torch.Tensor, q: torch.Tensor, superpose: bool = True) -> float:
    """RMSD (Å) between clouds ``p`` and ``q`` (N, 3) under the best residue assignment.

    With ``superpose`` the Kabsch RMSD after :func:`match_cloud` (assignment and rigid
    superposition); without, the RMSD in the given frame under the optimal assignment.
    """
    moved, _ = match_cloud(p, q, superpose=superpose)
    return float(((moved.double() - q.double()) ** 2).sum(-1).mean().sqrt())


def average_clouds(
    samples: torch.Tensor, reference: int = 0, n_iter: int = 3, align: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of clouds (S, N, 3) whose points are unlabelled: (mean, matched samples, spread).

    Each sample is matched (Hungarian assignment, then Kabsch superposition when ``align``)
    to the reference (first ``samples[reference]``, then the current mean, ``n_iter``
    rounds) and the matched samples are averaged. ``spread`` (N,) is the RMS distance (Å)
    of the matched samples from the mean, per point (0 for one sample).
    """
    require(
        samples.ndim == 3 and samples.shape[-1] == 3 and samples.shape[0] >= 1,
        f"samples must be (S, N, 3), got {tuple(samples.shape)}",
    )
    ref = samples[int(reference)]
    matched = samples
    for _ in range(max(1, int(n_iter))):
        matched = torch.stack([match_cloud(s, ref, superpose=align)[0] for s in samples])
        ref = matched.mean(0)
    spread = ((matched - ref) ** 2).sum(-1).mean(0).sqrt()
    return ref, matched, spread


# ---------------------------------------------------------------------------------------
# results


@dataclass
class CalphaFit:
    """A reconstructed Cα cloud, coordinates in Å in the box frame.

    ``coords`` (N, 3): the answer (no prior: the best start; prior: the matched mean of the
    samples). ``samples`` (S, N, 3): every start's fit (no prior) or the posterior samples
    matched to ``coords`` (prior). ``spread`` (N,): per-residue RMS distance of the samples
    from the mean (prior), None without prior. ``amplitude``: the per-residue amplitude of
    ``coords`` (estimated). ``log_likelihood`` of ``coords`` (with ``noise_sigma``, None when
    no σ is known). ``seconds``: wall time of the whole reconstruction; ``config`` the
    settings and diagnostics.
    """

    coords: torch.Tensor
    samples: torch.Tensor
    spread: torch.Tensor | None
    amplitude: float
    noise_sigma: float | None
    log_likelihood: float | None
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


def _check_n(n_residues: int) -> int:
    try:
        n = int(n_residues)
    except (TypeError, ValueError):
        raise InputError(
            f"the number of residues must be an integer >= 1, got {n_residues!r}"
        ) from None
    require(
        n >= 1 and n == n_residues,
        f"the number of residues must be an integer >= 1, got {n_residues!r}",
    )
    return n


def _noise_sigma(
    measurement: CalphaMeasurement, noise_sigma: float | None, mask_radius: float | None
) -> float:
    if noise_sigma is not None:
        return require_positive(noise_sigma, "noise sigma")
    radius = 0.4 * measurement.box if mask_radius is None else float(mask_radius)
    return estimate_noise_sigma(measurement.images, radius)


# ---------------------------------------------------------------------------------------
# fitting without a prior


def fit_calpha_no_prior(
    measurement: CalphaMeasurement,
    n_residues: int,
    *,
    n_starts: int = 4,
    n_iter: int = 300,
    lr: float = 1.0,
    anneal: float = 2.0,
    amplitude: float | str = "profile",
    noise_sigma: float | None = None,
    mask_radius: float | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> CalphaFit:
    """Maximum-likelihood Cα coordinates (N, 3) Å from ``measurement``, no prior.

    Args:
        measurement: images, poses, CTFs, shifts and blob σ (:class:`CalphaMeasurement`).
        n_residues: N, from the sequence.
        n_starts: random starts (fitted together as one batch); the best likelihood wins.
        n_iter: Adam iterations; ``lr`` the initial step (Å), cosine-decayed to lr/50.
        anneal: model blob width starts at ``anneal`` · σ and reaches σ at 60 % of the
            iterations (1: no annealing).
        amplitude: "profile" (default), "dc" or a number (module docstring).
        noise_sigma: s for the reported log-likelihood (default: from the background
            outside ``mask_radius`` px, default 0.4 · D); the fit itself does not need it.
        seed: seeds the random starts.
    """
    t0 = time.perf_counter()
    n = _check_n(n_residues)
    require(int(n_starts) >= 1, f"n_starts must be >= 1, got {n_starts}")
    require(int(n_iter) >= 1, f"n_iter must be >= 1, got {n_iter}")
    lr = require_positive(lr, "learning rate (Å)")
    require(float(anneal) >= 1.0, f"anneal must be >= 1 (blob width factor), got {anneal}")
    amp = _resolve_amplitude(measurement, n, amplitude)
    sigma_n = _noise_sigma(measurement, noise_sigma, mask_radius)
    y = measurement.images
    dtype = y.dtype
    g = torch.Generator().manual_seed(int(seed))
    half = (measurement.box // 2 - 1) * measurement.pixel_size
    s0 = radius_of_gyration_guess(n) / math.sqrt(3.0)
    x0 = s0 * torch.randn(int(n_starts), n, 3, generator=g, dtype=torch.float64)
    x = x0.clamp(-half, half).to(dtype).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(n_iter), eta_min=lr / 50)
    y_norm2 = float((y.double() ** 2).sum())
    n_anneal = max(1, int(0.6 * int(n_iter)))
    for it in progress(range(int(n_iter)), int(n_iter), "Cα ML fit", show_progress):
        frac = min(1.0, it / n_anneal)
        sig = measurement.sigma * float(anneal) ** (1.0 - frac)
        op = _model_operator(measurement, n, amp, y, sigma=sig)
        opt.zero_grad()
        r = op(x) - y
        loss = _flat_dot(r, r, y.ndim).sum() / y_norm2
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-half, half)
    x = x.detach()
    op = _model_operator(measurement, n, amp, y)
    with torch.no_grad():
        r = op(x) - y
        misfit = _flat_dot(r, r, y.ndim)
    best = int(torch.argmin(misfit))
    with torch.no_grad():
        a_best = _amplitude_of(op, amp, best)
        ll = float(calpha_log_likelihood(measurement, x[best], sigma_n, amp))
    return CalphaFit(
        coords=x[best].clone(),
        samples=x.clone(),
        spread=None,
        amplitude=a_best,
        noise_sigma=sigma_n,
        log_likelihood=ll,
        seconds=time.perf_counter() - t0,
        config={
            "method": "maximum likelihood, no prior",
            "n_residues": n,
            "n_starts": int(n_starts),
            "n_iter": int(n_iter),
            "lr": lr,
            "anneal": float(anneal),
            "amplitude": amplitude if isinstance(amplitude, str) else float(amplitude),
            "blob_sigma": measurement.sigma,
            "best_start": best,
            "relative_misfit": [float(v) / y_norm2 for v in misfit],
            "seed": int(seed),
        },
    )


def _amplitude_of(op: Operator, amp: float | str, index: int) -> float:
    if isinstance(op, ProfiledAmplitudeOperator):
        assert op.last_amplitude is not None
        return float(op.last_amplitude.reshape(-1)[index])
    return float(amp)


# ---------------------------------------------------------------------------------------
# posterior sampling with the Cα prior


class ClippedDenoiser:
    """A point-cloud denoiser whose x̂0 is kept inside a ball: static thresholding.

    Each point of x̂0(x_t) farther than ``radius`` (network units) from the centre is moved
    radially onto the sphere, the centre of mass is removed again, and ε̂ and the score are
    recomputed from the clipped x̂0 (ε̂ = (x_t − α_t x̂0)/σ_t), as DDPM samplers clip x̂0 to
    the data range (Ho et al. 2020, their code's ``clip_denoised``; "static thresholding",
    Saharia et al. 2022, Sec. 2.3). Near t = 1 (α_t → 0; α(1) ≈ 3·10⁻³ for
    ``polynomial_2``) x̂0 = (x_t − σ_t ε̂)/α_t magnifies the network's error: without the
    clip, samples of an imperfect prior were measured to fly hundreds of Å apart. The
    radius is physical knowledge (the particle lies inside the box), not the structure.
    """

    def __init__(self, denoiser: Any, radius: float) -> None:
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.representation = getattr(denoiser, "representation", "points")
        self.radius = require_positive(radius, "clip radius")

    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> DenoiserOutput:
        out = self.denoiser(x_t, t, **cond)
        norm = out.x0.norm(dim=-1, keepdim=True)
        shrink = torch.clamp(self.radius / norm.clamp_min(1e-12), max=1.0)
        x0 = remove_mean(out.x0 * shrink, cond.get("mask"))
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = expand_like(alpha.to(x_t), x_t), expand_like(sigma.to(x_t), x_t)
        eps = (x_t - a * x0) / s
        return DenoiserOutput(x0=x0, eps=eps, score=-eps / s)


def fit_calpha_with_prior(
    measurement: CalphaMeasurement,
    n_residues: int,
    prior: Prior | str | os.PathLike,
    *,
    n_samples: int = 4,
    n_steps: int = 50,
    guidance: str = "dps_x0",
    sampler: str = "ddpm",
    zeta: float = 1.0,
    n_inner: int = 10,
    amplitude: float | str = "profile",
    noise_sigma: float | None = None,
    mask_radius: float | None = None,
    data_std: float | None = None,
    clip: bool = True,
    align: bool = True,
    seed: int = 0,
    show_progress: bool = False,
) -> CalphaFit:
    """Posterior samples of the Cα cloud under the EGNN prior, and their matched mean.

    Args:
        measurement: images, poses, CTFs, shifts and blob σ (:class:`CalphaMeasurement`).
        n_residues: N (from the sequence), at most the prior's ``max_nodes``.
        prior: a point-cloud :class:`~cryoprior.priors.Prior` or its folder / name.
        n_samples: posterior samples (one batch); their matched mean is ``coords``.
        n_steps, sampler: reverse steps ("ddpm" ancestral or "ddim").
        guidance: "dps_x0" (default; L-BFGS proximal step, ``n_inner`` iterations) or
            "dps" (step ``zeta`` in network units).
        amplitude: "profile" (default), "dc" or a number (module docstring).
        noise_sigma: s (default: from the background outside ``mask_radius`` px, 0.4 · D).
        data_std: the prior's per-coordinate std in network units for r_t² (default:
            ``radius_of_gyration_guess(N) / (√3 · scale)``).
        clip: keep the denoiser's x̂0 inside the box (:class:`ClippedDenoiser`, radius
            D/2 pixels in network units).
        align: Kabsch-superpose the matched samples before averaging.
        seed: seeds the sampler.
    """
    t0 = time.perf_counter()
    n = _check_n(n_residues)
    require(guidance in ("dps", "dps_x0"), f"guidance must be 'dps' or 'dps_x0', got {guidance!r}")
    require(int(n_samples) >= 1, f"n_samples must be >= 1, got {n_samples}")
    if not isinstance(prior, Prior):
        loaded = load_prior(prior)
        require(isinstance(loaded, Prior), f"{prior} is not a diffusion prior")
        prior = loaded
    require(
        prior.representation == "points" and prior.metadata.objective_kind == "denoising",
        f"fit_calpha_with_prior needs a point-cloud denoising prior, got a "
        f"{prior.metadata.objective_kind} {prior.representation} prior",
    )
    max_nodes = int(prior.shape[0])
    if n > max_nodes:
        raise InputError(
            f"the segment has {n} residues but the prior handles clouds of up to {max_nodes} "
            f"points; fit a segment of at most {max_nodes} residues"
        )
    amp = _resolve_amplitude(measurement, n, amplitude)
    sigma_n = _noise_sigma(measurement, noise_sigma, mask_radius)
    scale = float(prior.metadata.normalisation["scale"])
    if data_std is None:
        data_std = radius_of_gyration_guess(n) / (math.sqrt(3.0) * scale)
    data_std = require_positive(data_std, "data_std")
    dtype = next(prior.denoiser.parameters()).dtype
    y = measurement.images.to(dtype)
    mask = torch.zeros(max_nodes, dtype=dtype)
    mask[:n] = 1.0
    op = _model_operator(measurement, max_nodes, amp, y, mask=mask)
    prior.denoiser.eval()
    radius = (measurement.box // 2) * measurement.pixel_size / scale
    denoiser = ClippedDenoiser(prior.denoiser, radius) if clip else prior.denoiser
    g = torch.Generator().manual_seed(int(seed))
    t_sample = time.perf_counter()
    res = dps_sample(
        denoiser,
        op,
        y,
        sigma_n,
        int(n_steps),
        float(zeta),
        guidance=guidance,
        sampler=sampler,
        n_samples=int(n_samples),
        generator=g,
        shape=prior.shape,
        normalisation=prior.metadata.normalisation,
        mask=mask,
        data_std=data_std,
        n_inner=int(n_inner),
        show_progress=show_progress,
    )
    t_sample = time.perf_counter() - t_sample
    samples = res.samples[:, :n].detach()
    order = torch.argsort(res.residual_norm)
    samples = samples[order]
    mean, matched, spread = average_clouds(samples, reference=0, align=align)
    with torch.no_grad():
        op_mean = _model_operator(measurement, n, amp, y)
        op_mean(mean.to(dtype))
        a_mean = _amplitude_of(op_mean, amp, 0)
        ll = float(calpha_log_likelihood(measurement, mean.to(dtype), sigma_n, amp))
    return CalphaFit(
        coords=mean,
        samples=matched,
        spread=spread,
        amplitude=a_mean,
        noise_sigma=sigma_n,
        log_likelihood=ll,
        seconds=time.perf_counter() - t0,
        config={
            "method": f"posterior sampling ({guidance}) with the Cα prior",
            "n_residues": n,
            "max_nodes": max_nodes,
            "normalisation_scale": scale,
            "data_std": data_std,
            "clip_radius": radius if clip else None,
            "amplitude": amplitude if isinstance(amplitude, str) else float(amplitude),
            "blob_sigma": measurement.sigma,
            "sampling_seconds": t_sample,
            "residual_norm": [float(v) for v in res.residual_norm[order]],
            "target_residual_norm": res.target_residual_norm,
            "align": bool(align),
            "seed": int(seed),
            "dps": res.config,
        },
    )


__all__ = [
    "AMPLITUDES",
    "DEFAULT_SIGMA",
    "CalphaFit",
    "CalphaMeasurement",
    "ClippedDenoiser",
    "ProfiledAmplitudeOperator",
    "SimulatedCalpha",
    "average_clouds",
    "calpha_log_likelihood",
    "estimate_amplitude",
    "fit_calpha_no_prior",
    "fit_calpha_with_prior",
    "match_cloud",
    "matched_kabsch_rmsd",
    "profile_amplitude",
    "radius_of_gyration_guess",
    "simulate_calpha_images",
]
