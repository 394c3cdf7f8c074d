"""Forward operators: adjoints, autograd = adjoint, batching, agreement with the particle
simulator and with Gaussian maps, the noise model, and noise / integral estimates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.atoms import gaussians_to_map
from cryoprior.physics.ctf import CTFParams, apply_ctf, compute_ctf
from cryoprior.physics.measurement import (
    GaussianNoiseModel,
    estimate_map_integral,
    estimate_noise_sigma,
)
from cryoprior.physics.noise import add_noise, noise_sigma_for_snr
from cryoprior.physics.operators import (
    CalphaProjectionOperator,
    CTFOperator,
    GradientOperator,
    MatrixOperator,
    PaddedCTFOperator,
    PaddedProjectionOperator,
    ProjectionCTFOperator,
    ProjectionOperator,
    ShiftOperator,
)
from cryoprior.physics.projection import gaussian_blobs, padded_size, project
from cryoprior.physics.shifts import shift_images
from cryoprior.physics.simulator import ParticleRenderer

PIXEL = 2.0  # Å/px
K = 5


def _ctf_params(k: int, phase_shift: float = 0.0) -> CTFParams:
    return CTFParams(
        defocus_u=torch.linspace(9000.0, 16000.0, k),
        defocus_v=torch.linspace(8800.0, 15500.0, k),
        defocus_angle=0.4,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
        phase_shift=phase_shift,
    )


def _ctf(size: int, k: int = K) -> torch.Tensor:
    """CTFs (k, size, size); size = the box for the image grid, 2·box for the padded grid."""
    return compute_ctf(_ctf_params(k), (size, size), PIXEL, torch.float64)


def _shifts(k: int, gen: torch.Generator) -> torch.Tensor:
    return 3.0 * torch.rand(k, 2, generator=gen, dtype=torch.float64) - 1.5


def _operators(size: int, gen: torch.Generator) -> dict:
    rot = random_rotations(K, gen, torch.float64)
    proj = ProjectionOperator(rot, size)
    dp = 2 * size
    return {
        "projection-cubic": proj,
        "projection-linear": ProjectionOperator(rot, size, kernel="linear"),
        "padded-projection": PaddedProjectionOperator(rot, size),
        "padded-projection-linear-pad1.5": PaddedProjectionOperator(rot, size, 1.5, "linear"),
        "ctf": CTFOperator(_ctf(size)),
        "shift": ShiftOperator(_shifts(K, gen), size),
        "padded-ctf-shift": PaddedCTFOperator(size, dp, K, _ctf(dp), _shifts(K, gen)),
        "projection-ctf-shift": ProjectionCTFOperator(rot, size, _ctf(dp), _shifts(K, gen)),
        "projection-ctf-shift-image-grid": ProjectionCTFOperator(
            rot, size, _ctf(size), _shifts(K, gen)
        ),
        "projection-shift": ProjectionCTFOperator(rot, size, shifts=_shifts(K, gen)),
        "gradient": GradientOperator((size, size, size)),
        "matrix": MatrixOperator(torch.randn(7, size, generator=gen, dtype=torch.float64)),
        "scaled-composed": 2.5 * (CTFOperator(_ctf(size)) @ proj),
    }


OPERATOR_NAMES = list(_operators(4, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("size", [12, 13])
@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_linear_operators_have_true_adjoints(name, size, gen):
    op = _operators(size, gen)[name]
    x = torch.randn(2, *op.domain_shape, generator=gen, dtype=torch.float64)
    y = torch.randn(2, *op.range_shape, generator=gen, dtype=torch.float64)
    lhs = float((op(x) * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
    assert op(x).shape == (2, *op.range_shape)
    assert op.adjoint(y).shape == (2, *op.domain_shape)
    # the normal operator is AᵀA and is positive semi-definite
    assert float((x * op.normal(x)).sum()) >= -1e-9
    torch.testing.assert_close(op.normal(x), op.adjoint(op(x)))


@pytest.mark.parametrize("name", ["projection-ctf-shift", "gradient", "matrix"])
def test_float32_adjoint_within_single_precision(name, gen):
    op = _operators(12, gen)[name]
    x = torch.randn(op.domain_shape, generator=gen)
    y = torch.randn(op.range_shape, generator=gen)
    lhs, rhs = float((op(x) * y).sum()), float((x * op.adjoint(y)).sum())
    assert op(x).dtype == torch.float32
    assert lhs == pytest.approx(rhs, rel=1e-4, abs=1e-3)


def test_autograd_gradient_of_forward_is_the_adjoint(gen):
    op = _operators(10, gen)["projection-ctf-shift"]
    x = torch.randn(op.domain_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(op.range_shape, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((op(x) * y).sum(), x)
    torch.testing.assert_close(g, op.adjoint(y))
    yy = y.clone().requires_grad_(True)
    (h,) = torch.autograd.grad((op.adjoint(yy) * x.detach()).sum(), yy)
    torch.testing.assert_close(h, op(x.detach()))
    # second order (e.g. a Jacobian-vector product by double backward) works too
    v = torch.randn(op.range_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    (gv,) = torch.autograd.grad((op(x) * v).sum(), x, create_graph=True)
    (back,) = torch.autograd.grad((gv * x.detach()).sum(), v)
    torch.testing.assert_close(back, op(x.detach()))


def test_batched_maps_match_one_at_a_time(gen):
    size = 11
    op = ProjectionCTFOperator(random_rotations(3, gen, torch.float64), size, _ctf(size, 3))
    x = torch.randn(2, 1, size, size, size, generator=gen, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 1, 3, size, size)
    for b in range(2):
        torch.testing.assert_close(y[b, 0], op(x[b, 0]))
    back = op.adjoint(y)
    assert back.shape == x.shape
    torch.testing.assert_close(back[1, 0], op.adjoint(y[1, 0]))


@pytest.mark.parametrize("size", [16, 17])
def test_projection_ctf_operator_is_what_the_simulator_renders(size, gen):
    """op(map) equals the simulator's noiseless particle (projection, CTF, shift)."""
    centres = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 2.0, 1.0], [0.0, 3.0, -2.0]])
    volume = gaussian_blobs(centres, 1.6, size, dtype=torch.float32)
    rot = random_rotations(4, gen, torch.float64)
    params = _ctf_params(4)
    origins = np.array([[2.0, -3.0], [0.0, 1.5], [-4.0, 2.5], [1.0, 0.0]])  # Å, RELION
    renderer = ParticleRenderer(Volume(volume, PIXEL))
    shifts = torch.as_tensor(-origins / PIXEL)
    for p, o, s in ((params, origins, shifts), (params, None, None), (None, origins, shifts)):
        rendered = renderer.render(rot, o, p).to(torch.float64)
        op = ProjectionCTFOperator.from_ctf_params(rot, size, PIXEL, p, s)
        err = float((op(volume.to(torch.float64)) - rendered).norm() / rendered.norm())
        assert err < 1e-5


def test_image_grid_ctf_is_apply_ctf_of_projections(gen):
    size = 15
    volume = gaussian_blobs(torch.tensor([[2.0, -1.0, 0.5], [-3.0, 2.0, 1.0]]), 1.6, size)
    rot, ctf, shifts = random_rotations(K, gen, torch.float64), _ctf(size), _shifts(K, gen)
    ref = shift_images(apply_ctf(project(volume, rot), ctf), shifts)
    torch.testing.assert_close(ProjectionCTFOperator(rot, size, ctf, shifts)(volume), ref)
    with pytest.raises(InputError, match="ctf"):
        ProjectionCTFOperator(rot, size, _ctf(size + 1))


@pytest.mark.parametrize("size", [20, 21])
@pytest.mark.parametrize("grid", ["padded", "image"])
def test_calpha_operator_matches_projection_of_gaussian_map(size, grid, gen):
    n = 12
    coords = 4.0 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    amps = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    rot = random_rotations(K, gen, torch.float64)
    ctf = _ctf(padded_size(size, 2.0) if grid == "padded" else size)
    shifts = _shifts(K, gen)
    sigma = 2.5
    calpha = CalphaProjectionOperator(rot, size, PIXEL, sigma, n, amps, ctf=ctf, shifts=shifts)
    volume = gaussians_to_map(coords, size, PIXEL, sigma, amps)
    reference = ProjectionCTFOperator(rot, size, ctf, shifts)(volume)
    err = float((calpha(coords) - reference).norm() / reference.norm())
    assert err < 5e-3  # voxel vs pixel averaging of the blobs and Fourier interpolation
    c = ctf.shape[-1] // 2
    torch.testing.assert_close(calpha.ctf_at_zero, ctf[:, c, c])


def test_calpha_operator_batches_masks_and_differentiates(gen):
    size, n = 10, 4
    rot = random_rotations(2, gen, torch.float64)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    op = CalphaProjectionOperator(rot, size, PIXEL, 2.0, n, mask=mask, ctf=_ctf(size, 2))
    coords = 3.0 * torch.randn(3, n, 3, generator=gen, dtype=torch.float64)
    images = op(coords)
    assert images.shape == (3, 2, size, size)
    torch.testing.assert_close(images[1], op(coords[1]))
    moved = coords.clone()
    moved[:, 3] += 5.0  # the padded atom contributes nothing
    torch.testing.assert_close(op(moved), images)
    x = coords[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(op.forward, (x,), eps=1e-6, atol=1e-6)


def test_operators_reject_bad_shapes(gen):
    op = ProjectionOperator(random_rotations(2, gen, torch.float64), 8)
    with pytest.raises(InputError, match="shape"):
        op(torch.zeros(7, 7, 7))
    with pytest.raises(InputError, match="shape"):
        op.adjoint(torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="ctf"):
        ProjectionCTFOperator(random_rotations(2, gen, torch.float64), 8, torch.zeros(2, 9, 9))
    with pytest.raises(InputError, match="shifts"):
        ProjectionCTFOperator(random_rotations(2, gen, torch.float64), 8, shifts=torch.zeros(3, 2))
    with pytest.raises(InputError, match="compose"):
        ProjectionOperator(random_rotations(2, gen), 8) @ GradientOperator((8, 8, 8))


def test_norm_estimate_is_the_largest_singular_value(gen):
    m = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    est = MatrixOperator(m).norm_estimate(200, gen)
    assert est == pytest.approx(float(torch.linalg.matrix_norm(m, 2)), rel=1e-6)


def test_gaussian_noise_model(gen):
    model = GaussianNoiseModel(0.3)
    y = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y_model = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    ref = torch.distributions.Normal(y_model, 0.3).log_prob(y).sum(dim=(-2, -1))
    torch.testing.assert_close(model.log_likelihood(y, y_model), ref)
    torch.testing.assert_close(
        model.residual_norm(y, y_model), (y_model - y).flatten(1).norm(dim=1)
    )
    assert model.expected_residual_norm(y) == pytest.approx(0.3 * math.sqrt(20))
    big = torch.zeros(200, 100, dtype=torch.float64)
    noisy = model.sample(big, gen)
    assert float(noisy.std()) == pytest.approx(0.3, rel=0.02)
    with pytest.raises(InputError):
        GaussianNoiseModel(0.0)


@pytest.mark.parametrize("size", [32, 33])
def test_noise_sigma_from_the_background_of_particle_images(size, gen):
    """σ from the pixels outside the particle, not from the clean images: within 3 %."""
    centres = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 2.0, 1.0], [0.0, 3.0, -2.0]])
    volume = gaussian_blobs(centres, 1.6, size)
    op = ProjectionCTFOperator(random_rotations(40, gen, torch.float64), size)
    clean = op(volume) + 5.0  # a background offset, removed per image
    sigma = noise_sigma_for_snr(clean - 5.0, 0.1)
    noisy = add_noise(clean, sigma, gen)
    est = estimate_noise_sigma(noisy, mask_radius=size * 0.35)
    assert est == pytest.approx(sigma, rel=0.03)
    assert GaussianNoiseModel.from_images(noisy, size * 0.35).sigma == est
    with pytest.raises(InputError, match="mask radius"):
        estimate_noise_sigma(noisy, mask_radius=size)


def test_map_integral_from_image_dc_terms(gen):
    """∫V from the images alone, with the simulator's padded CTF, a 144 Å box at 3 Å/px."""
    size, px, k, n = 48, 3.0, 400, 30
    coords = 8.0 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    volume = 3.7 * gaussians_to_map(coords, size, px, 2.0)
    truth = 3.7 * n  # ∫V d³r: each blob integrates to its amplitude
    defocus = torch.empty(k, dtype=torch.float64).uniform_(10000.0, 25000.0, generator=gen)
    rot = random_rotations(k, gen, torch.float64)
    results = {}
    for name, phase_shift in (("amplitude contrast", 0.0), ("phase plate", math.pi / 2)):
        params = CTFParams(
            defocus_u=defocus,
            defocus_v=defocus - 100.0,
            defocus_angle=0.3,
            voltage=300.0,
            cs=2.7,
            amplitude_contrast=0.1,
            phase_shift=phase_shift,
        )
        op = ProjectionCTFOperator.from_ctf_params(rot, size, px, params, kernel="linear")
        clean = op(volume)
        exact = estimate_map_integral(clean, op.ctf_at_zero, px)
        assert exact.integral == pytest.approx(truth, rel=0.01), name
        noisy = add_noise(clean, noise_sigma_for_snr(clean, 0.1), gen)
        results[name] = estimate_map_integral(noisy, op.ctf_at_zero, px)
    plate = results["phase plate"]
    assert plate.integral == pytest.approx(truth, rel=0.05)
    assert abs(plate.integral - truth) < 4 * plate.stderr
    amplitude = results["amplitude contrast"]  # ~10x noisier: CTF(0) = 0.1
    assert amplitude.stderr > 5 * plate.stderr
    assert abs(amplitude.integral - truth) < 4 * amplitude.stderr
    with pytest.raises(InputError, match="zero frequency"):
        estimate_map_integral(noisy, torch.zeros(k), px)
