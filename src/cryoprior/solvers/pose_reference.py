"""Central slices of a reference map at the half-band frequencies, and model spectra.

:class:`ReferenceProjector` samples a map's padded, gridding-corrected 3-D spectrum on the
central slice of a rotation at the integer frequencies |k| ≤ b of the half plane (Hermitian
weights), on the smallest grid whose Nyquist exceeds the band (:func:`band_box`);
:class:`BandModel` multiplies the slices by the particles' CTFs and shift phases and gives
the band loss of many candidate poses at many shifts from one spectrum per rotation. The
model and the score are described in :mod:`cryoprior.solvers.poses`, which searches with them.
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.geometry.grids import centered_indices
from cryoprior.physics.ctf import CTFParams, evaluate_ctf
from cryoprior.physics.degrade import fourier_resize
from cryoprior.physics.fourier_slice import rfft2_c
from cryoprior.physics.projection import Projector


def band_box(full: int, band: float) -> int:
    """The smallest even grid (at least 8, at most ``full``) whose Nyquist exceeds
    ``band`` (cycles per box): 2⌈band⌉ + 2."""
    size = 2 * math.ceil(band) + 2
    return full if size >= full else max(size, min(full, 8))


class ReferenceProjector:
    """Central slices of a map's spectrum at the half-band frequencies, for pose search.

    Frequencies: the integer k = (kx, ky) (cycles per box) of a ``box`` × ``box`` centred
    grid with |k| ≤ ``band`` on the half plane kx > 0, or kx = 0 and ky ≥ 0, in row-major
    (ky, kx) order; ``k`` (n, 2) float32, ``weight`` (n,) 2 (0 at DC), so weighted sums
    equal sums over the whole band of a real image, its mean (DC) left out. ``band_mask``
    (box, box) marks the band, ``plane`` (box, box) the frequencies kept, and
    ``half_of_band`` (n_band,) which of the band's entries (row-major) are kept.

    ``volume_ft`` is a :class:`~cryoprior.physics.projection.Projector`'s padded,
    gridding-corrected centred 3-D spectrum (Dp³) of a map on a ``box``³ grid, built with
    the ``"linear"`` kernel so that the trilinear sampling here matches its correction. A
    slice at rotation R holds its samples at Rᵀ(kx, ky, 0) · Dp/box times ``scale`` (the
    spectral scale (D/box)³ when the map was Fourier-cropped from the data's D-grid).
    ``length`` is the box length in Å (shift phases, CTF frequencies k/length cycles/Å).
    """

    def __init__(
        self, volume_ft: torch.Tensor, box: int, band: float, length: float, scale: float = 1.0
    ) -> None:
        require(
            volume_ft.ndim == 3 and len(set(volume_ft.shape)) == 1,
            f"volume_ft must be a cubic (Dp, Dp, Dp) spectrum, got {tuple(volume_ft.shape)}",
        )
        require(0 < band <= box / 2 + 1e-9, f"band must be in (0, {box / 2}], got {band}")
        self.box = int(box)
        self.band = float(band)
        self.length = require_positive(length, "box length (Å)")
        self.scale = float(scale)
        self.padded = int(volume_ft.shape[-1])
        ky, kx = torch.meshgrid(
            centered_indices(box, torch.float64),
            centered_indices(box, torch.float64),
            indexing="ij",
        )
        self.band_mask = (kx**2 + ky**2).sqrt() <= band + 1e-9
        half = (kx > 0) | ((kx == 0) & (ky >= 0))
        self.half_of_band = half[self.band_mask]
        self.plane = self.band_mask & half
        self.k = torch.stack([kx[self.plane], ky[self.plane]], -1).to(torch.float32)  # (n, 2)
        # DC weighs 0: an image's mean is set by background normalisation, not the
        # structure, and a pose-independent term in a normalised score couples the pose
        # to it (noise images then share poses by their mean's sign: Einstein from noise)
        self.weight = torch.where((self.k == 0).all(-1), 0.0, 2.0)
        self.n_coefficients = float(self.weight.sum())  # coefficients of the whole band
        real = torch.view_as_real(volume_ft.detach().to(torch.complex64))
        self.volume = real.permute(3, 0, 1, 2).unsqueeze(0).contiguous()  # (1, 2, Dp, Dp, Dp)

    @classmethod
    def from_volume(
        cls, volume: torch.Tensor, pixel_size: float, band: float, pad: float = 2.0
    ) -> ReferenceProjector:
        """The projector of a (D, D, D) map (pixel size Å/px) at the band ``band`` Å.

        The map is Fourier-cropped to :func:`band_box` (D' ≥ 2⌈b⌉ + 2, b = D·p/band cycles
        per box, the same physical box), zero-padded by ``pad`` and gridding-corrected;
        slices are scaled by (D/D')³ to match the spectra of D × D images.
        """
        pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
        band = require_positive(band, "band (Å)")
        require(
            volume.ndim == 3 and len(set(volume.shape)) == 1,
            f"the reference must be a cubic (D, D, D) map, got {tuple(volume.shape)}",
        )
        d = volume.shape[-1]
        require(
            band >= 2 * pixel_size * (1 - 1e-9),
            f"band {band} Å is finer than Nyquist (2 × {pixel_size} Å/px)",
        )
        b = d * pixel_size / band  # cycles per box
        box = band_box(d, b)
        cropped = fourier_resize(volume.detach().to(torch.float64), (box,) * 3).to(torch.float32)
        projector = Projector(cropped, pad, "linear")
        return cls(projector.volume_ft, box, min(b, box / 2), d * pixel_size, (d / box) ** 3)

    @property
    def n(self) -> int:
        """The number of half-plane frequencies."""
        return int(self.k.shape[0])

    def slices(self, rotations: torch.Tensor) -> torch.Tensor:
        """Slices (..., n) complex64 at rotations (..., 3, 3): V̂(Rᵀ(kx, ky, 0)) · scale."""
        lead = rotations.shape[:-2]
        flat = rotations.reshape(-1, 3, 3).to(torch.float32)
        scale = self.padded / self.box
        points = (self.k * scale) @ flat[:, :2, :]  # (R, n, 3) = Rᵀ (kx, ky, 0)
        where = (points + self.padded // 2) * (2.0 / (self.padded - 1)) - 1.0
        sampled = torch.nn.functional.grid_sample(
            self.volume,
            where.reshape(1, flat.shape[0], -1, 1, 3),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )  # (1, 2, R, n, 1)
        values = torch.complex(sampled[0, 0, ..., 0], sampled[0, 1, ..., 0]) * self.scale
        return values.reshape(*lead, self.n)

    def phases(self, shifts: torch.Tensor) -> torch.Tensor:
        """e^{2πi k·s/L} (..., n) for shifts (..., 2) in Å (the model's shift by s)."""
        arg = (2 * math.pi / self.length) * (shifts.to(torch.float32) @ self.k.T)
        return torch.polar(torch.ones_like(arg), arg)

    def ramps(self, offsets: torch.Tensor) -> torch.Tensor:
        """e^{-2πi k·t/L} for relative shifts t: (S, 2) -> (n, S); (B, S, 2) -> (B, n, S)."""
        return self.phases(-offsets).transpose(-1, -2)

    def image_spectra(self, images: torch.Tensor) -> torch.Tensor:
        """Half-band spectra (B, n) complex64 of real images (B, D, D) spanning ``length``."""
        d = images.shape[-1]
        require(
            images.ndim == 3 and images.shape[-2] == d and d >= self.box,
            f"images must be (B, D, D) with D >= {self.box}, got {tuple(images.shape)}",
        )
        half = rfft2_c(images.to(torch.float32))  # rows ky + D//2, columns kx >= 0
        rows = (self.k[:, 1] + d // 2).long()
        return half[:, rows, self.k[:, 0].long()]

    def ctf_values(self, ctf: CTFParams | torch.Tensor | None, size: int) -> torch.Tensor | None:
        """The CTFs (B, n) float32 at the half-band frequencies, or None.

        ``ctf``: parameters (evaluated at k/length cycles/Å), or CTF images on the centred
        grid of the data, (B, D, D) full or (B, D, D//2 + 1) half layout (columns kx ≥ 0),
        D = ``size``.
        """
        if ctf is None:
            return None
        if isinstance(ctf, CTFParams):
            return evaluate_ctf(ctf, self.k.to(torch.float64) / self.length, torch.float32)
        require(
            ctf.ndim == 3 and ctf.shape[-2] == size and ctf.shape[-1] in (size, size // 2 + 1),
            f"CTF images must be (B, {size}, {size}) or (B, {size}, {size // 2 + 1}), "
            f"got {tuple(ctf.shape)}",
        )
        rows = (self.k[:, 1] + size // 2).long()
        cols = self.k[:, 0].long() + (size // 2 if ctf.shape[-1] == size else 0)
        return ctf[:, rows, cols].real.to(torch.float32)


class BandModel:
    """Model spectra of candidate poses for a batch of B particles: a reference's slices
    times the particles' CTFs (B, n) (or None) times shift phases.

    The loss over the band, Σ_k w_k |Y(k) − Ŷ_s(k)|², equals ‖Y‖² + P − 2 Re Σ_k w_k
    conj(Ŷ₀(k)) Y(k) e^{-2πi k·t/L} with P = Σ_k w_k |Ŷ₀(k)|², for the shift s + t and Ŷ₀ at
    s: one spectrum per rotation gives the loss at every shift t (:meth:`losses`).
    """

    def __init__(self, reference: ReferenceProjector, ctf: torch.Tensor | None) -> None:
        self.reference = reference
        self.weight = reference.weight
        self.ctf = ctf

    def phases(self, shifts: torch.Tensor) -> torch.Tensor:
        """e^{2πi k·s/L} (..., n) for shifts (..., 2) in Å."""
        return self.reference.phases(shifts)

    def ramps(self, offsets: torch.Tensor) -> torch.Tensor:
        """e^{-2πi k·t/L} for relative shifts t: (S, 2) -> (n, S); (B, S, 2) -> (B, n, S)."""
        return self.reference.ramps(offsets)

    def spectra(self, rotations: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Model spectra (C, B, n) for rotations (C, B, 3, 3) and shifts (B, 2) Å."""
        values = self.reference.slices(rotations) * self.phases(shifts)
        return values if self.ctf is None else values * self.ctf

    def losses(self, model: torch.Tensor, data: torch.Tensor, ramps: torch.Tensor) -> torch.Tensor:
        """Band losses minus ‖Y‖², (C, B, S), of model spectra (C, B, n) against half-plane
        data (B, n) at relative shifts given by ``ramps`` e^{-2πi k·t/L}, (n, S) shared or
        (B, n, S) per image."""
        power = (self.weight * (model.real**2 + model.imag**2)).sum(-1)
        cross = (self.weight * model.conj() * data).to(torch.complex64)
        if ramps.ndim == 2:
            corr = (cross @ ramps).real
        else:
            corr = torch.einsum("cbn,bns->cbs", cross, ramps).real
        return power[..., None] - 2 * corr


__all__ = ["BandModel", "ReferenceProjector", "band_box"]
