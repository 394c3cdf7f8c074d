"""Pins the Wiener back-projection baseline: recovery of a known map from its projections
(with and without CTF), the three ways of giving CTFs, chunking, half maps, SSNR input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fft3_c
from cryoprior.geometry.grids import frequency_grid, shell_indices
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.projection import Projector, gaussian_blobs, padded_size, project
from cryoprior.physics.source import ParticleBatch
from cryoprior.solvers.backprojection import (
    half_map_reconstruct,
    reconstruct_source,
    wiener_reconstruct,
)

PIXEL = 2.0  # Å/px for the synthetic CTF
WAVELENGTH = 0.0197  # Å, 300 kV


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _truth(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    centres = (
        torch.tensor([[4.0, 0.0, -2.0], [-5.0, 3.0, 1.0], [0.0, -5.0, 4.0], [2.0, 3.0, -6.0]])
        * size
        / 24
    )
    return gaussian_blobs(
        centres, 1.5 * size / 24, size, torch.tensor([1.0, 0.7, 1.3, 0.9]), dtype=dtype
    )


def _ctf_fn(defocus: torch.Tensor):
    """A simple phase-contrast CTF, -sin(χ) with 10% amplitude contrast, χ = πλΔf|s|²."""

    def ctf(ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        s2 = frequency_grid(shape, PIXEL, torch.float64).pow(2).sum(-1)
        chi = math.pi * WAVELENGTH * defocus[ids, None, None] * s2
        return -(math.sqrt(1 - 0.01) * torch.sin(chi) + 0.1 * torch.cos(chi))

    return ctf


@pytest.mark.parametrize("size", [24, 25])
@pytest.mark.parametrize("kernel", ["linear", "cubic"])
def test_wiener_recovers_map_from_noiseless_projections(size, kernel, gen):
    truth = _truth(size)
    rot = random_rotations(500, gen, torch.float64)
    images = project(truth, rot)
    rec = wiener_reconstruct(images, rot, snr=100.0, kernel=kernel)
    assert rec.shape == truth.shape and rec.dtype == torch.float64
    assert _corr(rec, truth) > 0.95
    gain = float((rec * truth).sum() / (truth * truth).sum())
    assert 0.9 < gain < 1.1  # same units as project: project(rec) reproduces the images


def test_wiener_with_ctf_inverts_it(gen):
    size, n = 24, 400
    truth = _truth(size)
    rot = random_rotations(n, gen, torch.float64)
    defocus = 5000.0 + 10000.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    ctf = _ctf_fn(defocus)
    proj = Projector(truth)
    dp = proj.padded_size
    ids = torch.arange(n)
    images = proj.images_from_ft(proj.project_ft(rot) * ctf(ids, (dp, dp)))
    rec = wiener_reconstruct(images, rot, ctf, snr=100.0)
    assert _corr(rec, truth) > 0.9
    # The same CTFs given as a padded-grid tensor give the same map.
    padded = wiener_reconstruct(images, rot, ctf(ids, (dp, dp)), snr=100.0)
    torch.testing.assert_close(padded, rec, atol=1e-10, rtol=0)
    # On the image grid they are resampled: close, not identical.
    small = wiener_reconstruct(images, rot, ctf(ids, (size, size)), snr=100.0)
    assert _corr(small, rec) > 0.95
    # Ignoring the CTF does much worse.
    assert _corr(wiener_reconstruct(images, rot, snr=100.0), truth) < _corr(rec, truth) - 0.1


def test_chunking_does_not_change_the_map(gen):
    truth = _truth(16)
    rot = random_rotations(60, gen, torch.float64)
    images = project(truth, rot)
    torch.testing.assert_close(
        wiener_reconstruct(images, rot, chunk_size=7),
        wiener_reconstruct(images, rot),
        atol=1e-12,
        rtol=0,
    )


def test_float32_matches_float64(gen):
    truth = _truth(16)
    rot = random_rotations(80, gen, torch.float64)
    images = project(truth, rot)
    rec64 = wiener_reconstruct(images, rot)
    rec32 = wiener_reconstruct(images.float(), rot.float())
    assert rec32.dtype == torch.float32
    assert float((rec32.double() - rec64).norm() / rec64.norm()) < 1e-4


def test_half_maps_split_and_sum(gen):
    truth = _truth(16)
    n = 101
    rot = random_rotations(n, gen, torch.float64)
    images = project(truth, rot)
    res = half_map_reconstruct(images, rot, snr=10.0, seed=3)
    i1, i2 = res.split
    assert len(i1) == n // 2 and len(i2) == n - n // 2
    assert torch.equal(torch.cat([i1, i2]).sort().values, torch.arange(n))
    torch.testing.assert_close(
        res.full, wiener_reconstruct(images, rot, snr=10.0), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        res.half1, wiener_reconstruct(images[i1], rot[i1], snr=10.0), atol=1e-12, rtol=0
    )
    assert _corr(res.half1, res.half2) > 0.9
    again = half_map_reconstruct(images, rot, snr=10.0, seed=3)
    assert torch.equal(again.split[0], i1)
    assert not torch.equal(half_map_reconstruct(images, rot, seed=4).split[0], i1)


def test_per_shell_snr(gen):
    size = 16
    truth = _truth(size)
    rot = random_rotations(60, gen, torch.float64)
    images = project(truth, rot)
    scalar = wiener_reconstruct(images, rot, snr=5.0)
    shells = wiener_reconstruct(images, rot, snr=torch.full((size,), 5.0))
    torch.testing.assert_close(shells, scalar, atol=1e-12, rtol=0)
    # SSNR 0 beyond shell 3 removes those frequencies: the map is strongly low-passed.
    low = wiener_reconstruct(images, rot, snr=torch.tensor([5.0] * 4 + [0.0] * 20))
    shells = shell_indices((size,) * 3)

    def high_fraction(volume: torch.Tensor) -> float:
        power = fft3_c(volume).abs() ** 2
        return float(power[shells > 4].sum() / power.sum())

    assert high_fraction(scalar) > 0.05
    assert high_fraction(low) < 0.01


def test_reconstruction_rejects_bad_inputs(gen):
    rot = random_rotations(3, gen)
    images = torch.zeros(3, 8, 8)
    with pytest.raises(InputError, match="rotations"):
        wiener_reconstruct(images, rot[:2])
    with pytest.raises(InputError, match="CTF tensor"):
        wiener_reconstruct(images, rot, torch.ones(3, 9, 9))
    with pytest.raises(InputError, match="snr"):
        wiener_reconstruct(images, rot, snr=0.0)
    with pytest.raises(InputError, match="callable"):
        wiener_reconstruct(images, rot, lambda ids, shape: torch.ones(len(ids), 8, 8))


class _MemorySource:
    """A particle source held in memory, with the interface of physics.source.ParticleSource."""

    def __init__(self, images: torch.Tensor, rotations: torch.Tensor, ctf: CTFParams) -> None:
        self.images, self.rotations, self.ctf = images, rotations, ctf
        self.box, self.pixel_size = images.shape[-1], PIXEL

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size, indices=None, center=True, dtype=torch.float32):
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            sel = torch.from_numpy(idx)
            yield ParticleBatch(
                idx, self.images[sel].to(dtype), self.rotations[sel], self.ctf.index(sel)
            )


def _noisy_ctf_source(gen: torch.Generator, n: int, size: int, snr: float):
    truth = _truth(size)
    rot = random_rotations(n, gen, torch.float64)
    defocus = 6000.0 + 8000.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    params = CTFParams(
        defocus_u=defocus,
        defocus_v=defocus,
        defocus_angle=0.0,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
    )
    proj = Projector(truth)
    dp = proj.padded_size
    clean = proj.images_from_ft(
        proj.project_ft(rot) * compute_ctf(params, (dp, dp), PIXEL, torch.float64)
    )
    noise_sd = math.sqrt(float(clean.var()) / snr)
    images = clean + noise_sd * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    return truth, _MemorySource(images, rot, params)


def test_reconstruct_source_matches_half_maps_and_uses_fsc(gen):
    size, n = 24, 600
    truth, source = _noisy_ctf_source(gen, n, size, snr=0.5)
    res = reconstruct_source(source, ssnr=5.0, seed=2, batch_size=128, dtype=torch.float64)
    dp = padded_size(size, 2.0)
    ctf = compute_ctf(source.ctf, (dp, dp), PIXEL, torch.float64)
    ref = half_map_reconstruct(source.images, source.rotations, ctf, snr=5.0, seed=2)
    torch.testing.assert_close(res.full, ref.full, atol=1e-10, rtol=0)
    assert np.array_equal(res.split[0], ref.split[0].numpy())
    # The FSC-derived SSNR falls with frequency and beats a far too trusting constant.
    fsc_res = reconstruct_source(source, ssnr="fsc", seed=2, batch_size=128)
    assert fsc_res.full.dtype == torch.float32
    assert float(fsc_res.ssnr[1]) > 10 * float(fsc_res.ssnr[-1])
    trusting = reconstruct_source(source, ssnr=1e4, seed=2, batch_size=128)
    assert _corr(fsc_res.full.double(), truth) > _corr(trusting.full.double(), truth)
    assert _corr(fsc_res.full.double(), truth) > 0.9
    assert 2 * PIXEL <= fsc_res.fsc_halves.resolution_0143 < 20.0
