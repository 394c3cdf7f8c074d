"""The expected power spectrum of a protein's potential map, from its mass alone.

Diffusion posterior sampling with a Gaussian approximation of x0 | x_t (Π-GDM, the
proximal data step of :mod:`cryoprior.solvers.dps`) needs the prior's variance per
Fourier coefficient. A white variance (one number for every frequency) is wrong by orders
of magnitude for a map: a protein's power at 20 Å is ~10⁴ times its power at 3 Å, so a
white r_t² trusts the denoiser's guess over the data exactly where the data are most
informative (the low frequencies), and with few or very noisy particles the samples keep
the prior's shape instead of the measured one.

Model (random-atom / Wilson statistics plus a Guinier envelope of the molecule), for N
atoms of mean potential integral Z̄ inside a compact molecule of radius of gyration R_g:

    E|ρ̂(k)|² = Z̄² e^{−B k²/2} (N + N² e^{−(2π k R_g)²/3})

with k in 1/Å; N Z̄ = ∫ρ d³r from the mass (:data:`POTENTIAL_PER_KDA`), N = mass / 14 Da
(heavy atoms, 110 Da and ~7.8 heavy atoms per residue), R_g = √(3/5)·R of a sphere of
the protein's volume (1.21 Å³/Da), B = the rendering's B-factor plus ~15 Å² for the atoms'
own form factor. Per coefficient of the unitary DFT of a D³ map at p Å/px (white noise of
variance s² has s² everywhere): P(k) = E|ρ̂(k)|² / (p⁶ D³).
"""

from __future__ import annotations

import math

import torch

from cryoprior.core.errors import require_positive
from cryoprior.physics.composition import POTENTIAL_PER_KDA

DALTON_PER_ATOM = 14.0
VOLUME_PER_DALTON = 1.21  # Å³
ATOM_FORM_BFACTOR = 15.0  # Å²


def protein_power_profile(k: torch.Tensor, mass_kda: float, bfactor: float) -> torch.Tensor:
    """E|ρ̂(k)|² (potential units² · Å⁶) of a protein of ``mass_kda`` at spatial
    frequencies ``k`` (1/Å), its atoms blurred by ``bfactor`` (Å²; see the module doc)."""
    mass = require_positive(mass_kda, "molecular mass (kDa)") * 1000.0
    n_atoms = mass / DALTON_PER_ATOM
    z = POTENTIAL_PER_KDA * mass_kda / n_atoms
    radius = (3.0 * VOLUME_PER_DALTON * mass / (4.0 * math.pi)) ** (1.0 / 3.0)
    rg2 = 0.6 * radius**2
    k2 = k.to(torch.float64) ** 2
    b = float(bfactor) + ATOM_FORM_BFACTOR
    shape = torch.exp(-((2.0 * math.pi) ** 2) * k2 * rg2 / 3.0)
    return z**2 * torch.exp(-b * k2 / 2.0) * (n_atoms + n_atoms**2 * shape)


def protein_power(
    size: int,
    pixel_size: float,
    mass_kda: float,
    bfactor: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """P(k) per coefficient of a (size³) map's unitary rfft grid (size, size, size//2 + 1)
    at ``pixel_size`` Å/px, in units of (potential / ``scale``)² — with ``scale`` the
    prior's normalisation scale, the network units that :func:`dps_sample` takes as
    ``prior_power``."""
    px = require_positive(pixel_size, "pixel size (Å)")
    scale = require_positive(scale, "normalisation scale")
    k = torch.fft.fftfreq(size, d=px, dtype=torch.float64)
    kz = torch.fft.rfftfreq(size, d=px, dtype=torch.float64)
    kk = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kz[None, None, :] ** 2)
    power = protein_power_profile(kk, mass_kda, bfactor) / (px**6 * size**3 * scale**2)
    return power.clamp_min(1e-12 * float(power.max()))


__all__ = ["protein_power", "protein_power_profile"]
