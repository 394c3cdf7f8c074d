"""Pieces of the native-resolution volume prior: the box-independent U-Net, map patches,
Fourier resizing, the native grid plan and the simulator's unrecorded envelope."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.data.patches import MapPatchDataset, bfactor_blur, cube_rotations, rotate_cube
from cryoprior.geometry.fft import fft3_c
from cryoprior.io.star import read_particles
from cryoprior.networks.unet import UNet
from cryoprior.physics.degrade import fourier_resize
from cryoprior.physics.projection import crop_centred, gaussian_blobs
from cryoprior.physics.simulator import ParticleRenderer, SimulationConfig, simulate_particles
from cryoprior.solvers.grid_plan import native_plan


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pixel_unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(3, 1, 1, base_channels=8, channel_mults=(1, 2, 4), norm="pixel")
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return net.eval()


def test_pixel_norm_unet_takes_any_box_and_commutes_with_shifts():
    net = _pixel_unet()
    with torch.no_grad():
        for size in (48, 64):
            assert net(torch.randn(1, 1, size, size, size), 0.3).shape == (1, 1, size, size, size)
    # the shipped prior on two windows of one field, shifted by 8 voxels: away from the
    # edges the outputs agree (the same voxel seen from two boxes)
    from cryoprior.diffusion import per_sample_time
    from cryoprior.priors import load_prior

    den = load_prior("volume_native").denoiser.eval()
    big = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    t = per_sample_time(0.3, big)
    with torch.no_grad():
        a = den(big[..., :48, :48, :48], t).x0
        b = den(big[..., 8:56, 8:56, 8:56], t).x0
    same = (a[..., 20:28, 20:28, 20:28] - b[..., 12:20, 12:20, 12:20]).abs().max()
    other = (a[..., 20:28, 20:28, 20:28] - b[..., 20:28, 20:28, 20:28]).abs().max()
    assert float(same) < 0.01 * float(a.abs().max()) < float(other)


def test_pixel_norm_options_are_checked_and_recorded():
    with pytest.raises(InputError, match="attention"):
        UNet(3, 1, 1, base_channels=8, norm="pixel", attention=True)
    with pytest.raises(InputError, match="norm"):
        UNet(3, 1, 1, base_channels=8, norm="batch")
    assert _pixel_unet().config["norm"] == "pixel"
    assert "norm" not in UNet(3, 1, 1, base_channels=8).config


def test_cube_rotations_are_the_24_proper_ones_and_never_mirror():
    mats = []
    for perm, flips in cube_rotations():
        m = np.zeros((3, 3))
        for i, p in enumerate(perm):
            m[i, p] = -1.0 if i in flips else 1.0
        mats.append(m)
    assert len({m.tobytes() for m in mats}) == 24
    assert all(np.linalg.det(m) == pytest.approx(1.0) for m in mats)
    chiral = torch.zeros(5, 5, 5)
    chiral[2, 2, 2] = chiral[2, 2, 3] = chiral[2, 3, 2] = chiral[3, 2, 2] = 1.0
    chiral[2, 2, 4] = 2.0
    chiral[2, 4, 2] = 3.0
    mirror = torch.flip(chiral, [0])
    images = [rotate_cube(chiral, k) for k in range(24)]
    assert not any(torch.equal(im, mirror) for im in images)
    assert any(torch.equal(rotate_cube(mirror, k), torch.flip(chiral, [1])) for k in range(24))
    assert all(
        torch.equal(im.flatten().sort().values, chiral.flatten().sort().values) for im in images
    )


def test_bfactor_blur_multiplies_the_spectrum_by_the_debye_waller_factor():
    x = torch.zeros(16, 16, 16, dtype=torch.float64)
    x[8, 8, 8] = 1.0
    assert torch.equal(bfactor_blur(x, 0.0, 1.5), x)
    amp = fft3_c(bfactor_blur(x, 80.0, 1.5)).abs()
    q = 3 / (16 * 1.5)  # frequency index 3 along x
    assert float(amp[8, 8, 11]) == pytest.approx(np.exp(-80.0 * q * q / 4), rel=1e-6)


def test_map_patches_are_reproducible_cuts_of_the_maps():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, 16, 16, 16, generator=g) for _ in range(3)]
    ds = MapPatchDataset(maps, 8, 1.5, 20, bfactor_extra=(0, 0), cube_rotations=False)
    assert ds[3].shape == (1, 8, 8, 8) and torch.equal(ds[3], ds[3])
    assert not torch.equal(ds[3], ds[4])
    d = ds.draw(3)
    assert all(0 <= d[a] <= 8 for a in "zyx")
    z, y, x = d["z"], d["y"], d["x"]
    assert torch.equal(ds[3], maps[d["map"]][:, z : z + 8, y : y + 8, x : x + 8])


def test_fourier_resize_round_trips_and_keeps_the_mean():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, 16, 16, generator=g, dtype=torch.float64)
    up = fourier_resize(v, (24, 24, 24), ndim=3)
    assert up.shape == (24, 24, 24) and float(up.mean()) == pytest.approx(float(v.mean()))
    assert torch.allclose(fourier_resize(up, (16, 16, 16), ndim=3), v, atol=1e-10)
    im = torch.randn(20, 20, generator=g, dtype=torch.float64)
    assert torch.allclose(fourier_resize(fourier_resize(im, (32, 32)), (20, 20)), im, atol=1e-10)


def test_native_plan_keeps_the_box_and_refuses_far_pixel_sizes():
    assert native_plan(64, 1.5, 1.5, 8).identity
    assert native_plan(100, 1.5, 1.5, 8).crop == 96
    plan = native_plan(128, 1.0, 1.5, 8)
    assert plan.target_box % 8 == 0
    assert plan.target_pixel_size == pytest.approx(1.5, rel=0.02)
    assert plan.crop * 1.0 == pytest.approx(plan.target_box * plan.target_pixel_size)
    with pytest.raises(InputError, match="finer.*bin"):
        native_plan(64, 0.5, 1.5)
    with pytest.raises(InputError, match="coarser.*invent"):
        native_plan(64, 2.0, 1.5)
    vol = gaussian_blobs(torch.zeros(1, 3), 3.0, 40)  # band-limited, centred
    plan = native_plan(40, 1.6, 1.5, 8)  # crop, then Fourier pad to the prior's grid
    assert plan.crop < 40 and plan.target_box > plan.crop
    on_prior = fourier_resize(crop_centred(vol, plan.crop, 3), (plan.target_box,) * 3, ndim=3)
    back = plan.map_back(on_prior)
    assert back.shape == (40, 40, 40)
    centre = (slice(14, 26),) * 3
    assert torch.allclose(back[centre], vol[centre], atol=1e-3)


def test_the_envelope_scales_the_spectrum_and_is_not_written(tmp_path):
    vol = gaussian_blobs(torch.tensor([[3.0, 0.0, -2.0]]), 3.0, 32).float()
    rot = torch.eye(3)[None]
    plain = ParticleRenderer(Volume(vol, 2.0)).render(rot, None, None)[0].double()
    blurred = ParticleRenderer(Volume(vol, 2.0), envelope_bfactor=100.0).render(rot, None, None)
    ratio = (
        torch.fft.fftshift(torch.fft.fft2(blurred[0].double()))
        / torch.fft.fftshift(torch.fft.fft2(plain))
    )[16, 16 + 4]
    s = 4 / (32 * 2.0)
    assert float(ratio.real) == pytest.approx(np.exp(-100.0 * s * s / 4), rel=1e-3)
    with pytest.raises(InputError, match="envelope"):
        SimulationConfig(n_particles=2, envelope_bfactor=-1.0).validate()
    sim = simulate_particles(
        Volume(vol, 2.0),
        SimulationConfig(n_particles=3, envelope_bfactor=60.0),
        tmp_path,
        show_progress=False,
    )
    particles = read_particles(sim.paths["star"])
    assert np.allclose(particles.bfactor, 0.0)
