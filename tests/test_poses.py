"""Pose search: the SO(3) grid, reference slices, global search over rotations and shifts,
local (coarse-to-fine) search, soft assignment."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import random_rotations, rotation_angle
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.fourier_slice import full_to_half
from cryoprior.physics.projection import Projector, gaussian_blobs
from cryoprior.physics.simulator import (
    ParticleRenderer,
    SimulationConfig,
    draw_particle_parameters,
)
from cryoprior.solvers.pose_frames import perturb_poses
from cryoprior.solvers.pose_grids import shift_offsets, so3_grid
from cryoprior.solvers.pose_reference import BandModel, ReferenceProjector
from cryoprior.solvers.poses import global_search, local_search, refine_local

BOX, PX = 32, 2.0  # 64 Å box


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_map(seed: int = 0, box: int = BOX) -> torch.Tensor:
    """Twelve Gaussian blobs (σ 1.5 px) of random heights inside 10 px: no symmetry."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(12, 3, generator=g, dtype=torch.float64)
    radius = 10 * (0.4 + 0.6 * torch.rand(12, 1, generator=g, dtype=torch.float64))
    heights = 0.5 + torch.rand(12, generator=g, dtype=torch.float64)
    return gaussian_blobs(c / c.norm(dim=-1, keepdim=True) * radius, 1.5, box, heights).float()


def particle_poses(n: int, seed: int, max_shift: float = 4.0):
    """Uniform poses, shifts (Å) and CTFs at 0.5-1 µm defocus (its point-spread function
    stays inside the 64 Å box, which the search's model assumes)."""
    config = SimulationConfig(
        n_particles=n, max_shift=max_shift, seed=seed, defocus_min=5000.0, defocus_max=10000.0
    )
    rotations, shifts, ctf = draw_particle_parameters(config, BOX, PX)
    return rotations.double(), torch.as_tensor(shifts), CTFParams.from_particles(ctf)


def render(volume, rotations, shifts, ctf):
    """Noiseless particle images from the simulator (CTF on the padded grid, then crop)."""
    renderer = ParticleRenderer(Volume(volume, PX), pad=2.0)
    return renderer.render(rotations.float(), shifts.numpy(), ctf)


@pytest.fixture(scope="module")
def toy():
    volume = blob_map()
    rotations, shifts, ctf = particle_poses(32, seed=1)
    return volume, rotations, shifts, ctf, render(volume, rotations, shifts, ctf)


def degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(rotation_angle(a, b))


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("step", [15.0, 30.0])
def test_so3_grid_covers_so3_within_the_step(step):
    grid = so3_grid(step)
    delta = math.radians(step)
    assert grid.dtype == torch.float64
    # about one rotation per cell of volume Δ³ of SO(3) (volume 8π²)
    assert 0.8 < grid.shape[0] / (8 * math.pi**2 / delta**3) < 1.5
    eye = torch.eye(3, dtype=torch.float64).expand_as(grid)
    torch.testing.assert_close(grid.transpose(-1, -2) @ grid, eye, atol=1e-12, rtol=0)
    assert bool((torch.linalg.det(grid) > 0).all())
    # every random rotation lies within a step of the grid (measured: < 0.85 step)
    rotations = random_rotations(3000, torch.Generator().manual_seed(0), torch.float64)
    trace = torch.einsum("rij,gij->rg", rotations, grid)
    nearest = torch.rad2deg(torch.arccos(((trace.amax(1) - 1) / 2).clamp(-1, 1)))
    assert float(nearest.max()) < 0.9 * step
    assert 0.4 * step < float(nearest.mean()) < 0.55 * step


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("box", [32, 33])
def test_reference_slices_match_projections_and_ctf_layouts(box):
    # slices of the Fourier-cropped, padded map equal the spectra of real projections on
    # the band (trilinear interpolation: a few per cent); CTF values agree in every layout
    volume = blob_map(box=box)
    reference = ReferenceProjector.from_volume(volume, PX, 6.0)
    assert reference.box == 24 and reference.band == pytest.approx(box * PX / 6.0)
    assert float(reference.weight.sum()) == reference.n_coefficients
    rotations = random_rotations(6, torch.Generator().manual_seed(2), torch.float64)
    images = Projector(volume, 2.0, "cubic").project(rotations.float())
    got = reference.slices(rotations)
    want = reference.image_spectra(images)
    error = (got - want).abs().norm() / want.abs().norm()
    assert float(error) < 0.03, float(error)
    _, _, ctf = particle_poses(6, seed=3)
    from_params = reference.ctf_values(ctf, box)
    full = compute_ctf(ctf, (box, box), PX)
    torch.testing.assert_close(reference.ctf_values(full, box), from_params, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        reference.ctf_values(full_to_half(full), box), from_params, atol=1e-5, rtol=0
    )


def test_global_scores_are_the_band_misfit():
    # the score of a pose (one rotation, one shift) is −Σ_band |X − CTF P e^{iφ}|² / 2σ²
    volume = blob_map()
    rotations, shifts, ctf = particle_poses(4, seed=5)
    images = render(volume, rotations, shifts, ctf)
    noise_var = 0.5
    for j in range(2):
        found = global_search(
            volume, images, ctf, PX, band=8.0, grid=rotations[j : j + 1], noise_var=noise_var
        )
        reference = ReferenceProjector.from_volume(volume, PX, 8.0)
        model = BandModel(reference, reference.ctf_values(ctf, BOX))
        spectra = model.spectra(rotations[j].expand(1, 4, 3, 3), torch.zeros(4, 2))[0]
        data = reference.image_spectra(images)
        misfit = (reference.weight * (data - spectra).abs() ** 2).sum(-1).double()
        sigma2 = noise_var * BOX**2
        torch.testing.assert_close(found.scores, -misfit / (2 * sigma2), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(found.noise, torch.full((4,), sigma2, dtype=torch.float64))


# ----------------------------------------------------------------------------- global search


def test_global_search_recovers_poses_of_noiseless_ctf_projections(toy):
    # (a) the best rotation of a 15° grid is within the step of the truth (measured: mean
    # 0.52 step, max 0.90 step); shifts (|s| ≤ 4 Å, off the pixel lattice) within a pixel
    volume, rotations, shifts, ctf, images = toy
    step = 15.0
    found = global_search(volume, images, ctf, PX, band=8.0, step_deg=step, max_shift=6.0)
    error = degrees(found.rotations, rotations)
    assert float(error.max()) < step, error
    assert float(error.mean()) < 0.6 * step
    assert float((found.shifts - shifts).norm(dim=-1).max()) < PX
    assert found.rotations.dtype == torch.float64 and found.shifts.shape == (32, 2)


def test_shift_search_recovers_integer_and_subgrid_shifts():
    # (b) with the true rotations in the grid, integer-pixel shifts are found exactly and
    # sub-pixel ones to the nearest lattice point (within half a pixel per axis)
    volume = blob_map()
    rotations, _, ctf = particle_poses(6, seed=4)
    integer = torch.tensor([[2.0, -3.0], [-4.0, 1.0], [0.0, 0.0], [3.0, 3.0], [-1.0, -4.0]])
    subgrid = torch.tensor([[1.3, -0.6], [-2.7, 2.2], [0.45, 3.4], [-3.3, -1.2], [2.6, 0.1]])
    for pixels in (integer, subgrid):
        shifts = torch.cat([pixels, torch.tensor([[1.0, 0.5]])]).double() * PX
        images = render(volume, rotations, shifts, ctf)
        found = global_search(volume, images, ctf, PX, band=6.0, grid=rotations, max_shift=6 * PX)
        assert float(degrees(found.rotations, rotations).max()) < 1e-3
        moved = (found.shifts - shifts) / PX
        assert float(moved.abs().max()) <= 0.5 + 1e-6 and float(moved.norm(dim=-1).max()) < 1.0
        if pixels is integer:
            assert float(moved[:5].abs().max()) < 1e-9
    # a finer lattice follows sub-pixel shifts more closely
    finer = global_search(
        volume, images, ctf, PX, band=6.0, grid=rotations, max_shift=6 * PX, shift_step=PX / 4
    )
    assert float(((finer.shifts - shifts) / PX).abs().max()) <= 0.125 + 1e-6


def test_global_search_chunking_does_not_change_the_result(toy):
    volume, rotations, shifts, ctf, images = toy
    grid = so3_grid(30.0)
    kwargs = dict(band=8.0, grid=grid, max_shift=4.0, top_k=3)
    plain = global_search(volume, images[:10], ctf.index(slice(0, 10)), PX, **kwargs)
    chunked = global_search(
        volume,
        images[:10],
        ctf.index(slice(0, 10)),
        PX,
        image_batch=3,
        values_per_chunk=500,
        slice_values=0,
        **kwargs,
    )
    torch.testing.assert_close(chunked.rotations, plain.rotations)
    torch.testing.assert_close(chunked.top_shifts, plain.top_shifts)
    torch.testing.assert_close(chunked.scores, plain.scores, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- soft assignment


def test_soft_assignment_weights(toy):
    # (d) noisy images: the K best poses carry weights that sum to 1, best first, and the
    # hard pose is the top-weighted one; the scale-free score ignores the map's scale
    volume, rotations, shifts, ctf, images = toy
    g = torch.Generator().manual_seed(3)
    sigma = float(images.std()) * 2.0
    noisy = images + sigma * torch.randn(images.shape, generator=g)
    found = global_search(
        volume,
        noisy,
        ctf,
        PX,
        band=8.0,
        step_deg=20.0,
        max_shift=4.0,
        top_k=5,
        noise_var=sigma**2,
    )
    assert found.weights.shape == (32, 5) and found.top_rotations.shape == (32, 5, 3, 3)
    torch.testing.assert_close(found.weights.sum(-1), torch.ones(32, dtype=torch.float64))
    assert bool((found.weights[:, :-1] >= found.weights[:, 1:]).all())
    assert bool((found.weights.argmax(-1) == 0).all())
    torch.testing.assert_close(found.top_rotations[:, 0], found.rotations)
    torch.testing.assert_close(found.top_shifts[:, 0], found.shifts)
    assert float(found.weights[:, 0].min()) < 0.99  # noise leaves some weight elsewhere
    # normalised correlation: the same poses for a map three times as strong
    kwargs = dict(band=8.0, step_deg=20.0, max_shift=4.0, top_k=3, score="correlation")
    one = global_search(volume, noisy, ctf, PX, **kwargs)
    three = global_search(3 * volume, noisy, ctf, PX, **kwargs)
    torch.testing.assert_close(three.rotations, one.rotations)
    torch.testing.assert_close(three.weights, one.weights, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- local search


def test_local_search_refines_perturbed_poses(toy):
    # (c) poses 5° and 1 Å off: coarse to fine (2°, 1°, 0.5°) brings them within ~1°
    volume, rotations, shifts, ctf, images = toy
    start_r, start_s = perturb_poses(rotations, shifts, 5.0, 1.0, seed=2)
    found = refine_local(
        volume,
        images,
        ctf,
        PX,
        start_r,
        start_s,
        band=6.0,
        steps_deg=(2.0, 1.0, 0.5),
        radius_deg=8.0,
        max_shift=2.0,
        shift_step=PX / 2,
        top_k=3,
    )
    error = degrees(found.rotations, rotations)
    assert float(error.mean()) < 1.0 and float(error.max()) < 2.0, error
    assert float((found.shifts - shifts).norm(dim=-1).max()) < 0.5 * PX
    torch.testing.assert_close(found.weights.sum(-1), torch.ones(32, dtype=torch.float64))
    # one pass with finer levels, and a prior on the move, also converge
    levels = local_search(
        volume,
        images,
        ctf,
        PX,
        start_r,
        start_s,
        band=6.0,
        radius_deg=8.0,
        step_deg=3.0,
        levels=3,
        max_shift=2.0,
        prior_deg=5.0,
    )
    assert float(degrees(levels.rotations, rotations).mean()) < 1.5


# ----------------------------------------------------------------------------- validation


def test_inputs_are_validated(toy):
    volume, rotations, shifts, ctf, images = toy
    with pytest.raises(InputError, match="Nyquist"):
        global_search(volume, images, ctf, PX, band=3.0)
    with pytest.raises(InputError, match="like the map"):
        global_search(volume, images[:, :16, :16], ctf, PX, band=8.0)
    with pytest.raises(InputError, match="CTFs"):
        global_search(volume, images[:4], ctf, PX, band=8.0)
    with pytest.raises(InputError, match="score"):
        global_search(volume, images, ctf, PX, band=8.0, score="ncc")
    with pytest.raises(InputError, match="shifts"):
        local_search(
            volume, images, ctf, PX, rotations, shifts[:3], band=8.0, radius_deg=5, step_deg=2
        )
    with pytest.raises(InputError, match="top_k"):
        refine_local(volume, images, ctf, PX, rotations, shifts, band=8.0, top_k=0)
    with pytest.raises(InputError, match="noise variance"):
        global_search(volume, images, ctf, PX, band=8.0, step_deg=60.0, noise_var=[1.0, 2.0])
    with pytest.raises(InputError):
        so3_grid(0.0)
    assert shift_offsets(0.0, 1.0).shape == (1, 2)
    disc = shift_offsets(3.0, 1.0)
    assert disc.shape == (29, 2) and float(disc[0].abs().max()) == 0.0


def test_an_images_mean_does_not_move_its_pose(toy):
    # the DC term weighs 0: an offset (set by background normalisation in real data) must
    # not change the best pose under the normalised correlation (with DC counted, noise
    # images were sorted into poses by the sign of their mean: Einstein from noise)
    volume, rotations, shifts, ctf, images = toy
    g = torch.Generator().manual_seed(3)
    noisy = images + 2.0 * images.std() * torch.randn(images.shape, generator=g)
    offset = noisy + 5.0 * noisy.std() * torch.randn(32, 1, 1, generator=g)
    kw = dict(band=8.0, step_deg=15.0, max_shift=4.0, score="correlation")
    a = global_search(volume, noisy, ctf, PX, **kw)
    b = global_search(volume, offset, ctf, PX, **kw)
    torch.testing.assert_close(a.rotations, b.rotations)
    torch.testing.assert_close(a.shifts, b.shifts)
