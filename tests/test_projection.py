"""Pins the projection operators: Fourier slice extraction/insertion, project/backproject.

Adjoint tests in float64 (even and odd sizes, both kernels), the pose convention (a blob at
x = +5 voxels lands where image(x, y) = Σ_z V(Rᵀ(x, y, z)) says), agreement with analytic
line integrals of Gaussian blobs and with the real-space reference, gradients, chunking.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fft2_c
from cryoprior.geometry.rotations import (
    axis_angle_to_matrix,
    random_rotations,
    rotation_about_axis,
)
from cryoprior.physics.fourier_slice import (
    corner_table,
    default_radius,
    extract_slices,
    full_to_half,
    half_to_full,
    insert_slices,
    irfft2_c,
    rfft2_c,
    slice_points,
    slice_shape,
)
from cryoprior.physics.projection import (
    Projector,
    backproject,
    gaussian_blobs,
    project,
    project_gaussian_blobs,
    project_real_space,
)

KERNELS = ["linear", "cubic"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _blob_set(size: int, reach: float) -> torch.Tensor:
    """Four blob centres (x, y, z) in voxels, the farthest at ``reach`` · size."""
    base = torch.tensor(
        [[1.0, 0.0, -0.5], [-1.0, 0.6, 0.3], [0.0, -1.0, 0.8], [0.4, 0.5, -1.0]],
        dtype=torch.float64,
    )
    return base * (reach * size / base.norm(dim=1).max())


def _views(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random poses plus the identity and a small tilt (views along the grid axes)."""
    return torch.cat(
        [
            random_rotations(n, gen, torch.float64),
            torch.eye(3, dtype=torch.float64)[None],
            rotation_about_axis("x", 0.3)[None],
        ]
    )


# --- layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 9])
def test_half_layout_round_trips(size, gen):
    x = torch.randn(3, size, size, dtype=torch.float64, generator=gen)
    full = fft2_c(x)
    half = rfft2_c(x)
    assert half.shape[-2:] == slice_shape(size, half=True)
    torch.testing.assert_close(full_to_half(full), half, atol=1e-12, rtol=0)
    torch.testing.assert_close(half_to_full(half, size), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(irfft2_c(half, size), x, atol=1e-12, rtol=0)


# --- Fourier slices -------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 11])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_extract_insert_are_adjoint(size, half, kernel, gen):
    rot = random_rotations(6, gen, torch.float64)
    vol = torch.randn(size, size, size, dtype=torch.complex128, generator=gen)
    sl = torch.randn(6, *slice_shape(size, half), dtype=torch.complex128, generator=gen)
    lhs = torch.vdot(extract_slices(vol, rot, half=half, kernel=kernel).reshape(-1), sl.reshape(-1))
    rhs = torch.vdot(
        vol.reshape(-1), insert_slices(sl, rot, size, half=half, kernel=kernel).reshape(-1)
    )
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


def test_identity_slice_is_central_plane_and_z_rotation_turns_it(gen):
    size = 12
    c = size // 2
    vol = torch.randn(size, size, size, dtype=torch.complex128, generator=gen)
    _, pos = slice_points(size, False, default_radius(size))
    eye = torch.eye(3, dtype=torch.float64)[None]
    got = extract_slices(vol, eye)[0].reshape(-1)[pos]
    torch.testing.assert_close(got, vol[c].reshape(-1)[pos], atol=1e-15, rtol=0)
    # Rz(+90°): the slice samples Rᵀ(kx, ky, 0) = (ky, -kx, 0), i.e. grid[kz=0, -kx, ky].
    rz = rotation_about_axis("z", math.pi / 2)[None]
    k = torch.arange(size) - c
    expected = vol[c][((c - k) % size)[None, :], (c + k)[:, None]]  # [ky, kx] <- [-kx, ky]
    got = extract_slices(vol, rz)[0].reshape(-1)[pos]
    torch.testing.assert_close(got, expected.reshape(-1)[pos], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_extract_uses_table_and_chunks_identically(kernel, gen):
    size = 14
    rot = random_rotations(9, gen)
    vol = torch.randn(size, size, size, dtype=torch.complex64, generator=gen)
    ref = extract_slices(vol, rot, kernel=kernel, chunk_size=100)
    tab = extract_slices(vol, rot, kernel=kernel, table=corner_table(vol, kernel))
    one = extract_slices(vol, rot, kernel=kernel, chunk_size=1)
    torch.testing.assert_close(tab, ref, atol=0, rtol=0)
    torch.testing.assert_close(one, ref, atol=0, rtol=0)
    sl = torch.randn(9, size, size, dtype=torch.complex64, generator=gen)
    torch.testing.assert_close(
        insert_slices(sl, rot, size, kernel=kernel, chunk_size=2),
        insert_slices(sl, rot, size, kernel=kernel),
        atol=1e-4,
        rtol=1e-5,
    )


def test_insert_with_weights_matches_two_insertions(gen):
    size = 10
    rot = random_rotations(4, gen, torch.float64)
    sl = torch.randn(4, size, size // 2 + 1, dtype=torch.complex128, generator=gen)
    w = torch.rand(4, size, size // 2 + 1, dtype=torch.float64, generator=gen)
    grid, wgrid = insert_slices(sl, rot, size, w, half=True)
    torch.testing.assert_close(grid, insert_slices(sl, rot, size, half=True))
    torch.testing.assert_close(wgrid, insert_slices(w, rot, size, half=True))
    assert wgrid.dtype == torch.float64


def test_slice_functions_reject_bad_inputs():
    vol = torch.zeros(8, 8, 8, dtype=torch.complex64)
    with pytest.raises(InputError, match="orthonormal"):
        extract_slices(vol, 2 * torch.eye(3)[None])
    with pytest.raises(InputError, match="cubic"):
        extract_slices(torch.zeros(8, 8, 9, dtype=torch.complex64), torch.eye(3)[None])
    with pytest.raises(InputError, match="radius"):
        extract_slices(vol, torch.eye(3)[None], radius=4)
    with pytest.raises(InputError, match="kernel"):
        extract_slices(vol, torch.eye(3)[None], kernel="nearest")
    with pytest.raises(InputError, match="shape"):
        insert_slices(torch.zeros(2, 8, 8), torch.eye(3)[None], 8)


# --- projection and its adjoint ---------------------------------------------------------


@pytest.mark.parametrize("size", [16, 17])
@pytest.mark.parametrize("pad", [2.0, 1.5])
@pytest.mark.parametrize("kernel", KERNELS)
def test_project_backproject_are_adjoint(size, pad, kernel, gen):
    rot = random_rotations(5, gen, torch.float64)
    x = torch.randn(size, size, size, dtype=torch.float64, generator=gen)
    y = torch.randn(5, size, size, dtype=torch.float64, generator=gen)
    lhs = (project(x, rot, pad, kernel=kernel) * y).sum()
    rhs = (x * backproject(y, rot, pad, kernel=kernel)).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * abs(float(lhs))


@pytest.mark.parametrize("size", [24, 25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pose_convention_pins_blob_position(size, dtype):
    # A blob at (x=+5, 0, 0): the identity puts it at image [D//2, D//2+5]; the active
    # rotation by +90° about z maps (5, 0, 0) to (0, 5, 0): image [D//2+5, D//2].
    vol = gaussian_blobs(torch.tensor([[5.0, 0.0, 0.0]]), 1.5, size, dtype=dtype)
    rot = torch.stack(
        [
            torch.eye(3, dtype=torch.float64),
            rotation_about_axis("z", math.pi / 2),
            rotation_about_axis("y", math.pi / 2),
        ]
    ).to(dtype)
    c = size // 2
    for images in (project(vol, rot), project_real_space(vol, rot)):
        assert images.dtype == dtype
        peaks = [divmod(int(im.argmax()), size) for im in images]
        assert peaks == [(c, c + 5), (c + 5, c), (c, c)]  # Ry(90°): (5,0,0) -> (0,0,-5)


@pytest.mark.parametrize("size", [32, 33])
def test_projections_match_analytic_blob_integrals(size, gen):
    rot = _views(6, gen)
    sigma = 1.5 * size / 32
    # A box-filling object (blobs out to 0.3 D), including views along the grid axes.
    wide = _blob_set(size, 0.3)
    truth = project_gaussian_blobs(wide, sigma, rot, size)
    vol = gaussian_blobs(wide, sigma, size)
    assert _rel(project(vol, rot, kernel="cubic"), truth) < 2e-3
    assert _rel(project(vol, rot, kernel="linear"), truth) < 0.05
    assert _rel(project_real_space(vol, rot, oversample=2.0), truth) < 0.06
    # A compact object (out to 0.15 D) seen from random views: trilinear within 1%.
    compact = _blob_set(size, 0.15)
    rot = rot[:6]
    truth = project_gaussian_blobs(compact, sigma, rot, size)
    vol = gaussian_blobs(compact, sigma, size)
    assert _rel(project(vol, rot, kernel="linear"), truth) < 0.01
    assert _rel(project(vol, rot, kernel="cubic"), truth) < 1e-3


def test_projection_error_at_64_is_below_one_percent(gen):
    size = 64
    rot = _views(6, gen)
    centres = _blob_set(size, 0.3)
    truth = project_gaussian_blobs(centres, 3.0, rot, size)
    images = Projector(gaussian_blobs(centres, 3.0, size, dtype=torch.float32)).project(rot.float())
    assert _rel(images.double(), truth) < 0.01


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_matches_float64(kernel, gen):
    rot = random_rotations(4, gen, torch.float64)
    vol = torch.randn(15, 15, 15, dtype=torch.float64, generator=gen)
    p64 = project(vol, rot, kernel=kernel)
    p32 = project(vol.float(), rot.float(), kernel=kernel)
    assert p32.dtype == torch.float32
    assert _rel(p32.double(), p64) < 1e-5


def test_projector_spectra_give_the_same_images(gen):
    rot = random_rotations(5, gen, torch.float64)
    vol = torch.randn(12, 12, 12, dtype=torch.float64, generator=gen)
    proj = Projector(vol, pad=2.0)
    spectra = proj.project_ft(rot)
    assert spectra.shape == (5, 24, 24)
    torch.testing.assert_close(proj.images_from_ft(spectra), proj.project(rot))
    # Real images: the centred spectra are Hermitian, S(-k) = conj S(k) (k != -Dp/2).
    flipped = torch.conj(torch.flip(spectra[:, 1:, 1:], dims=(-2, -1)))
    torch.testing.assert_close(spectra[:, 1:, 1:], flipped, atol=1e-10, rtol=0)


def test_chunked_projection_and_backprojection_match(gen):
    rot = random_rotations(7, gen, torch.float64)
    vol = torch.randn(13, 13, 13, dtype=torch.float64, generator=gen)
    images = project(vol, rot)
    torch.testing.assert_close(project(vol, rot, chunk_size=3), images)
    torch.testing.assert_close(backproject(images, rot, chunk_size=2), backproject(images, rot))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_of_projection_is_backprojection(kernel, gen):
    rot = random_rotations(4, gen, torch.float64)
    vol = torch.randn(12, 12, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(4, 12, 12, dtype=torch.float64, generator=gen)
    (project(vol, rot, kernel=kernel) * y).sum().backward()
    torch.testing.assert_close(vol.grad, backproject(y, rot, kernel=kernel), atol=1e-10, rtol=1e-8)


def test_projection_is_differentiable_in_the_pose(gen):
    vol = gaussian_blobs(_blob_set(16, 0.25), 1.5, 16)
    y = torch.randn(1, 16, 16, dtype=torch.float64, generator=gen)
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (project(vol, axis_angle_to_matrix(v)[None]) * y).sum()

    v = axis.clone().requires_grad_(True)
    loss(v).backward()
    eps = 1e-6
    for i in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[i] = eps
        numeric = (loss(axis + step) - loss(axis - step)) / (2 * eps)
        assert abs(float(v.grad[i] - numeric)) <= 1e-4 * max(1.0, abs(float(numeric)))


def test_projection_rejects_bad_inputs():
    with pytest.raises(InputError, match="cubic"):
        project(torch.zeros(8, 8, 9), torch.eye(3)[None])
    with pytest.raises(InputError, match="pad"):
        project(torch.zeros(8, 8, 8), torch.eye(3)[None], pad=0.5)
    with pytest.raises(InputError, match="rotations"):
        backproject(torch.zeros(2, 8, 8), torch.eye(3)[None].expand(3, 3, 3))
