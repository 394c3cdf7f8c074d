"""Diffusion posterior sampling on problems whose posterior is known in closed form.

Prior N(μ, s²I) (an exact analytic denoiser), a linear operator A and Gaussian noise σ:
the posterior is N(μ_post, C_post) with μ_post = μ + s²Aᵀ(A s² Aᵀ + σ²I)⁻¹(y − Aμ) and
C_post = s²I − s²Aᵀ(A s² Aᵀ + σ²I)⁻¹A s². "pigdm" and "dps_x0" are exact for this problem
(up to time discretisation); "dps" (Chung et al. 2023) is an approximation, accurate when
the noise is small and A well conditioned.
"""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion import (
    AnalyticGaussianDenoiser,
    DenoiserOutput,
    LinearSchedule,
    remove_mean,
)
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.atoms import atoms_to_map, gaussians_to_map
from cryoprior.physics.composition import potential_integral
from cryoprior.physics.ctf import CTFParams
from cryoprior.physics.measurement import estimate_intensity_scale
from cryoprior.physics.noise import add_noise, noise_sigma_for_snr
from cryoprior.physics.operators import (
    CalphaProjectionOperator,
    MatrixOperator,
    ProjectionCTFOperator,
    ProjectionOperator,
)
from cryoprior.priors import Prior, PriorMetadata
from cryoprior.solvers.dps import dps_sample

F64 = torch.float64


def _problem(n: int, m: int, sigma: float, s: float, seed: int, orthogonal: bool = False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g, dtype=F64)
    a = torch.randn(m, n, generator=g, dtype=F64) / math.sqrt(n)
    if orthogonal:
        u, _, vh = torch.linalg.svd(a)
        a = u @ vh
    x_true = mu + s * torch.randn(n, generator=g, dtype=F64)
    y = a @ x_true + sigma * torch.randn(m, generator=g, dtype=F64)
    prior_cov = s * s * torch.eye(n, dtype=F64)
    gain = (
        prior_cov @ a.T @ torch.linalg.inv(a @ prior_cov @ a.T + sigma**2 * torch.eye(m, dtype=F64))
    )
    post_mean = mu + gain @ (y - a @ mu)
    post_cov = prior_cov - gain @ a @ prior_cov
    return mu, a, y, post_mean, post_cov


def _mahalanobis2(mean: torch.Tensor, post_mean: torch.Tensor, post_cov: torch.Tensor, n: int):
    d = mean - post_mean
    return float(n * d @ torch.linalg.solve(post_cov, d))


@pytest.mark.parametrize("sampler,steps", [("ddpm", 200), ("ddim", 50)])
def test_pigdm_samples_the_exact_posterior(sampler, steps):
    n, m, sigma, s = 8, 5, 0.1, 0.8
    mu, a, y, post_mean, post_cov = _problem(n, m, sigma, s, seed=0)
    den = AnalyticGaussianDenoiser(LinearSchedule(), mu, s)
    n_samples = 1000
    res = dps_sample(
        den,
        MatrixOperator(a),
        y,
        sigma,
        steps,
        guidance="pigdm",
        sampler=sampler,
        n_samples=n_samples,
        generator=torch.Generator().manual_seed(1),
        data_std=s,
    )
    assert res.samples.shape == (n_samples, n) and res.mean.shape == (n,)
    # the sample mean is within sampling error of μ_post: N·dᵀC⁻¹d ~ χ²(8), 99.9 % < 26.1
    assert _mahalanobis2(res.mean, post_mean, post_cov, n_samples) < 26.1
    assert float((res.mean - post_mean).norm()) < 0.05 * float((mu - post_mean).norm())
    cov = torch.cov(res.samples.T)
    assert float((cov - post_cov).norm() / post_cov.norm()) < 0.15
    assert res.residual_history.shape == (steps, n_samples)
    assert res.target_residual_norm == pytest.approx(sigma * math.sqrt(m))


def test_dps_x0_equals_pigdm_for_a_gaussian_prior():
    """The proximal step on x̂0 with r_t² = Var[x0|x_t] is Π-GDM's update (J = α r²/σ² I)."""
    n, m, sigma, s = 6, 4, 0.2, 1.3
    mu, a, y, _, _ = _problem(n, m, sigma, s, seed=3)
    den = AnalyticGaussianDenoiser(LinearSchedule(), mu, s)
    kw = dict(n_samples=20, data_std=s, n_inner=30)
    r1 = dps_sample(
        den,
        MatrixOperator(a),
        y,
        sigma,
        30,
        guidance="pigdm",
        generator=torch.Generator().manual_seed(5),
        **kw,
    )
    r2 = dps_sample(
        den,
        MatrixOperator(a),
        y,
        sigma,
        30,
        guidance="dps_x0",
        generator=torch.Generator().manual_seed(5),
        **kw,
    )
    torch.testing.assert_close(r1.samples, r2.samples, rtol=1e-7, atol=1e-7)


class _IdentityDenoiser(torch.nn.Module):
    """x̂0 = x_t at every t: a Jacobian (I) that does not vanish as α_t → 0."""

    def __init__(self) -> None:
        super().__init__()
        self.schedule = LinearSchedule()

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_) -> DenoiserOutput:
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t[:1]))
        eps = (x - alpha * x) / sigma
        return DenoiserOutput(x0=x, eps=eps, score=-eps / sigma)


@pytest.mark.parametrize("clip", [2.0, 0.5])
def test_pigdm_caps_its_correction_near_t1(clip):
    """The x̂0 correction's norm is at most ``pigdm_clip`` × the Gaussian one r_t²‖v‖."""
    n, m, sigma = 6, 4, 0.1
    _, a, y, _, _ = _problem(n, m, sigma, 1.0, seed=2)
    x_t = torch.randn(1, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    den = _IdentityDenoiser()
    seen = {}

    def first(i, x_next, out):
        if i == 0:
            seen["x0"] = out.x0.clone()

    kw = dict(guidance="pigdm", sampler="ddim", x_T=x_t, data_std=1.0, n_inner=50)
    dps_sample(den, MatrixOperator(a), y, sigma, 10, pigdm_clip=clip, callback=first, **kw)
    t0 = float(den.schedule.timesteps(10)[0])
    alpha, sig = (float(v) for v in den.schedule.alpha_sigma(torch.tensor([t0])))
    st2 = (sig / alpha) ** 2
    r2 = st2 / (1 + st2)
    v = a.T @ torch.linalg.solve(sigma**2 * torch.eye(m, dtype=F64) + r2 * a @ a.T, y - a @ x_t[0])
    raw = (sig**2 / alpha) * v  # J = I: the uncapped correction
    got = seen["x0"][0] - x_t[0]
    assert float(raw.norm()) > 10 * clip * r2 * float(v.norm())  # the cap must act here
    assert float(got.norm()) == pytest.approx(clip * r2 * float(v.norm()), rel=1e-4)
    assert float(torch.nn.functional.cosine_similarity(got, raw, dim=0)) > 0.9999


def test_dps_mean_approaches_the_posterior_mean():
    """DPS (ζ∇‖y − A x̂0‖, Chung et al. 2023 Alg. 1) on a well-conditioned, low-noise toy."""
    n, sigma, s = 8, 0.05, 0.8
    mu, a, y, post_mean, _ = _problem(n, n, sigma, s, seed=0, orthogonal=True)
    den = AnalyticGaussianDenoiser(LinearSchedule(), mu, s)
    prior_gap = float((mu - post_mean).norm())

    def run(op, zeta: float):
        return dps_sample(
            den, op, y, sigma, 1000, zeta, n_samples=200, generator=torch.Generator().manual_seed(2)
        )

    res = run(MatrixOperator(a), 0.2)
    err = float((res.mean - post_mean).norm())
    assert err < 0.03 * prior_gap  # measured 0.6 %
    target = res.target_residual_norm
    assert 0.3 * target < float(res.residual_norm.mean()) < 1.5 * target  # measured 0.7
    assert float(res.residual_history[-1].mean()) < 0.1 * float(res.residual_history[0].mean())

    class WrongAdjoint(MatrixOperator):
        def apply_adjoint(self, y):  # A instead of Aᵀ: a broken likelihood gradient
            return y @ self.matrix.T

    class WrongSign(MatrixOperator):
        def apply_adjoint(self, y):
            return -super().apply_adjoint(y)

    for broken in (WrongAdjoint(a), WrongSign(a)):
        bad = float((run(broken, 0.2).mean - post_mean).norm())
        assert not bad < 0.3 * prior_gap
    too_big = run(MatrixOperator(a), 2.0)  # wrong step scale: samples scatter off the data
    assert float(too_big.residual_norm.mean()) > 3 * target


def test_physical_units_normalisation_and_intensity_scale():
    """Network N(0, I); x_phys = 2 x_net + 1; y = 3 A x_phys + n: the analytic posterior."""
    n, m, sigma = 6, 4, 0.3
    g = torch.Generator().manual_seed(7)
    a = torch.randn(m, n, generator=g, dtype=F64)
    scale, offset, c = 2.0, 1.0, 3.0
    x_true = offset + scale * torch.randn(n, generator=g, dtype=F64)
    y = c * a @ x_true + sigma * torch.randn(m, generator=g, dtype=F64)
    a_eff = c * a  # the physical-space operator, prior N(1, 4 I)
    prior_cov = scale**2 * torch.eye(n, dtype=F64)
    gain = (
        prior_cov
        @ a_eff.T
        @ torch.linalg.inv(a_eff @ prior_cov @ a_eff.T + sigma**2 * torch.eye(m, dtype=F64))
    )
    post_mean = offset + gain @ (y - a_eff @ torch.full((n,), offset, dtype=F64))
    post_cov = prior_cov - gain @ a_eff @ prior_cov
    den = AnalyticGaussianDenoiser(LinearSchedule(), torch.zeros(n, dtype=F64), 1.0)
    n_samples = 800
    for guidance in ("pigdm", "dps_x0"):
        res = dps_sample(
            den,
            MatrixOperator(a),
            y,
            sigma,
            100,
            guidance=guidance,
            n_samples=n_samples,
            generator=torch.Generator().manual_seed(1),
            normalisation={"scale": scale, "offset": offset},
            intensity_scale=c,
        )
        assert _mahalanobis2(res.mean, post_mean, post_cov, n_samples) < 22.5  # χ²(6) 99.9 %
        assert (
            float((res.residual_norm - (y - res.samples @ a_eff.T).norm(dim=1)).abs().max()) < 1e-9
        )


def test_prior_object_supplies_shape_and_normalisation():
    size = 5
    norm = {"scale": 0.5, "offset": 0.2}
    den = AnalyticGaussianDenoiser(LinearSchedule(), 0.0, 1.0)
    meta = PriorMetadata(
        representation="volume", shape=(1, size, size, size), pixel_size=2.0, normalisation=norm
    )
    op = ProjectionOperator(random_rotations(2, torch.Generator().manual_seed(0), F64), size)
    y = torch.randn(op.range_shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(guidance="pigdm", n_samples=2, n_inner=5)
    r1 = dps_sample(
        Prior(den, meta), op, y, 0.5, 8, generator=torch.Generator().manual_seed(2), **kw
    )
    r2 = dps_sample(
        den,
        op,
        y,
        0.5,
        8,
        generator=torch.Generator().manual_seed(2),
        shape=(1, size, size, size),
        normalisation=norm,
        **kw,
    )
    assert r1.samples.shape == (2, 1, size, size, size)
    torch.testing.assert_close(r1.samples, r2.samples)
    assert r1.config["normalisation"] == norm


@pytest.mark.parametrize("guidance", ["dps", "dps_x0"])
def test_point_cloud_posterior_keeps_zero_com_and_padding(guidance):
    """Cα clouds through the non-linear Gaussian-blob projection; node 5 is padding."""
    g = torch.Generator().manual_seed(0)
    n_nodes, box, px = 6, 16, 2.0
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    mean = remove_mean(torch.randn(1, n_nodes, 3, generator=g, dtype=F64), mask[None])[0]
    den = AnalyticGaussianDenoiser(LinearSchedule(), mean, 0.3, representation="points")
    scale = 4.0  # Å per network unit
    truth = (
        scale
        * remove_mean(
            (mean + 0.3 * torch.randn(n_nodes, 3, generator=g, dtype=F64))[None], mask[None]
        )[0]
    )
    op = CalphaProjectionOperator(random_rotations(3, g, F64), box, px, 2.0, n_nodes, mask=mask)
    clean = op(truth)
    sigma = 0.05 * float(clean.std())
    y = clean + sigma * torch.randn(clean.shape, generator=g, dtype=F64)
    kw = dict(
        n_samples=3,
        mask=mask,
        normalisation={"scale": scale, "offset": 0.0},
        generator=torch.Generator().manual_seed(1),
        n_inner=5,
        data_std=0.3,
    )
    steps = 100 if guidance == "dps" else 20
    res = dps_sample(den, op, y, sigma, steps, 3.0, guidance=guidance, **kw)
    real = res.samples[:, :5]
    assert float(real.mean(dim=1).abs().max()) < 1e-9
    assert bool((res.samples[:, 5] == 0).all())
    free = dps_sample(den, op, y, sigma, steps, 0.0, guidance="dps", **kw)  # ζ = 0: the prior
    assert float(res.residual_norm.mean()) < 0.5 * float(free.residual_norm.mean())
    if guidance == "dps_x0":  # L-BFGS proximal steps reach the noise level (measured 1.01)
        assert float(res.residual_norm.max()) < 1.2 * res.target_residual_norm


def test_intensity_scale_from_images_recovers_a_known_scale():
    """c from the images' DC terms and the molecule's integral, never from the truth."""
    g = torch.Generator().manual_seed(4)
    size, px, k, n_atoms, amplitude = 32, 4.5, 300, 40, 1.0
    coords = 10.0 * torch.randn(n_atoms, 3, generator=g, dtype=F64)
    c_true = 0.37
    volume = c_true * gaussians_to_map(coords, size, px, 3.0, amplitude)
    defocus = torch.empty(k, dtype=F64).uniform_(10000.0, 25000.0, generator=g)
    params = CTFParams(
        defocus_u=defocus,
        defocus_v=defocus,
        defocus_angle=0.0,
        voltage=300.0,
        cs=2.7,
        amplitude_contrast=0.1,
        phase_shift=math.pi / 2,
    )
    op = ProjectionCTFOperator.from_ctf_params(
        random_rotations(k, g, F64), size, px, params, kernel="linear"
    )
    clean = op(volume)
    images = add_noise(clean, noise_sigma_for_snr(clean, 0.1), g)
    est = estimate_intensity_scale(images, n_atoms * amplitude, op.ctf_at_zero, px)
    assert est == pytest.approx(c_true, rel=0.05)


def test_potential_integral_is_the_integral_of_atoms_to_map():
    g = torch.Generator().manual_seed(0)
    elements = ["C", "N", "O", "S", "C", "H"]
    coords = 3.0 * torch.randn(len(elements), 3, generator=g, dtype=F64)
    volume = atoms_to_map(coords, elements, 24, 1.5, bfactors=torch.full((6,), 30.0), dtype=F64)
    assert potential_integral(elements) == pytest.approx(float(volume.sum()) * 1.5**3, rel=1e-6)


def test_dps_rejects_bad_inputs():
    den = AnalyticGaussianDenoiser(LinearSchedule(), torch.zeros(3, dtype=F64), 1.0)
    op = MatrixOperator(torch.eye(3, dtype=F64))
    y = torch.zeros(3, dtype=F64)
    with pytest.raises(InputError, match="noise sigma"):
        dps_sample(den, op, y, None, 5, guidance="pigdm")
    with pytest.raises(InputError, match="guidance"):
        dps_sample(den, op, y, 0.1, 5, guidance="magic")
    with pytest.raises(InputError, match="measurement"):
        dps_sample(den, op, torch.zeros(4, dtype=F64), 0.1, 5)
    calpha = CalphaProjectionOperator(torch.eye(3, dtype=F64)[None], 8, 1.0, 1.0, 3)
    with pytest.raises(InputError, match="linear operator"):
        dps_sample(den, calpha, torch.zeros(1, 8, 8, dtype=F64), 0.1, 5, guidance="pigdm")
    with pytest.raises(InputError, match="mask"):
        dps_sample(den, op, y, 0.1, 5, mask=torch.ones(3))


def test_antithetic_pairs_average_to_the_noise_free_mean():
    """For a Gaussian prior and linear A each step is affine in the noise, so a pair's mean
    is the same for every draw (the sampler's posterior mean), while its samples differ."""
    n, m, sigma, s = 8, 5, 0.1, 0.8
    mu, a, y, post_mean, _ = _problem(n, m, sigma, s, seed=2)
    den = AnalyticGaussianDenoiser(LinearSchedule(), mu, s)

    def draw(seed: int):
        return dps_sample(
            den,
            MatrixOperator(a),
            y,
            sigma,
            50,
            guidance="pigdm",
            sampler="ddim",
            eta=0.5,
            n_samples=6,
            n_inner=20,
            antithetic=True,
            generator=torch.Generator().manual_seed(seed),
            data_std=s,
        )

    r1, r2 = draw(1), draw(2)
    pairs = 0.5 * (r1.samples[:3] + r1.samples[3:])
    torch.testing.assert_close(pairs, pairs[:1].expand_as(pairs), rtol=0, atol=1e-9)
    torch.testing.assert_close(r1.mean, r2.mean, rtol=0, atol=1e-9)
    assert float((r1.samples[0] - r2.samples[0]).norm()) > 0.1  # the samples are random
    assert float((r1.mean - post_mean).norm()) < 0.05 * float((mu - post_mean).norm())
    assert r1.config["antithetic"] is True


def test_antithetic_pairs_need_an_even_batch_of_map_samples():
    den = AnalyticGaussianDenoiser(LinearSchedule(), torch.zeros(3, dtype=F64), 1.0)
    op = MatrixOperator(torch.eye(3, dtype=F64))
    y = torch.zeros(3, dtype=F64)
    with pytest.raises(InputError, match="even number of samples"):
        dps_sample(den, op, y, 0.1, 5, guidance="pigdm", n_samples=3, antithetic=True)
    with pytest.raises(InputError, match="even number of samples"):
        dps_sample(den, op, y, 0.1, 5, guidance="pigdm", n_samples=4, batch_size=3, antithetic=True)
