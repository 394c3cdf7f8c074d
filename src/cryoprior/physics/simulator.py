"""The particle simulator: a map in, a RELION particle set (stack + STAR) out.

Each particle image is  y = shift(CTF ∗ P_R V) + n,  with a Haar-uniform pose R, an optional
uniform in-plane shift, a CTF with defocus drawn uniformly from a range, and white Gaussian
noise at a stated SNR. A simulation is just another particle source: what it writes reads
back through :mod:`cryoprior.io.star` like any RELION data set.

SNR = variance of the noiseless CTF-modulated images over the whole box divided by the
noise variance. One noise sigma is used for the whole stack (as in a real detector); it is
fixed from a pilot of ``snr_pilot`` noiseless images before streaming, and the SNR actually
achieved over the whole stack is measured while writing and reported.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.core.runtime import progress
from cryoprior.geometry.rotations import matrix_to_euler, random_rotations
from cryoprior.io.mrc import StackWriter
from cryoprior.io.star import Particles, write_particles
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.noise import add_noise
from cryoprior.physics.projection import Projector
from cryoprior.physics.shifts import shift_spectra


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Lengths in Å, voltage kV, Cs mm, B-factor Å².

    ``snr`` None gives noiseless images. ``astigmatism`` is the largest half-difference
    (defocus_u - defocus_v) / 2; the astigmatism angle is uniform. Shifts are uniform in
    [-max_shift, max_shift]² Å.

    ``bfactor`` is the CTF's B-factor: applied AND written to the STAR file
    (``rlnCtfBfactor``), so a reconstruction knows it. ``envelope_bfactor`` (Å²) is an
    envelope exp(−B s²/4) on every image that is NOT written: the unknown loss of
    high-resolution signal (motion, charging, radiation damage, the map's own disorder)
    that real particles carry and their metadata does not record. The SNR is measured on
    the images with both applied.

    ``max_tilt`` (degrees; None = uniform poses) draws only views whose direction Rᵀẑ
    lies within that angle of the map's z axis (uniform on SO(3) otherwise, by rejection):
    a preferred orientation, which leaves the Fourier cone of half-angle 90° − max_tilt
    around k_z unmeasured.
    """

    n_particles: int
    snr: float | None = 0.1
    ctf: bool = True
    defocus_min: float = 10000.0
    defocus_max: float = 25000.0
    astigmatism: float = 200.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float = 0.0
    envelope_bfactor: float = 0.0
    max_shift: float = 0.0
    max_tilt: float | None = None
    seed: int = 0
    chunk_size: int = 256
    snr_pilot: int = 1000
    pad: float = 2.0

    def validate(self) -> None:
        """Raise InputError for values that cannot be simulated."""
        require(
            int(self.n_particles) >= 1, f"number of particles must be >= 1, got {self.n_particles}"
        )
        if self.snr is not None:
            require_positive(self.snr, "SNR")
        require(
            0 <= self.defocus_min <= self.defocus_max,
            f"defocus range must satisfy 0 <= min <= max (Å), got "
            f"{self.defocus_min}..{self.defocus_max}",
        )
        require(self.astigmatism >= 0, "astigmatism must be >= 0 Å")
        require(self.max_shift >= 0, "max shift must be >= 0 Å")
        require(self.envelope_bfactor >= 0, "envelope B-factor must be >= 0 Å²")
        require_positive(self.voltage, "voltage (kV)")
        require(self.cs >= 0, "spherical aberration Cs must be >= 0 mm")
        require(0 <= self.amplitude_contrast <= 1, "amplitude contrast must be in [0, 1]")
        require(int(self.chunk_size) >= 1, "chunk size must be >= 1")
        if self.max_tilt is not None:
            require(
                0 < self.max_tilt <= 90,
                f"max tilt must be in (0, 90] degrees, got {self.max_tilt}",
            )


@dataclass
class SimulationResult:
    """What a simulation wrote and measured."""

    particles: Particles
    rotations: torch.Tensor
    noise_sigma: float
    measured_snr: float | None
    paths: dict[str, str] = field(default_factory=dict)


def draw_rotations(
    n: int, generator: torch.Generator, max_tilt: float | None = None
) -> torch.Tensor:
    """``n`` poses (n, 3, 3) float64, uniform on SO(3), or restricted to view directions
    Rᵀẑ within ``max_tilt`` degrees of the z axis (rejection from uniform poses)."""
    if max_tilt is None or max_tilt >= 90:
        return random_rotations(n, generator, dtype=torch.float64)
    cos_max = math.cos(math.radians(max_tilt))
    kept: list[torch.Tensor] = []
    count = 0
    while count < n:
        batch = random_rotations(max(4 * (n - count), 64), generator, dtype=torch.float64)
        ok = batch[batch[:, 2, 2].abs() >= cos_max]
        kept.append(ok)
        count += int(ok.shape[0])
    return torch.cat(kept)[:n]


def draw_particle_parameters(
    config: SimulationConfig, box: int, pixel_size: float
) -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
    """Random poses (N,3,3), shifts (N,2) Å and CTF arrays for ``config``, from its seed."""
    n = int(config.n_particles)
    g = torch.Generator().manual_seed(int(config.seed))
    rng = np.random.default_rng(int(config.seed))
    rotations = draw_rotations(n, g, config.max_tilt)
    shifts = rng.uniform(-config.max_shift, config.max_shift, size=(n, 2))
    defocus = rng.uniform(config.defocus_min, config.defocus_max, size=n)
    astig = rng.uniform(0.0, config.astigmatism, size=n)
    ctf = {
        "defocus_u": defocus + astig,
        "defocus_v": defocus - astig,
        "defocus_angle": rng.uniform(0.0, math.pi, size=n),
        "voltage": np.full(n, config.voltage),
        "cs": np.full(n, config.cs),
        "amplitude_contrast": np.full(n, config.amplitude_contrast),
        "phase_shift": np.zeros(n),
        "bfactor": np.full(n, config.bfactor),
    }
    return rotations, shifts, ctf


def envelope(size: int, pixel_size: float, bfactor: float) -> torch.Tensor:
    """exp(−B s²/4) on a centred (size, size) frequency grid (s in 1/Å, B in Å²)."""
    s = (torch.arange(size, dtype=torch.float64) - size // 2) / (size * pixel_size)
    s2 = s[:, None] ** 2 + s[None, :] ** 2
    return torch.exp(-float(bfactor) * s2 / 4).to(torch.float32)


class ParticleRenderer:
    """Noiseless particle images for given poses, shifts and CTFs (one map, reused)."""

    def __init__(self, volume: Volume, pad: float = 2.0, envelope_bfactor: float = 0.0) -> None:
        self.box = volume.box
        self.pixel_size = volume.pixel_size
        self.projector = Projector(volume.data.to(torch.float32), pad=pad)
        self.envelope_bfactor = float(envelope_bfactor)

    def render(
        self, rotations: torch.Tensor, shifts_angstrom: np.ndarray | None, ctf: CTFParams | None
    ) -> torch.Tensor:
        """Images (k, D, D): projection, CTF, and the particle moved to -origin.

        The CTF and the shift are applied to the spectra of the padded projections (the
        padded box stands in for the surrounding micrograph), so the CTF does not wrap
        around the box; the images are cropped to D afterwards.
        """
        spectra = self.projector.project_ft(rotations.to(torch.float32))
        dp = spectra.shape[-1]
        if ctf is not None:
            spectra = spectra * compute_ctf(ctf, (dp, dp), self.pixel_size)
        if self.envelope_bfactor > 0:
            spectra = spectra * envelope(dp, self.pixel_size, self.envelope_bfactor)
        if shifts_angstrom is not None and np.any(shifts_angstrom):
            shifts_px = torch.as_tensor(-shifts_angstrom / self.pixel_size, dtype=torch.float32)
            spectra = shift_spectra(spectra, shifts_px)
        return self.projector.images_from_ft(spectra)


def simulate_particles(
    volume: Volume,
    config: SimulationConfig,
    out_dir: str | os.PathLike,
    stack_name: str = "particles.mrcs",
    star_name: str = "particles.star",
    show_progress: bool = True,
) -> SimulationResult:
    """Simulate ``config.n_particles`` images of ``volume`` and write a stack and STAR file.

    Images are rendered and written in chunks of ``config.chunk_size``, so memory stays at
    one chunk whatever the number of particles. Outputs are written atomically: on any
    error no stack or STAR file is left behind.
    """
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, box, px = int(config.n_particles), volume.box, volume.pixel_size
    rotations, shifts, ctf_arrays = draw_particle_parameters(config, box, px)
    ctf_all = CTFParams.from_particles(ctf_arrays) if config.ctf else None
    renderer = ParticleRenderer(volume, pad=config.pad, envelope_bfactor=config.envelope_bfactor)

    def chunk(start: int, stop: int) -> torch.Tensor:
        sub_ctf = ctf_all.index(slice(start, stop)) if ctf_all is not None else None
        return renderer.render(rotations[start:stop], shifts[start:stop], sub_ctf)

    sigma = 0.0
    if config.snr is not None:
        pilot = chunk(0, min(n, int(config.snr_pilot)))
        signal_var = float(pilot.var(dim=(-2, -1), unbiased=False).mean())
        if signal_var <= 0:
            raise InputError(
                "the map projects to constant images (is it empty?); cannot set "
                "the noise level from an SNR"
            )
        sigma = math.sqrt(signal_var / float(config.snr))
    noise_gen = torch.Generator().manual_seed(int(config.seed) + 1)

    stack_path = out / stack_name
    signal_sum = 0.0
    starts = range(0, n, int(config.chunk_size))
    with StackWriter(stack_path, n, (box, box), px) as writer:
        for start in progress(starts, total=len(starts), desc="simulate", enabled=show_progress):
            stop = min(n, start + int(config.chunk_size))
            clean = chunk(start, stop)
            signal_sum += float(clean.var(dim=(-2, -1), unbiased=False).sum())
            images = add_noise(clean, sigma, noise_gen) if sigma > 0 else clean
            writer.write(start, images)
    measured = (signal_sum / n) / sigma**2 if sigma > 0 else None

    particles = Particles(
        image_index=np.arange(1, n + 1),
        image_stack=np.array([str(stack_path.resolve())] * n, dtype=object),
        pixel_size=px,
        image_size=box,
        angles=matrix_to_euler(rotations).numpy(),
        shifts=shifts,
        has_poses=True,
        has_ctf=config.ctf,
        **(ctf_arrays if config.ctf else {}),
    )
    star_path = out / star_name
    try:
        write_particles(star_path, particles)
    except BaseException:
        stack_path.unlink(missing_ok=True)
        raise
    return SimulationResult(
        particles=particles,
        rotations=rotations,
        noise_sigma=sigma,
        measured_snr=measured,
        paths={"stack": str(stack_path), "star": str(star_path)},
    )


def config_dict(config: SimulationConfig) -> dict:
    """The configuration as a JSON-serialisable dict."""
    return asdict(config)


STRUCTURE_SUFFIXES = (
    ".pdb",
    ".ent",
    ".cif",
    ".mmcif",
    ".pdb.gz",
    ".ent.gz",
    ".cif.gz",
    ".mmcif.gz",
)


def volume_from_file(
    path: str | os.PathLike, box: int | None = None, pixel_size: float | None = None
) -> Volume:
    """The map to simulate from: an atomic model rendered at ``box``/``pixel_size``, or a map.

    A PDB/mmCIF model is centred on its atoms' centroid and rendered as an electrostatic
    potential (:func:`cryoprior.physics.atoms.atoms_to_map`); ``box`` and ``pixel_size`` are
    then required. An MRC map keeps its own box and pixel size; a ``box`` or ``pixel_size``
    given for it must agree (no silent resampling).
    """
    from cryoprior.io.mrc import read_map
    from cryoprior.io.structure import read_structure
    from cryoprior.physics.atoms import atoms_to_map

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file (give a PDB/mmCIF model or an MRC map)")
    name = p.name.lower()
    if name.endswith(STRUCTURE_SUFFIXES):
        require(
            box is not None and pixel_size is not None,
            f"{p}: an atomic model needs --box and --pixel-size to be rendered",
        )
        pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
        require(int(box) >= 8, f"box must be at least 8 px, got {box}")
        structure = read_structure(p)
        coords = np.asarray(structure.coords, dtype=np.float64)
        coords = coords - coords.mean(axis=0)
        extent = float(np.abs(coords).max())
        half = (int(box) // 2 - 1) * float(pixel_size)
        require(
            extent <= half,
            f"{p}: the model reaches {extent:.1f} Å from its centre but a box of {box} px "
            f"at {pixel_size} Å/px holds only {half:.1f} Å; use a larger --box or "
            f"--pixel-size",
        )
        data = atoms_to_map(
            coords,
            structure.elements,
            int(box),
            float(pixel_size),
            bfactors=np.asarray(structure.b_factors),
        )
        return Volume(data.to(torch.float32), float(pixel_size))
    volume = read_map(p, pixel_size=pixel_size)
    if box is not None and volume.box != int(box):
        raise InputError(
            f"{p}: the map is {volume.box} px wide but --box {box} was given; "
            f"omit --box to use the map's size (or resample the map first)"
        )
    require(
        len(set(volume.data.shape)) == 1,
        f"{p}: the map must be cubic, got shape {tuple(volume.data.shape)}",
    )
    return volume
