"""CTF: RELION's formula and signs, astigmatism, envelope, zeros, application, flipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fft2_c
from cryoprior.physics.ctf import (
    CTFParams,
    apply_ctf,
    compute_ctf,
    ctf_zero_frequencies,
    electron_wavelength,
    evaluate_ctf,
    phase_flip,
)


def relion_ctf_numpy(shape, px, du, dv, ang_rad, kv, cs_mm, q0, phase_rad, bfac):
    """RELION's getCTF written literally (ctf.cpp initialise + ctf.h getCTF), in numpy."""
    h, w = shape
    y = (np.arange(h) - h // 2) / (h * px)
    x = (np.arange(w) - w // 2) / (w * px)
    X, Y = np.meshgrid(x, y)  # X varies along columns (x), Y along rows (y)
    local_cs = cs_mm * 1e7
    local_kv = kv * 1e3
    lam = 12.2643247 / np.sqrt(local_kv * (1.0 + local_kv * 0.978466e-6))
    defocus_average = -(du + dv) * 0.5
    defocus_deviation = -(du - dv) * 0.5
    K1 = np.pi / 2 * 2 * lam
    K2 = np.pi / 2 * local_cs * lam**3
    K3 = np.arctan(q0 / np.sqrt(1 - q0 * q0))
    K4 = -bfac / 4.0
    K5 = phase_rad
    u2 = X * X + Y * Y
    u4 = u2 * u2
    deltaf = defocus_average + defocus_deviation * np.cos(2 * (np.arctan2(Y, X) - ang_rad))
    argument = K1 * deltaf * u2 + K2 * u4 - K5 - K3
    return -np.sin(argument) * np.exp(K4 * u2)


PARAMS = dict(
    defocus_u=15000.0,
    defocus_v=12500.0,
    defocus_angle=math.radians(30.0),
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    phase_shift=0.3,
    bfactor=40.0,
)


def test_wavelength_known_values():
    # lambda = h / sqrt(2 m0 e V (1 + e V / (2 m0 c^2))) from CODATA constants, in Å.
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    for kv in (100.0, 200.0, 300.0):
        v = kv * 1e3
        lam = h / math.sqrt(2 * m0 * e * v * (1 + e * v / (2 * m0 * c**2))) * 1e10
        assert electron_wavelength(kv) == pytest.approx(lam, rel=1e-5)
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=1e-6)
    assert float(
        electron_wavelength(torch.tensor([300.0], dtype=torch.float64))[0]
    ) == pytest.approx(electron_wavelength(300.0), rel=1e-12)


@pytest.mark.parametrize("shape", [(16, 20), (17, 15)])
def test_matches_relion_formula(shape):
    params = CTFParams(**PARAMS)
    ctf = compute_ctf(params, shape, 1.3, dtype=torch.float64)
    assert ctf.shape == (1, *shape)
    ref = relion_ctf_numpy(
        shape, 1.3, 15000.0, 12500.0, math.radians(30.0), 300.0, 2.7, 0.1, 0.3, 40.0
    )
    np.testing.assert_allclose(ctf[0].numpy(), ref, atol=1e-12)


def test_hand_computed_value():
    # Non-astigmatic, Cs = 0, no phase shift, one frequency s = 0.1 cycles/Å along x.
    params = CTFParams(
        defocus_u=10000.0,
        defocus_v=10000.0,
        defocus_angle=0.0,
        voltage=300.0,
        cs=0.0,
        amplitude_contrast=0.07,
    )
    lam = 12.2643247 / math.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    chi = math.pi * lam * 10000.0 * 0.01
    expected = math.sqrt(1 - 0.07**2) * math.sin(chi) + 0.07 * math.cos(chi)
    got = evaluate_ctf(params, torch.tensor([0.1, 0.0], dtype=torch.float64), torch.float64)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_sign_convention_relion():
    # RELION: CTF(0) = +Q0 and, under focus, the first lobe is positive.
    params = CTFParams(**{**PARAMS, "phase_shift": 0.0})
    ctf = compute_ctf(params, (64, 64), 2.0, dtype=torch.float64)[0]
    assert float(ctf[32, 32]) == pytest.approx(0.1, abs=1e-12)
    assert float(ctf[32, 34]) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zeros_cs0(dtype):
    defocus, kv = 20000.0, 300.0
    lam = electron_wavelength(kv)
    zeros = ctf_zero_frequencies(defocus, kv, 4)
    np.testing.assert_allclose(zeros, np.sqrt(np.arange(1, 5) / (lam * defocus)), rtol=1e-12)
    params = CTFParams(
        defocus_u=defocus,
        defocus_v=defocus,
        defocus_angle=0.0,
        voltage=kv,
        cs=0.0,
        amplitude_contrast=0.0,
    )
    angles = torch.tensor([0.0, 0.7, 2.0], dtype=torch.float64)
    s = torch.as_tensor(zeros)[:, None]
    freqs = torch.stack([s * torch.cos(angles), s * torch.sin(angles)], -1).to(dtype)
    vals = evaluate_ctf(params, freqs, dtype)
    assert vals.abs().max() < (1e-4 if dtype == torch.float32 else 1e-10)
    # Half-way between zeros the CTF is far from zero.
    mid = torch.sqrt(torch.tensor([1.5 / (lam * defocus)], dtype=dtype))
    assert float(evaluate_ctf(params, torch.stack([mid, 0 * mid], -1), dtype).abs()) > 0.9


def test_zeros_with_cs_and_amplitude_contrast():
    zeros = ctf_zero_frequencies(12000.0, 200.0, 5, cs=2.0, amplitude_contrast=0.1, phase_shift=0.2)
    params = CTFParams(
        defocus_u=12000.0,
        defocus_v=12000.0,
        defocus_angle=0.0,
        voltage=200.0,
        cs=2.0,
        amplitude_contrast=0.1,
        phase_shift=0.2,
    )
    freqs = torch.stack([torch.as_tensor(zeros), torch.zeros(5, dtype=torch.float64)], -1)
    assert evaluate_ctf(params, freqs, torch.float64).abs().max() < 1e-10
    assert np.all(np.diff(zeros) > 0)


def test_astigmatism_orientation():
    du, dv, alpha = 20000.0, 10000.0, math.radians(35.0)
    params = CTFParams(
        defocus_u=du,
        defocus_v=dv,
        defocus_angle=alpha,
        voltage=300.0,
        cs=0.0,
        amplitude_contrast=0.0,
    )
    lam = electron_wavelength(300.0)
    s_u, s_v = math.sqrt(1 / (lam * du)), math.sqrt(1 / (lam * dv))
    along_u = torch.tensor([s_u * math.cos(alpha), s_u * math.sin(alpha)], dtype=torch.float64)
    beta = alpha + math.pi / 2
    along_v = torch.tensor([s_v * math.cos(beta), s_v * math.sin(beta)], dtype=torch.float64)
    assert abs(float(evaluate_ctf(params, along_u, torch.float64))) < 1e-10
    assert abs(float(evaluate_ctf(params, along_v, torch.float64))) < 1e-10
    # ...but not with the axes swapped.
    swapped = torch.tensor([s_u * math.cos(beta), s_u * math.sin(beta)], dtype=torch.float64)
    assert abs(float(evaluate_ctf(params, swapped, torch.float64))) > 0.5


def test_defocus_angle_rotates_pattern():
    gen = torch.Generator().manual_seed(0)
    freqs = (torch.rand(50, 2, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    delta = 0.6
    rot = torch.tensor(
        [[math.cos(delta), -math.sin(delta)], [math.sin(delta), math.cos(delta)]],
        dtype=torch.float64,
    )
    p0 = CTFParams(**{**PARAMS, "defocus_angle": 0.2})
    p1 = CTFParams(**{**PARAMS, "defocus_angle": 0.2 + delta})
    a = evaluate_ctf(p0, freqs, torch.float64)
    b = evaluate_ctf(p1, freqs @ rot.T, torch.float64)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_bfactor_envelope():
    base = CTFParams(**{**PARAMS, "bfactor": 0.0})
    damped = CTFParams(**{**PARAMS, "bfactor": 120.0})
    freqs = torch.tensor([[0.05, 0.01], [0.1, -0.07], [0.2, 0.15]], dtype=torch.float64)
    ratio = evaluate_ctf(damped, freqs, torch.float64) / evaluate_ctf(base, freqs, torch.float64)
    s2 = (freqs**2).sum(-1)
    torch.testing.assert_close(ratio[0], torch.exp(-120.0 * s2 / 4), atol=1e-12, rtol=1e-10)


def test_batch_broadcast_and_index():
    params = CTFParams(
        defocus_u=torch.tensor([10000.0, 15000.0, 20000.0]),
        defocus_v=12000.0,
        defocus_angle=0.0,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
    )
    assert len(params) == 3
    ctf = compute_ctf(params, (12, 12), 1.5)
    assert ctf.shape == (3, 12, 12) and ctf.dtype == torch.float32
    sub = params.index(torch.tensor([2, 0]))
    torch.testing.assert_close(compute_ctf(sub, (12, 12), 1.5), ctf[[2, 0]])
    torch.testing.assert_close(compute_ctf(params.index(1), (12, 12), 1.5), ctf[1:2])
    torch.testing.assert_close(compute_ctf(params.index(np.array([1])), (12, 12), 1.5), ctf[1:2])


def test_from_particles_degrees():
    particles = {
        "defocus_u": np.array([15000.0, 16000.0]),
        "defocus_v": np.array([14000.0, 15500.0]),
        "defocus_angle": np.array([30.0, 120.0]),
        "voltage": np.array([300.0, 300.0]),
        "cs": np.array([2.7, 2.7]),
        "amplitude_contrast": np.array([0.1, 0.1]),
        "phase_shift": np.array([0.0, 90.0]),
    }
    p = CTFParams.from_particles(particles, degrees=True)
    torch.testing.assert_close(
        p.defocus_angle, torch.deg2rad(torch.tensor([30.0, 120.0], dtype=torch.float64))
    )
    torch.testing.assert_close(p.phase_shift, torch.tensor([0.0, math.pi / 2], dtype=torch.float64))
    assert float(p.bfactor.abs().sum()) == 0.0
    r = CTFParams.from_particles({**particles, "defocus_angle": np.array([0.5, 1.0])})
    assert float(r.defocus_angle[1]) == 1.0
    with pytest.raises(InputError, match="defocus_v"):
        CTFParams.from_particles({k: v for k, v in particles.items() if k != "defocus_v"})


def test_invalid_params():
    with pytest.raises(InputError, match="amplitude contrast"):
        CTFParams(**{**PARAMS, "amplitude_contrast": 1.5})
    with pytest.raises(InputError, match="lengths"):
        CTFParams(**{**PARAMS, "defocus_u": torch.ones(3), "defocus_v": torch.ones(2)})
    with pytest.raises(InputError, match="voltage"):
        CTFParams(**{**PARAMS, "voltage": 0.0})


@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_ctf_spectrum_and_psf(n, dtype):
    params = CTFParams(**PARAMS)
    ctf = compute_ctf(params, (n, n), 2.0, dtype=dtype)
    delta = torch.zeros(1, n, n, dtype=dtype)
    delta[0, n // 2, n // 2] = 1.0
    psf = apply_ctf(delta, ctf)
    assert psf.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    spectrum = fft2_c(psf)
    inner = slice(1, None) if n % 2 == 0 else slice(None)  # even n: skip the Nyquist lines
    torch.testing.assert_close(
        spectrum.real[..., inner, inner], ctf[..., inner, inner], atol=tol, rtol=0
    )
    torch.testing.assert_close(spectrum.imag, torch.zeros_like(ctf), atol=tol, rtol=0)
    if n % 2 == 0:  # the unpaired Nyquist line carries the mean of the CTF at +-f
        mean = 0.5 * (ctf[..., 0, 1:] + ctf[..., 0, 1:].flip(-1))
        torch.testing.assert_close(spectrum.real[..., 0, 1:], mean, atol=tol, rtol=0)


@pytest.mark.parametrize("n", [16, 17])
def test_phase_flip_makes_transfer_nonnegative(n, gen):
    params = CTFParams(
        defocus_u=torch.tensor([8000.0, 20000.0]),
        defocus_v=9000.0,
        defocus_angle=0.4,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
    )
    ctf = compute_ctf(params, (n, n), 1.5, dtype=torch.float64)
    images = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
    flipped = phase_flip(apply_ctf(images, ctf), ctf)
    inner = slice(1, None) if n % 2 == 0 else slice(None)  # even n: skip the Nyquist lines
    transfer = (fft2_c(flipped) / fft2_c(images))[..., inner, inner]
    assert transfer.real.min() >= -1e-9
    torch.testing.assert_close(transfer.real, ctf.abs()[..., inner, inner], atol=1e-9, rtol=0)
    assert (ctf < 0).any()  # the test would be vacuous otherwise
