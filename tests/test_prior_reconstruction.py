"""Prior-guided reconstruction: grid matching, the Fourier likelihood, the intensity scale,
the regularised baseline and the CLI with a prior, on tiny inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryoprior.cli.main import main as cli_main
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_records
from cryoprior.physics.atoms import atoms_to_map
from cryoprior.physics.composition import (
    POTENTIAL_PER_KDA,
    potential_integral,
    potential_integral_from_mass,
    protein_mass_kda,
)
from cryoprior.physics.operators import ProjectionCTFOperator
from cryoprior.physics.simulator import SimulationConfig, simulate_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.dps import dps_sample
from cryoprior.solvers.prior_reconstruction import (
    FourierLikelihoodOperator,
    accumulate_particles,
    calibrate_fourier_likelihood,
    fourier_smooth,
    grid_plan,
    intensity_scale,
    prior_grid_plan,
    smoothness_regularized,
)
from cryoprior.solvers.regularized import conjugate_gradient

PRIOR = "src/cryoprior/assets/priors/volume_32"


def _protein(name: str = "5pti_A"):
    rec = next(r for r in shipped_records() if r.name == name)
    xyz, el, _ = rec.atoms()
    return rec, xyz - xyz.mean(0), el


@pytest.fixture(scope="module")
def tiny_particles(tmp_path_factory):
    """40 noisy particles of BPTI at 32² and 3 Å/px (the shipped prior's grid)."""
    rec, xyz, el = _protein()
    truth = atoms_to_map(xyz, el, 32, 3.0, bfactors=np.full(len(el), 144.0))
    out = tmp_path_factory.mktemp("prior_rec")
    sim = simulate_particles(
        Volume(truth, 3.0),
        SimulationConfig(n_particles=40, snr=1.0, seed=3, max_shift=3.0),
        out,
        show_progress=False,
    )
    return rec, truth, sim


# ----------------------------------------------------------------------------- grid


def test_grid_plan_accepts_the_prior_grid_and_finer_sampling():
    assert grid_plan(32, 3.0, 32, 3.0).identity
    plan = grid_plan(64, 1.5, 32, 3.0)
    assert (plan.crop, plan.target_box) == (64, 32)
    images = torch.randn(3, 64, 64, dtype=torch.float64)
    assert plan.apply(images).shape == (3, 32, 32)
    # a larger physical box is cropped around the centre first
    plan = grid_plan(80, 1.5, 32, 3.0)
    assert plan.crop == 64 and plan.apply(torch.zeros(2, 80, 80)).shape == (2, 32, 32)


@pytest.mark.parametrize(
    "box,px,what",
    [(32, 4.0, "coarser"), (48, 1.5, "too small"), (40, 2.7, "no whole number")],
)
def test_grid_plan_refuses_with_a_clear_error(box, px, what):
    with pytest.raises(InputError, match=what):
        grid_plan(box, px, 32, 3.0)


# ----------------------------------------------------------------------------- likelihood


def test_fourier_likelihood_operator_adjoint_and_calibration(tiny_particles):
    _, _, sim = tiny_particles
    source = ParticleSource.from_star(sim.paths["star"])
    data = accumulate_particles(source, 32, 3.0, calibration_images=40)
    op = FourierLikelihoodOperator(data)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randn(op.range_shape, generator=g, dtype=torch.float64)
    lhs = float((op.apply(x) * y).sum())
    rhs = float((x * op.apply_adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)
    # calibrated on all 40 images: ‖Bx‖² ≈ ‖Ax‖² for a new smooth map
    calibrate_fourier_likelihood(data, seed=1)
    op = FourierLikelihoodOperator(data)
    b = source.particles
    exact = ProjectionCTFOperator.from_ctf_params(
        source.rotations, 32, 3.0, source.ctf.index(slice(0, len(b)))
    )
    z = fourier_smooth(torch.randn(32, 32, 32, generator=g, dtype=torch.float64), 0.15)
    ratio = float((op.forward(z) ** 2).sum() / (exact.forward(z) ** 2).sum())
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_fourier_likelihood_range_normal_diagonal_is_exact(tiny_particles):
    """diag(B Bᵀ) reported for Π-GDM's Jacobi preconditioner ≈ e_iᵀ B Bᵀ e_i (the
    real/imaginary split is exact up to Σ g² cos(4πk·x)/2, here < 1e-3)."""
    _, _, sim = tiny_particles
    source = ParticleSource.from_star(sim.paths["star"])
    op = FourierLikelihoodOperator(accumulate_particles(source, 32, 3.0))
    diag = op.range_normal_diagonal()
    assert diag.shape == op.range_shape
    dp = op.dp
    # generic frequencies (not self-conjugate) with W > 0, real and imaginary parts
    # (uncentred half-spectrum layout: kx ∈ [0, Dp/2], the other axes wrap)
    for idx in [(3, 5, 7, 0), (dp - 2, 3, 1, 1), (dp - 10, 12, 4, 0), (6, dp - 7, 0, 1)]:
        assert float(diag[idx]) > 0
        e = torch.zeros(op.range_shape, dtype=torch.float64)
        e[idx] = 1.0
        exact = float(op.apply(op.apply_adjoint(e))[idx])
        assert float(diag[idx]) == pytest.approx(exact, rel=1e-3)


def test_smoothness_regularized_meets_the_discrepancy_target(tiny_particles):
    _, truth, sim = tiny_particles
    data = accumulate_particles(ParticleSource.from_star(sim.paths["star"]), 32, 3.0)
    calibrate_fourier_likelihood(data)
    reg = smoothness_regularized(data)
    assert reg.converged and reg.residual_ratio == pytest.approx(1.0, abs=0.01)
    cc = float(np.corrcoef(reg.map.flatten(), truth.double().flatten())[0, 1])
    assert cc > 0.5


# ----------------------------------------------------------------------------- scale


def test_protein_mass_and_potential_per_kda():
    assert protein_mass_kda("G") == pytest.approx((57.0519 + 18.015) / 1000)
    with pytest.raises(InputError):
        protein_mass_kda("12")
    # the per-kDa constant reproduces on shipped chains of the training split (± 3 %)
    for rec in shipped_records()[:4]:
        _, el, _ = rec.atoms()
        ratio = potential_integral(el) / protein_mass_kda(rec.sequence)
        assert ratio == pytest.approx(POTENTIAL_PER_KDA, rel=0.06)


def test_intensity_scale_from_noiseless_images_and_mass(tmp_path):
    rec, xyz, el = _protein()
    truth = atoms_to_map(xyz, el, 32, 3.0, bfactors=np.full(len(el), 144.0))
    sim = simulate_particles(
        Volume(truth, 3.0),
        SimulationConfig(n_particles=20, snr=None, seed=0),
        tmp_path,
        show_progress=False,
    )
    data = accumulate_particles(ParticleSource.from_star(sim.paths["star"]), 32, 3.0)
    # with the model's exact composition the scale of noiseless images is 1
    exact_mass = potential_integral(el) / POTENTIAL_PER_KDA
    c = intensity_scale(data, mass_kda=exact_mass)
    assert c.value == pytest.approx(1.0, rel=0.02)
    assert potential_integral_from_mass(exact_mass) == pytest.approx(potential_integral(el))
    with pytest.raises(InputError, match="mass"):
        intensity_scale(data)
    assert intensity_scale(data, value=2.5).value == 2.5


# ----------------------------------------------------------------------------- CLI


def test_cli_reconstruct_with_prior(tiny_particles, tmp_path):
    rec, truth, sim = tiny_particles
    out = tmp_path / "rec"
    rc = cli_main(
        [
            "reconstruct",
            sim.paths["star"],
            "--prior",
            PRIOR,
            "--sequence",
            rec.sequence,
            "--samples",
            "2",
            "--steps",
            "3",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    from cryoprior.io.mrc import read_map

    mean, std = read_map(out / "map.mrc"), read_map(out / "std.mrc")
    assert mean.data.shape == (32, 32, 32) and mean.pixel_size == pytest.approx(3.0)
    assert float(std.data.abs().max()) > 0
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["method"] == "prior" and record["dps"]["n_samples"] == 2


def test_cli_prior_refuses_a_pixel_size_mismatch(tmp_path, capsys):
    rec, xyz, el = _protein()
    vol = atoms_to_map(xyz, el, 32, 4.0)
    sim = simulate_particles(
        Volume(vol, 4.0), SimulationConfig(n_particles=4, snr=1.0), tmp_path, show_progress=False
    )
    out = tmp_path / "rec"
    rc = cli_main(
        ["reconstruct", sim.paths["star"], "--prior", PRIOR, "--mass-kda", "6", "-o", str(out)]
    )
    assert rc == 2
    assert "coarser than the prior" in capsys.readouterr().err
    assert not (out / "map.mrc").exists()


def test_preconditioned_cg_solves_the_same_system_faster():
    g = torch.Generator().manual_seed(0)
    diag = torch.logspace(0, 4, 50, dtype=torch.float64)
    q = torch.randn(50, 50, generator=g, dtype=torch.float64) * 0.01
    m = torch.diag(diag) + q @ q.T
    b = torch.randn(50, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(m, b)
    plain = conjugate_gradient(lambda v: m @ v, b, max_iter=10)
    pre = conjugate_gradient(lambda v: m @ v, b, max_iter=10, preconditioner=lambda v: v / diag)
    assert float(pre.relative_residual) < 1e-3 < float(plain.relative_residual)
    torch.testing.assert_close(pre.x, exact, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("n", "d"), [(16, 8), (17, 8), (12, 12)])
def test_cropped_irfftn_equals_the_cropped_full_inverse(n, d):
    from cryoprior.solvers.fourier_data import cropped_irfftn

    g = torch.Generator().manual_seed(n)
    spec = torch.fft.rfftn(torch.randn(2, n, n, n, generator=g), dim=(-3, -2, -1))
    full = torch.fft.irfftn(spec, s=(n,) * 3, dim=(-3, -2, -1))[..., :d, :d, :d]
    fast = cropped_irfftn(spec, n, d)
    assert fast.shape == (2, d, d, d)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5 * float(full.abs().max()))


def test_fourier_likelihood_fused_normal_equals_adjoint_of_forward(tiny_particles):
    from cryoprior.physics.operators import ScaledLinearOperator

    _, _, sim = tiny_particles
    data = accumulate_particles(ParticleSource.from_star(sim.paths["star"]), 32, 3.0)
    op = FourierLikelihoodOperator(data)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, *op.domain_shape), generator=g, dtype=torch.float64)
    reference = op.apply_adjoint(op.apply(x))
    torch.testing.assert_close(op.normal(x), reference, rtol=1e-9, atol=1e-9)
    scaled = ScaledLinearOperator(op, 0.5)
    torch.testing.assert_close(scaled.normal(x), 0.25 * reference, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- spectrum


def test_white_prior_spectrum_reproduces_the_scalar_prior(tiny_particles):
    """r_t² from a flat spectrum P = data_std² is the scalar r_t²: same samples."""
    from cryoprior.priors import load_prior
    from cryoprior.solvers.prior_reconstruction import reconstruct_with_prior

    rec, _, sim = tiny_particles
    prior = load_prior(PRIOR)
    source = ParticleSource.from_star(sim.paths["star"])
    kw = dict(n_steps=3, n_samples=1, seed=1)
    plan = prior_grid_plan(prior, source.box, source.pixel_size)
    data = accumulate_particles(source, plan.target_box, plan.target_pixel_size, plan=plan)
    calibrate_fourier_likelihood(data)
    scale = intensity_scale(data, protein_mass_kda(rec.sequence))
    op = FourierLikelihoodOperator(data)
    y = op.measurement(torch.float32)

    def sample(power):
        return dps_sample(
            prior,
            op,
            y,
            noise_sigma=data.noise_sigma,
            n_steps=3,
            guidance="pigdm_dc",
            sampler="ddim",
            eta=0.5,
            generator=torch.Generator().manual_seed(1),
            intensity_scale=scale.value,
            n_inner=5,
            prior_power=power,
            shape=(1, 32, 32, 32),
        ).mean

    a, flat = sample(None), torch.ones(32, 32, 17)
    err = float((a - sample(flat)).norm() / a.norm())
    assert err < 1e-3
    assert float((a - sample(100.0 * flat)).norm() / a.norm()) > 10 * err
    # the reconstruction's default with a mass: the protein spectrum, recorded
    rec_ = reconstruct_with_prior(source, prior, mass_kda=protein_mass_kda(rec.sequence), **kw)
    assert rec_.info["spectrum"] == "protein"
    assert (
        reconstruct_with_prior(source, prior, intensity=scale.value, **kw).info["spectrum"]
        == "white"
    )


def test_protein_power_spectrum_matches_a_rendered_protein():
    """The mass-only model of a protein map's power spectrum is within a factor of 4 of
    BPTI's rendered potential at every shell (it spans ~4 orders of magnitude)."""
    from cryoprior.solvers.prior_spectrum import protein_power

    rec, xyz, el = _protein()
    box, px, b = 48, 1.5, 36.0
    vol = atoms_to_map(xyz, el, box, px, bfactors=np.full(len(el), b)).double()
    power = torch.fft.rfftn(vol).abs() ** 2 / vol.numel()
    model = protein_power(box, px, protein_mass_kda(rec.sequence), b)
    k = torch.fft.fftfreq(box) * box
    kz = torch.fft.rfftfreq(box) * box
    shell = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kz[None, None, :] ** 2)
    shell = torch.round(shell).long()
    ratios = []
    for i in range(0, box // 2):
        sel = shell == i
        ratios.append(float(power[sel].mean() / model[sel].mean()))
    ratios = np.array(ratios)
    assert float(power.mean() / model.mean()) == pytest.approx(1.0, rel=0.5)
    assert ratios.min() > 0.25 and ratios.max() < 4.0, ratios


def test_prior_spectrum_on_the_wrong_grid_is_refused(tiny_particles):
    from cryoprior.priors import load_prior

    _, _, sim = tiny_particles
    source = ParticleSource.from_star(sim.paths["star"])
    data = accumulate_particles(source, 32, 3.0)
    op = FourierLikelihoodOperator(data)
    with pytest.raises(InputError, match="rfft grid"):
        dps_sample(
            load_prior(PRIOR),
            op,
            op.measurement(torch.float32),
            noise_sigma=data.noise_sigma,
            guidance="pigdm_dc",
            n_steps=2,
            prior_power=torch.ones(32, 32, 32),
            shape=(1, 32, 32, 32),
        )
