"""The measurement model of Cα clouds in particle images: blobs, CTF, noise, amplitude.

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

Used by :mod:`cryoprior.solvers.calpha_fit` (fitting with and without the Cα prior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.fourier_slice import check_rotations
from cryoprior.physics.measurement import estimate_map_integral
from cryoprior.physics.noise import add_noise, noise_sigma_for_snr
from cryoprior.physics.operators import (
    CalphaProjectionOperator,
    Operator,
)
from cryoprior.physics.projection import padded_size

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


def flat_dot(a: torch.Tensor, b: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """Σ a·b over the last ``event_ndim`` dimensions (one value per batch element)."""
    return (a * b).flatten(a.ndim - event_ndim).sum(-1)


def profile_amplitude(y: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """a* = max(⟨y, m⟩, 0)/‖m‖², the least-squares non-negative amplitude of unit-amplitude
    images ``model`` (*batch, *y.shape) for the measurement ``y``; shape (*batch), no
    gradient. A scattering potential is positive: without the bound, a cloud anti-correlated
    with the data would fit it with inverted contrast."""
    with torch.no_grad():
        num = flat_dot(model, y.expand_as(model), y.ndim).clamp_min(0.0)
        den = flat_dot(model, model, y.ndim)
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
    n = check_n_residues(n_residues)
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
    op = model_operator(measurement, coords.shape[-2], amplitude, y)
    r = op(coords) - y
    m = y.numel()
    return -flat_dot(r, r, y.ndim) / (2 * s * s) - 0.5 * m * math.log(2 * math.pi * s * s)


def model_operator(
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


def resolve_amplitude(
    measurement: CalphaMeasurement, n: int, amplitude: float | str
) -> float | str:
    """ "profile" stays; "dc" becomes the DC estimate; a number is checked."""
    if isinstance(amplitude, str):
        require(amplitude in AMPLITUDES, f"amplitude must be one of {AMPLITUDES} or a number")
        return estimate_amplitude(measurement, n) if amplitude == "dc" else amplitude
    return require_positive(amplitude, "amplitude")


def check_n_residues(n_residues: int) -> int:
    """``n_residues`` as an int >= 1, else an InputError that says so."""
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


def radius_of_gyration_guess(n_residues: int) -> float:
    """Rg ≈ 2.2 N^0.38 Å of a compact chain of N residues (Skolnick, Kolinski & Ortiz,
    J. Mol. Biol. 265, 217 (1997), the fit to globular proteins). Used only to size the
    random starts and the prior's data_std; never taken from a structure."""
    return 2.2 * float(check_n_residues(n_residues)) ** 0.38


def amplitude_of(op: Operator, amp: float | str, index: int) -> float:
    """The amplitude of batch element ``index`` in ``op``'s latest forward call (profile),
    or ``amp`` itself (a fixed amplitude)."""
    if isinstance(op, ProfiledAmplitudeOperator):
        assert op.last_amplitude is not None
        return float(op.last_amplitude.reshape(-1)[index])
    return float(amp)


__all__ = [
    "AMPLITUDES",
    "DEFAULT_SIGMA",
    "CalphaMeasurement",
    "ProfiledAmplitudeOperator",
    "SimulatedCalpha",
    "amplitude_of",
    "calpha_log_likelihood",
    "check_n_residues",
    "estimate_amplitude",
    "flat_dot",
    "model_operator",
    "profile_amplitude",
    "radius_of_gyration_guess",
    "resolve_amplitude",
    "simulate_calpha_images",
]
