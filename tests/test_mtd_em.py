"""Approximate EM for MTD (cryoprior.solvers.mtd_em) and score priors (score_prior)."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion import AnalyticGaussianDenoiser, make_schedule
from cryoprior.physics.mtd import (
    ImageRotation,
    patch_model,
    rotation_grid,
    simulate_mtd,
)
from cryoprior.priors import Prior, PriorMetadata
from cryoprior.solvers.mtd_em import (
    EMConfig,
    PatchData,
    aligned_error,
    approximate_em,
    closed_form_m_step,
    expectation,
    gamma_schedule,
    gradient_m_step,
    log_posterior,
    mtd_error,
    q_gradient,
    q_value,
    residual_energy,
)
from cryoprior.solvers.score_prior import (
    GaussianScore,
    PriorScore,
    estimate_curvature,
    gaussian_image_mean,
    gaussian_image_prior,
    sample_gaussian_images,
)


def _direct_log_posterior(patches, rotated, sigma, log_rho):
    """The E-step by loops over patches, rotations and shifts (Zabatani et al. Eq. 14–15)."""
    D, L = patches.shape[0], patches.shape[-1]
    K = rotated.shape[0]
    logits = torch.empty(D, K, 2 * L, 2 * L, dtype=torch.float64)
    for m in range(D):
        for k in range(K):
            for a in range(2 * L):
                for b in range(2 * L):
                    res = patches[m] - patch_model(rotated[k], (a, b))
                    logits[m, k, a, b] = -(res**2).sum() / (2 * sigma**2) + log_rho[a, b]
    logits = logits - math.log(K)
    lse = torch.logsumexp(logits.flatten(1), 1)
    evidence = lse - 0.5 * L * L * math.log(2 * math.pi * sigma**2)
    return logits - lse[:, None, None, None], evidence


def _direct_q(patches, rotation, f, weights, sigma):
    """Σ_m Σ_kℓ w log p(M_m | ℓ, k, F) by loops (Eq. 16), differentiable in f."""
    L = patches.shape[-1]
    fk = rotation.apply(f)
    total = 0.0
    for m in range(patches.shape[0]):
        for k in range(fk.shape[0]):
            for a in range(2 * L):
                for b in range(2 * L):
                    res = patches[m] - patch_model(fk[k], (a, b))
                    total = total + weights[m, k, a, b] * (
                        -(res**2).sum() / (2 * sigma**2)
                        - 0.5 * L * L * math.log(2 * math.pi * sigma**2)
                    )
    return total


def _tiny(L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(2 * L + 1, 2 * L + 1, generator=g, dtype=torch.float64)
    f = torch.randn(L, L, generator=g, dtype=torch.float64)
    rho = torch.rand(2 * L, 2 * L, generator=g, dtype=torch.float64)
    rotation = ImageRotation(L, rotation_grid(K))
    return PatchData(m, L), f, (rho / rho.sum()).log(), rotation


@pytest.mark.parametrize("L,K", [(3, 4), (4, 4), (3, 3)])
def test_e_step_matches_direct_loops(L, K):
    data, f, log_rho, rotation = _tiny(L, K)
    rotated = rotation.apply(f)
    log_w, evidence = log_posterior(data, rotated, 0.8, log_rho)
    ref_w, ref_ev = _direct_log_posterior(data.patches, rotated, 0.8, log_rho)
    assert torch.allclose(log_w, ref_w, atol=1e-10)
    assert torch.allclose(evidence, ref_ev, atol=1e-10)
    # the uniform default is log 1/(2L)²
    uni, _ = log_posterior(data, rotated, 0.8)
    ref_uni, _ = _direct_log_posterior(
        data.patches, rotated, 0.8, torch.full((2 * L, 2 * L), -math.log(4 * L * L))
    )
    assert torch.allclose(uni, ref_uni, atol=1e-10)


def test_e_step_is_stable_at_tiny_sigma():
    data, f, log_rho, rotation = _tiny(3, 4)
    log_w, evidence = log_posterior(data, rotation.apply(f), 1e-6, log_rho)
    assert bool(torch.isfinite(log_w.exp()).all()) and bool(torch.isfinite(evidence).all())
    total = log_w.exp().flatten(1).sum(1)
    assert torch.allclose(total, torch.ones(data.num_patches, dtype=torch.float64))


@pytest.mark.parametrize("L,K", [(3, 4), (3, 3)])
def test_q_statistics_match_direct_sums(L, K):
    data, f, log_rho, rotation = _tiny(L, K, seed=2)
    sigma = 0.9
    g = torch.Generator().manual_seed(4)
    f_eval = torch.randn(L, L, generator=g, dtype=torch.float64)
    log_w, _ = log_posterior(data, rotation.apply(f), sigma, log_rho)
    estep = expectation(data, rotation.apply(f), sigma, log_rho, chunk=2)  # chunks of 2
    x = f_eval.clone().requires_grad_(True)
    q_ref = _direct_q(data.patches, rotation, x, log_w.exp(), sigma)
    (grad_ref,) = torch.autograd.grad(q_ref, x)
    energy = float(data.energy.sum())
    q = q_value(estep, rotation, f_eval, sigma, energy, data.num_patches * L * L)
    assert q == pytest.approx(float(q_ref.detach()), rel=1e-10)
    assert torch.allclose(q_gradient(estep, rotation, f_eval, sigma), grad_ref, atol=1e-9)
    assert residual_energy(estep, rotation, f_eval, energy) > 0
    assert torch.allclose(estep.occupancy.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("K", [4, 6])
def test_closed_form_m_step_maximises_q(K):
    data, f, log_rho, rotation = _tiny(4, K, seed=3)
    estep = expectation(data, rotation.apply(f), 0.7, log_rho)
    f_star = closed_form_m_step(estep, rotation, f, cg_iters=200, cg_tol=1e-13)
    grad = q_gradient(estep, rotation, f_star, 0.7)
    scale = q_gradient(estep, rotation, torch.zeros_like(f), 0.7).abs().max()
    assert float(grad.abs().max()) < 1e-8 * float(scale)
    # one preconditioned gradient step (μ = 1, no prior) is the closed form for 90° turns
    if K == 4:
        step = gradient_m_step(estep, rotation, f, 0.7, steps=1, step_size=1.0)
        assert torch.allclose(step, f_star, atol=1e-12)


@pytest.mark.parametrize("L", [5, 6])
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_noiseless_single_copy_is_recovered_exactly(L, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(L, L, generator=g, dtype=torch.float64) + 0.5
    m = simulate_mtd(f, math.inf, n=4 * L, density=0.05, generator=g)  # one copy, no noise
    assert len(m.positions) == 1
    # start from a rotated, perturbed F: σ → 0 makes the E-step a hard assignment
    noise = torch.randn(L, L, generator=g, dtype=torch.float64)
    start = torch.rot90(f, 1, dims=(-2, -1)) + 0.05 * noise
    result = approximate_em(
        m.measurement, L, sigma=1e-3, init=start, config=EMConfig(max_iter=20), truth=f
    )
    assert result.converged
    assert mtd_error(result.estimate, f) < 1e-9  # the M-step ridge is 1e-12 relative


def test_em_plain_recovers_gaussian_image_at_high_snr():
    g = torch.Generator().manual_seed(1)
    f = sample_gaussian_images(1, generator=g)[0]
    m = simulate_mtd(f, 50.0, generator=g)
    r = approximate_em(
        m.measurement,
        5,
        sigma=m.sigma,
        config=EMConfig(max_iter=100, restarts=10),
        truth=f,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(r.restart_log_likelihoods) == 10
    assert r.error_curve()[-1] < 0.1
    lls = [h["log_likelihood"] for h in r.history]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(lls, lls[1:]))  # EM never decreases it


def test_score_prior_lowers_error_on_gaussian_images():
    mu = gaussian_image_mean()
    plain, prior = [], []
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        f = sample_gaussian_images(1, mu, generator=g)[0]
        m = simulate_mtd(f, 1.0, generator=g)
        kwargs = dict(sigma=m.sigma, truth=f)
        cfg = EMConfig(max_iter=40, gamma="constant", restarts=3)
        plain.append(
            approximate_em(m.measurement, 5, config=cfg, generator=_g(seed), **kwargs).history
        )
        prior.append(
            approximate_em(
                m.measurement, 5, score=GaussianScore(mu), config=cfg, generator=_g(seed), **kwargs
            ).history
        )
    err = lambda runs: sum(h[-1]["error"] for h in runs) / len(runs)  # noqa: E731
    assert err(prior) < 0.8 * err(plain)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_learned_occupancy_and_sigma_estimate():
    g = torch.Generator().manual_seed(2)
    f = sample_gaussian_images(1, generator=g)[0]
    m = simulate_mtd(f, 20.0, generator=g)
    r = approximate_em(
        m.measurement,
        5,
        init=f,
        config=EMConfig(max_iter=30, occupancy="learned"),
        truth=f,
    )
    assert r.occupancy.shape == (10, 10)
    assert float(r.occupancy.sum()) == pytest.approx(1.0)
    assert r.sigma == pytest.approx(m.sigma, rel=0.05)
    # most patches are empty: the learned prior puts most mass on the empty shifts
    assert r.history[-1]["empty_fraction"] > 0.5
    assert r.error_curve()[-1] < 0.15


def test_continuous_rotations_run_and_measure_error():
    g = torch.Generator().manual_seed(3)
    L = 9
    u = torch.arange(L, dtype=torch.float64) - 4
    f = torch.exp(-((u[:, None] - 1.5) ** 2 + (u[None, :] + 1) ** 2 / 4) / 3)
    m = simulate_mtd(f, 100.0, rotations=8, generator=g)
    r = approximate_em(
        m.measurement,
        L,
        sigma=m.sigma,
        init=f + 0.1,
        config=EMConfig(rotations=8, max_iter=15),
        truth=f,
    )
    assert r.config["m_step"] == "closed_form"
    assert r.error_curve()[-1] < 0.1
    # the error over a fine angle grid is at most the error over quarter turns
    est = r.estimate
    assert mtd_error(est, f, rotations=360) <= mtd_error(est, f, rotations=4) + 1e-12


def test_aligned_error_ignores_translations():
    f = torch.zeros(8, 8, dtype=torch.float64)
    f[2:5, 3:6] = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
    moved = torch.roll(torch.rot90(f, 1, dims=(-2, -1)), (2, -1), (0, 1))
    assert aligned_error(moved, f) < 1e-12
    assert mtd_error(moved, f) > 0.5


def test_gamma_schedules():
    lin = gamma_schedule("linear", 2.0, 5)
    assert [lin(t) for t in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert gamma_schedule("constant", 0.3, 5)(0) == 0.3
    with pytest.raises(InputError):
        gamma_schedule("cosine", 1.0, 5)


def test_bad_config_is_rejected():
    with pytest.raises(InputError, match="occupancy"):
        approximate_em(torch.zeros(20, 20), 5, sigma=1.0, config=EMConfig(occupancy="x"))
    with pytest.raises(InputError, match="sigma"):
        approximate_em(torch.randn(20, 20), 5, sigma=-1.0)


# ----------------------------------------------------------------------- score priors


def test_prior_score_of_analytic_gaussian_matches_closed_form():
    prior = gaussian_image_prior()
    score = PriorScore(prior, t=0.02)
    mu = gaussian_image_mean()
    f = sample_gaussian_images(3, mu, generator=_g(0))
    exact = GaussianScore(mu, 1.0, score.noise_level)
    assert torch.allclose(score(f), exact(f), atol=1e-12)
    assert torch.allclose(score.denoise(f), f + score.noise_level**2 * exact(f), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prior_score_undoes_the_normalisation(dtype):
    # a prior trained on x_net = (x − 1)/2, x ~ N(m, 4): in image units N(2 m_net + 1, 4)
    m_net = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 4, 4)
    den = AnalyticGaussianDenoiser(make_schedule("cosine"), m_net, 1.0)
    meta = PriorMetadata(
        representation="image",
        shape=(1, 4, 4),
        pixel_size=1.0,
        normalisation={"scale": 2.0, "offset": 1.0},
    )
    score = PriorScore(Prior(den, meta), t=0.05)  # type: ignore[arg-type]
    f = torch.randn(4, 4, generator=_g(1), dtype=torch.float64).to(dtype)
    exact = GaussianScore(2 * m_net[0] + 1, 2.0, score.noise_level)
    assert score(f).dtype == dtype
    assert torch.allclose(score(f), exact(f).to(dtype), atol=1e-6)
    # from_noise_level finds the time giving σ̃ in image units
    s2 = PriorScore.from_noise_level(Prior(den, meta), 0.1)  # type: ignore[arg-type]
    assert s2.noise_level == pytest.approx(0.1, rel=1e-6)


def test_curvature_estimate_of_a_gaussian_score():
    mu = gaussian_image_mean()
    exact = GaussianScore(mu, 0.5, 0.1)
    value, _ = estimate_curvature(exact, mu)
    assert value == exact.curvature
    # a plain callable (no exact attribute) is probed by power iteration
    kappa, v = estimate_curvature(lambda x: exact(x), mu + 0.3, iters=3, generator=_g(0))
    assert kappa == pytest.approx(1 / (0.25 + 0.01), rel=1e-6)
    assert v.shape == mu.shape


def test_prior_score_checks_the_box():
    score = PriorScore(gaussian_image_prior(), t=0.02)
    with pytest.raises(InputError, match="5×5"):
        score(torch.zeros(6, 6))


def test_annealed_prior_smoothing():
    score = PriorScore.from_noise_level(gaussian_image_prior(), 0.05)
    assert score.at_noise_level(0.3).noise_level == pytest.approx(0.3, rel=1e-6)
    g = torch.Generator().manual_seed(4)
    f = sample_gaussian_images(1, generator=g)[0]
    m = simulate_mtd(f, 5.0, generator=g)
    cfg = EMConfig(max_iter=9, gamma="constant", anneal_from=0.5, tol=1.0)
    r = approximate_em(m.measurement, 5, sigma=m.sigma, init=f, score=score, config=cfg)
    levels = [h["prior_noise_level"] for h in r.history]
    assert r.iterations == 9  # the stopping rule waits for the anneal to finish
    assert levels[0] == pytest.approx(0.5, rel=1e-6)
    assert levels[-1] == pytest.approx(0.05, rel=1e-6)
    assert all(b < a for a, b in zip(levels, levels[1:]))
    with pytest.raises(InputError, match="at_noise_level"):
        approximate_em(m.measurement, 5, sigma=1.0, score=GaussianScore(f), config=cfg)
