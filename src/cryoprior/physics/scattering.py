"""Elastic electron scattering factors: five-Gaussian fits per element.

The electron scattering factor of a neutral atom is fitted as

    f_e(s) = sum_{k=1..5} a_k exp(-b_k s^2),   s = sin(theta)/lambda = q/2   (Å^-1),

with f_e in Å and b_k in Å² (Peng, Ren, Dudarev & Whelan 1996, Acta Cryst. A52, 257-276,
Table 1: elastic, neutral atoms, fit over 0 <= s <= 2 Å^-1; reprinted as International
Tables for Crystallography Vol. C, Table 4.3.2.2). In terms of the spatial frequency
q = 1/d = 2s (cycles/Å) the factor is sum_k a_k exp(-b_k q^2 / 4).

The coefficients are not retyped here: gemmi (a core dependency) ships exactly this table
as ``gemmi.Element(symbol).c4322`` for Z = 1..98 (H to Cf); a test pins the carbon and
hydrogen rows against the published values. Ions use the neutral-atom factor (the charge
is ignored); deuterium (D) uses hydrogen's row. An unknown symbol, or an element without a
row (Z > 98), raises :class:`InputError` naming it.

Potential units. With f_e in Å, the inverse 3-D Fourier transform of f_e(q) has units
Å^-2 ("scattering-factor units"); by the Mott-Bethe / first Born relation the electrostatic
potential in volts is this times h^2 / (2 pi m0 e) = 47.878 V·Å² (Kirkland 2010,
"Advanced Computing in Electron Microscopy", eq. 5.8 with the non-relativistic mass, as
used for Peng's tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from cryoprior.core.errors import InputError

# h^2 / (2 pi m0 e) in V·Å² from the CODATA 2018 exact/recommended constants.
_H = 6.62607015e-34  # J s
_M0 = 9.1093837015e-31  # kg
_E = 1.602176634e-19  # C
VOLT_ANGSTROM2_PER_SCATTERING_UNIT: float = _H**2 / (2 * np.pi * _M0 * _E) * 1e20

N_GAUSSIANS = 5


@lru_cache(maxsize=256)
def _coefficients_by_symbol(symbol: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import gemmi

    el = gemmi.Element(symbol)
    coef = el.c4322 if el.atomic_number > 0 else None
    if coef is None:
        raise InputError(
            f"no electron scattering factor for element {symbol!r}: use an element symbol "
            "from H to Cf (Z = 1..98) in the structure's element column"
        )
    return tuple(float(v) for v in coef.a), tuple(float(v) for v in coef.b)


def _normalise_symbol(element: str | int) -> str:
    if isinstance(element, (int, np.integer)):
        import gemmi

        z = int(element)
        if not 1 <= z <= 98:
            raise InputError(f"atomic number {z} has no electron scattering factor (need 1..98)")
        return gemmi.Element(z).name
    symbol = str(element).strip()
    # Strip a trailing charge such as "Fe2+" or "CL-": the neutral factor is used.
    symbol = symbol.rstrip("+-0123456789")
    if not symbol or not symbol.isalpha():
        raise InputError(f"bad element symbol {element!r}: expected e.g. 'C', 'FE', 'Zn'")
    return symbol


def electron_form_factor(element: str | int) -> tuple[np.ndarray, np.ndarray]:
    """Five-Gaussian coefficients (a in Å, b in Å²) of one element (Peng et al. 1996).

    ``element`` is a symbol in any case ('C', 'FE', 'Zn', 'Fe2+') or an atomic number.
    Returns two float64 arrays of shape (5,).
    """
    a, b = _coefficients_by_symbol(_normalise_symbol(element).capitalize())
    return np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)


def form_factor_table(elements: Sequence[str | int]) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients for every atom of a structure: a (N, 5) in Å and b (N, 5) in Å²."""
    n = len(elements)
    a = np.empty((n, N_GAUSSIANS), dtype=np.float64)
    b = np.empty((n, N_GAUSSIANS), dtype=np.float64)
    cache: dict[str | int, tuple[np.ndarray, np.ndarray]] = {}
    for i, el in enumerate(elements):
        key = el.item() if isinstance(el, np.generic) else el
        if key not in cache:
            cache[key] = electron_form_factor(key)
        a[i], b[i] = cache[key]
    return a, b


def scattering_factor(element: str | int, q: np.ndarray | float) -> np.ndarray:
    """f_e at spatial frequency ``q`` = 1/d in cycles/Å (not s = q/2), in Å."""
    a, b = electron_form_factor(element)
    q2 = np.asarray(q, dtype=np.float64)[..., None] ** 2
    return (a * np.exp(-b * q2 / 4.0)).sum(-1)
