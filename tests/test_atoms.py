"""Scattering factors, atoms -> potential maps, Gaussian blobs -> maps and images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import random_rotations, rotation_about_axis
from cryoprior.physics.atoms import atoms_to_map, gaussians_to_images, gaussians_to_map
from cryoprior.physics.scattering import (
    VOLT_ANGSTROM2_PER_SCATTERING_UNIT,
    electron_form_factor,
    form_factor_table,
    scattering_factor,
)

# Peng, Ren, Dudarev & Whelan 1996, Acta Cryst. A52, Table 1 (elastic, 0 <= s <= 2 Å^-1).
PENG_C = ([0.0893, 0.2563, 0.7570, 1.0487, 0.3575], [0.2465, 1.7100, 6.4094, 18.6113, 50.2523])
PENG_H = ([0.0349, 0.1201, 0.1970, 0.0573, 0.1195], [0.5347, 3.5867, 12.3471, 18.9525, 38.6269])


def test_form_factor_table_is_peng_1996():
    for symbol, (a_ref, b_ref) in (("C", PENG_C), ("H", PENG_H)):
        a, b = electron_form_factor(symbol)
        np.testing.assert_allclose(a, a_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-12)
    assert scattering_factor("C", 0.0) == pytest.approx(sum(PENG_C[0]))
    # f_e(s) = sum a exp(-b s^2) with s = q / 2.
    s = 0.3
    expected = sum(a * math.exp(-b * s * s) for a, b in zip(*PENG_C))
    assert scattering_factor("C", 2 * s) == pytest.approx(expected, rel=1e-12)


def test_element_spellings_and_errors():
    fe = electron_form_factor("Fe")
    for spelling in ("FE", "fe", " Fe", "Fe2+", 26):
        np.testing.assert_array_equal(electron_form_factor(spelling)[0], fe[0])
    np.testing.assert_array_equal(electron_form_factor("D")[0], electron_form_factor("H")[0])
    for symbol in ("N", "O", "S", "P", "Na", "Mg", "K", "Ca", "Mn", "Zn", "Cl", "Se", "Cu"):
        a, b = electron_form_factor(symbol)
        assert a.shape == (5,) and (a > 0).all() and (b > 0).all()
    for bad in ("Xx", "Es", "", "C1x", 0, 120):
        with pytest.raises(InputError):
            electron_form_factor(bad)
    a, _ = form_factor_table(["C", "O", "C"])
    np.testing.assert_array_equal(a[0], a[2])


@pytest.mark.parametrize("box", [16, 17])
def test_atoms_to_map_integral_and_peak(box):
    coords = np.zeros((1, 3))
    vol = atoms_to_map(coords, ["C"], box, 1.5, dtype=torch.float64)
    assert vol.shape == (box, box, box)
    assert float(vol.sum()) * 1.5**3 == pytest.approx(sum(PENG_C[0]), rel=1e-12)
    c = box // 2
    assert np.unravel_index(int(vol.argmax()), vol.shape) == (c, c, c)
    # Centro-symmetric about index D//2 (odd sizes: exactly a flip).
    if box % 2 == 1:
        torch.testing.assert_close(vol, vol.flip(0, 1, 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("box", [20, 21])
def test_atoms_to_map_many_atoms_integral_and_bfactors(box, gen):
    coords = (torch.rand(40, 3, generator=gen, dtype=torch.float64) - 0.5) * 18
    elements = ["C", "N", "O", "S", "FE"] * 8
    bfac = torch.rand(40, generator=gen, dtype=torch.float64) * 60
    vol = atoms_to_map(coords, elements, box, 1.2, bfactors=bfac, dtype=torch.float64)
    a, _ = form_factor_table(elements)
    assert float(vol.sum()) * 1.2**3 == pytest.approx(a.sum(), rel=1e-10)
    volts = atoms_to_map(coords, elements, box, 1.2, bfactors=bfac, volts=True, dtype=torch.float64)
    torch.testing.assert_close(volts, vol * VOLT_ANGSTROM2_PER_SCATTERING_UNIT)
    assert VOLT_ANGSTROM2_PER_SCATTERING_UNIT == pytest.approx(47.878, abs=2e-3)
    chunked = atoms_to_map(coords, elements, box, 1.2, bfactors=bfac, dtype=torch.float64, chunk=7)
    torch.testing.assert_close(chunked, vol, atol=1e-12, rtol=0)


def test_atoms_to_map_axis_order():
    px, box = 1.0, 24
    coords = np.array([[2.0, -3.0, 5.0]])  # (x, y, z) in Å
    vol = atoms_to_map(coords, ["O"], box, px, bfactors=[10.0])
    c = box // 2
    assert np.unravel_index(int(vol.argmax()), vol.shape) == (c + 5, c - 3, c + 2)  # [z, y, x]
    centred = atoms_to_map(coords + 1.0, ["O"], box, px, bfactors=[10.0], center=True)
    assert np.unravel_index(int(centred.argmax()), vol.shape) == (c, c, c)


def test_atoms_to_map_matches_analytic_potential():
    # A blurred atom is band-limited at 0.5 Å/px, so the DFT map equals the analytic
    # potential, made periodic (the map is periodic: sum the images one box away).
    box, px, bfac = 32, 0.5, 100.0
    vol = atoms_to_map(np.zeros((1, 3)), ["N"], box, px, bfactors=[bfac], dtype=torch.float64)
    a, b = electron_form_factor("N")
    r = (np.arange(box) - box // 2) * px
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    beta = b + bfac
    ref = np.zeros_like(x)
    length = box * px
    for i, j, k in np.ndindex(3, 3, 3):
        r2 = (x + (i - 1) * length) ** 2 + (y + (j - 1) * length) ** 2 + (z + (k - 1) * length) ** 2
        ref += sum(
            a[n] * (4 * np.pi / beta[n]) ** 1.5 * np.exp(-4 * np.pi**2 * r2 / beta[n])
            for n in range(5)
        )
    np.testing.assert_allclose(vol.numpy(), ref, atol=1e-9 * ref.max())
    # Without a B-factor the map is the band-limited version: it rings, but keeps the mass.
    sharp = atoms_to_map(np.zeros((1, 3)), ["N"], box, 2.0, dtype=torch.float64)
    assert float(sharp.min()) < 0 and float(sharp.sum()) * 8 == pytest.approx(a.sum())


def test_atoms_to_map_input_errors():
    with pytest.raises(InputError, match="larger box"):
        atoms_to_map(np.array([[30.0, 0.0, 0.0]]), ["C"], 16, 2.0)
    with pytest.raises(InputError, match="one element per atom"):
        atoms_to_map(np.zeros((2, 3)), ["C"], 16, 2.0)
    with pytest.raises(InputError, match="Xq"):
        atoms_to_map(np.zeros((1, 3)), ["Xq"], 16, 2.0)
    with pytest.raises(InputError, match="B-factors"):
        atoms_to_map(np.zeros((1, 3)), ["C"], 16, 2.0, bfactors=[-5.0])


# ---------------------------------------------------------------- Gaussian blobs


@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussians_to_map_integral_axes_and_batch(box, dtype, gen):
    coords = ((torch.rand(2, 5, 3, generator=gen, dtype=torch.float64) - 0.5) * 8).to(dtype)
    amps = torch.rand(2, 5, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    vol = gaussians_to_map(coords, box, 1.5, 1.2, amplitudes=amps)
    assert vol.shape == (2, box, box, box) and vol.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(vol.sum((-3, -2, -1)) * 1.5**3, amps.sum(-1), atol=tol, rtol=tol)
    # One narrow blob at (x, y, z) = (3, -2, 1) voxels lands at [c+1, c-2, c+3].
    one = gaussians_to_map(torch.tensor([[3.0, -2.0, 1.0]], dtype=dtype) * 1.5, box, 1.5, 0.3)
    c = box // 2
    assert np.unravel_index(int(one.argmax()), one.shape) == (c + 1, c - 2, c + 3)
    # Narrow blob: still integrates to its amplitude (pixel-averaged, not point-sampled).
    assert float(one.sum()) * 1.5**3 == pytest.approx(1.0, rel=1e-5)
    # A masked-out blob contributes nothing.
    mask = torch.ones(2, 5, dtype=dtype)
    mask[:, 0] = 0
    masked = gaussians_to_map(coords, box, 1.5, 1.2, amplitudes=amps, mask=mask)
    rest = gaussians_to_map(coords[:, 1:], box, 1.5, 1.2, amplitudes=amps[:, 1:])
    torch.testing.assert_close(masked, rest, atol=tol, rtol=0)


def test_gaussians_to_map_is_separable_gaussian():
    # For sigma well above the pixel, the pixel-averaged blob is close to the density
    # (pixel averaging lowers the peak by about 1 - px^2/(8 sigma^2) = 0.8 % here).
    box, px, sigma = 33, 0.5, 2.0
    vol = gaussians_to_map(torch.zeros(1, 3, dtype=torch.float64), box, px, sigma)
    r = (torch.arange(box, dtype=torch.float64) - box // 2) * px
    g = torch.exp(-(r**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    ref = g[:, None, None] * g[None, :, None] * g[None, None, :]
    torch.testing.assert_close(vol, ref, atol=1e-2 * float(ref.max()), rtol=0)


def test_gaussians_to_map_gradcheck():
    coords = torch.tensor(
        [[0.3, -0.8, 0.5], [-1.1, 0.6, 0.2]], dtype=torch.float64, requires_grad=True
    )
    sigma = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    amps = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c, s, a: gaussians_to_map(c, 5, 0.8, s, amplitudes=a), (coords, sigma, amps)
    )


@pytest.mark.parametrize("box", [16, 17])
def test_gaussians_to_images_identity_is_line_integral(box, gen):
    coords = (torch.rand(6, 3, generator=gen, dtype=torch.float64) - 0.5) * 10
    amps = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    eye = torch.eye(3, dtype=torch.float64)
    img = gaussians_to_images(coords, eye, box, 1.5, 1.3, amplitudes=amps)
    vol = gaussians_to_map(coords, box, 1.5, 1.3, amplitudes=amps)
    assert img.shape == (box, box)
    torch.testing.assert_close(img, vol.sum(-3) * 1.5, atol=1e-10, rtol=1e-6)


def test_gaussians_to_images_rotation_and_broadcast(gen):
    coords = (torch.rand(6, 3, generator=gen, dtype=torch.float64) - 0.5) * 10
    rots = random_rotations(3, gen, dtype=torch.float64)
    imgs = gaussians_to_images(coords, rots, 17, 1.5, 1.3)
    assert imgs.shape == (3, 17, 17)
    for i in range(3):
        rotated = coords @ rots[i].T  # r_mic = R r_vol
        ref = gaussians_to_map(rotated, 17, 1.5, 1.3).sum(-3) * 1.5
        torch.testing.assert_close(imgs[i], ref, atol=1e-10, rtol=1e-6)
    # 90 degrees about z: volume +x becomes microscope +y.
    rz = rotation_about_axis("z", math.pi / 2)
    img = gaussians_to_images(
        torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64), rz, 17, 1.0, 0.4
    )
    assert np.unravel_index(int(img.argmax()), img.shape) == (8 + 3, 8)


def test_gaussians_to_images_gradcheck():
    coords = torch.tensor(
        [[0.3, -0.8, 0.5], [-1.1, 0.6, 0.2]], dtype=torch.float64, requires_grad=True
    )
    rot = rotation_about_axis("y", 0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c, r: gaussians_to_images(c, r, 6, 0.8, 0.9), (coords, rot)
    )


def test_gaussians_bad_inputs():
    with pytest.raises(InputError, match="sigma"):
        gaussians_to_map(torch.zeros(1, 3), 8, 1.0, 0.0)
    with pytest.raises(InputError, match="N, 3"):
        gaussians_to_map(torch.zeros(4, 2), 8, 1.0, 1.0)
