"""Molecular mass and the integral of the potential it implies.

A density-map prior's intensity units are those of
:func:`cryoprior.physics.atoms.atoms_to_map` (Å⁻², whose integral over the box is Σ of the
atoms' scattering factors at q = 0, in Å). To put a measurement into those units the
reconstruction needs the integral the imaged molecule should have, which only depends
on its composition. For proteins that is, to 1 %, proportional to the molecular mass:
over the 85 training chains of the structure corpus (heavy atoms of the deposited
models, masses from the sequences below) the ratio is 166.1 ± 1.6 Å per kDa (min 158.6,
max 168.1), so a user who knows the mass (or the sequence) of the sample knows the
integral. The measurement then sets the scale (``estimate_map_integral``); neither uses
the structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.physics.scattering import form_factor_table

#: average residue masses in Da (amino acid minus water; IUPAC average isotopic masses)
RESIDUE_MASS_DA: dict[str, float] = {
    "A": 71.0788,
    "R": 156.1875,
    "N": 114.1038,
    "D": 115.0886,
    "C": 103.1388,
    "E": 129.1155,
    "Q": 128.1307,
    "G": 57.0519,
    "H": 137.1411,
    "I": 113.1594,
    "L": 113.1594,
    "K": 128.1741,
    "M": 131.1926,
    "F": 147.1766,
    "P": 97.1167,
    "S": 87.0782,
    "T": 101.1051,
    "W": 186.2132,
    "Y": 163.1760,
    "V": 99.1326,
}
#: mass in Da given to residues outside the 20 standard ones ("X", modified residues)
UNKNOWN_RESIDUE_MASS_DA = 110.0
WATER_MASS_DA = 18.015

#: ∫V d³r (Å) of ``atoms_to_map`` per kDa of protein: mean over the corpus's training
#: chains (see the module doc; reproduced by tests/test_composition.py on shipped chains)
POTENTIAL_PER_KDA = 166.1


def protein_mass_kda(sequence: str) -> float:
    """Mass in kDa of a polypeptide with one-letter ``sequence`` (average masses + water)."""
    seq = "".join(str(sequence).split()).upper()
    if not seq or not seq.isalpha():
        raise InputError(
            f"a protein sequence must be one-letter amino-acid codes, got {sequence[:30]!r}"
        )
    da = sum(RESIDUE_MASS_DA.get(c, UNKNOWN_RESIDUE_MASS_DA) for c in seq) + WATER_MASS_DA
    return da / 1000.0


def potential_integral_from_mass(mass_kda: float) -> float:
    """∫V d³r (Å) of the ``atoms_to_map`` potential of a protein of ``mass_kda`` kDa."""
    return POTENTIAL_PER_KDA * require_positive(mass_kda, "molecular mass (kDa)")


def potential_integral(elements: Sequence[str | int]) -> float:
    """∫V d³r (Å) of :func:`cryoprior.physics.atoms.atoms_to_map` for atoms ``elements``.

    The integral of each atom's five-Gaussian potential is Σ_k a_k (its scattering factor
    at q = 0; Peng et al. 1996), independent of positions and B-factors: only the
    composition (known from the sequence) is used, not the structure.
    """
    require(len(elements) >= 1, "need at least one element")
    a, _ = form_factor_table(list(elements))
    return float(np.sum(a))


__all__ = [
    "POTENTIAL_PER_KDA",
    "RESIDUE_MASS_DA",
    "potential_integral",
    "potential_integral_from_mass",
    "protein_mass_kda",
]
