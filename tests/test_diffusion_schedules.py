"""Noise schedules: VP identities, monotone log-SNR, SDE coefficients, endpoints, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion import (
    CosineSchedule,
    LinearSchedule,
    Polynomial2Schedule,
    VESchedule,
    make_schedule,
)

ALL = [LinearSchedule(), CosineSchedule(), Polynomial2Schedule(), VESchedule()]
VP = [s for s in ALL if s.kind == "vp"]
IDS = [s.name for s in ALL]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def grid(n: int = 201, lo: float = 0.0, hi: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=dtype)


@pytest.mark.parametrize("sched", VP, ids=[s.name for s in VP])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vp_alpha2_plus_sigma2_is_one(sched, dtype):
    t = grid(dtype=dtype)
    a2, s2 = sched.alpha2(t), sched.sigma2(t)
    assert a2.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(a2 + s2, torch.ones_like(t), atol=tol, rtol=0)
    assert float(a2.min()) > 0 and float(s2.min()) >= 0


@pytest.mark.parametrize("sched", ALL, ids=IDS)
def test_log_snr_strictly_decreasing_and_invertible(sched):
    t = grid(401, 0.002, 1.0)
    lam = sched.log_snr(t)
    assert torch.isfinite(lam).all()
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(sched.t_from_log_snr(lam), t, atol=1e-7, rtol=0)
    # alpha and sigma from the log-SNR: alpha²/sigma² = exp(lambda)
    torch.testing.assert_close(
        sched.alpha(t) ** 2 / sched.sigma(t) ** 2, lam.exp(), rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("sched", ALL, ids=IDS)
def test_derivatives_match_finite_differences(sched):
    t = grid(97, 0.01, 0.99)
    h = 1e-6
    fd_a2 = (sched.alpha2(t + h) - sched.alpha2(t - h)) / (2 * h)
    fd_s2 = (sched.sigma2(t + h) - sched.sigma2(t - h)) / (2 * h)
    torch.testing.assert_close(sched.d_alpha2(t), fd_a2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sched.d_sigma2(t), fd_s2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sched", VP, ids=[s.name for s in VP])
def test_vp_sde_is_beta_form(sched):
    # For VP, f = -beta/2 and g² = beta (Song et al. 2021, Eq. 11): g² = -2 f.
    t = grid(50, 0.01, 0.99)
    torch.testing.assert_close(sched.diffusion2(t), -2 * sched.drift(t), rtol=1e-9, atol=1e-12)
    if isinstance(sched, LinearSchedule):
        torch.testing.assert_close(sched.diffusion2(t), sched.beta(t), rtol=1e-9, atol=0)


def _rk4_linear(a: np.ndarray, b: np.ndarray, y0: float, h: float) -> np.ndarray:
    """RK4 for y' = a(t) y + b(t) with a, b sampled at t_0, t_0 + h/2, t_0 + h, ... (2n+1)."""
    ys, y = [y0], y0
    for i in range(0, len(a) - 1, 2):
        k1 = a[i] * y + b[i]
        k2 = a[i + 1] * (y + h / 2 * k1) + b[i + 1]
        k3 = a[i + 1] * (y + h / 2 * k2) + b[i + 1]
        k4 = a[i + 2] * (y + h * k3) + b[i + 2]
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    return np.array(ys)


def _rk4_linear(a: np.ndarray, b: np.ndarray, y0: float, h: float) -> np.ndarray:
    """RK4 for y' = a(t) y + b(t) with a, b sampled at t_0, t_0 + h/2, t_0 + h, ... (2n+1)."""
    ys, y = [y0], y0
    for i in range(0, len(a) - 1, 2):
        k1 = a[i] * y + b[i]
        k2 = a[i + 1] * (y + h / 2 * k1) + b[i + 1]
        k3 = a[i + 1] * (y + h / 2 * k2) + b[i + 1]
        k4 = a[i + 2] * (y + h * k3) + b[i + 2]
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    return np.array(ys)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
@pytest.mark.parametrize("data_var", [0.0, 0.7])
def test_sde_moments_match_marginal(sched, data_var):
    """Integrate the forward SDE's moment ODEs v' = 2 f v + g², m' = f m and compare with the
    marginal α² Var(x0) + σ² and α m0 (Song et al. 2021, App. B, Eq. 33)."""
    t0, m0, n = 1e-3, 1.3, 4000
    fine = torch.linspace(t0, 1.0, 2 * n + 1, dtype=torch.float64)
    f, g2 = sched.drift(fine).numpy(), sched.diffusion2(fine).numpy()
    tt = fine[::2]
    var_true = (sched.alpha2(tt) * data_var + sched.sigma2(tt)).numpy()
    mean_true = (sched.alpha(tt) * m0).numpy()
    h = (1.0 - t0) / n
    var_num = _rk4_linear(2 * f, g2, var_true[0], h)
    mean_num = _rk4_linear(f, np.zeros_like(f), mean_true[0], h)
    np.testing.assert_allclose(var_num, var_true, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(mean_num, mean_true, rtol=1e-5, atol=1e-9)


def test_polynomial_2_endpoints_and_discrete_variant():
    s = 1e-5
    sched = Polynomial2Schedule(s)
    z, o = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert float(sched.alpha2(z)) == pytest.approx(1 - s, abs=1e-15)
    assert float(sched.alpha2(o)) == pytest.approx(s, abs=1e-15)
    assert float(sched.sigma2(z)) == pytest.approx(s, rel=1e-12)
    assert float(sched.log_snr(z)) == pytest.approx(math.log((1 - s) / s), rel=1e-12)
    assert float(sched.log_snr(o)) == pytest.approx(-math.log((1 - s) / s), rel=1e-12)
    # e3_diffusion's discrete construction (polynomial_schedule + clip_noise_schedule)
    T = 1000
    steps = T + 1
    x = np.linspace(0, steps, steps)
    a2 = (1 - np.power(x / steps, 2)) ** 2
    a2 = np.concatenate([np.ones(1), a2])
    step = np.clip(a2[1:] / a2[:-1], a_min=0.001, a_max=1.0)
    a2 = np.cumprod(step)
    a2 = (1 - 2 * s) * a2 + s
    ti = torch.tensor(x / steps, dtype=torch.float64)
    cont = sched.alpha2(ti).numpy()
    np.testing.assert_allclose(cont[:-1], a2[:-1], rtol=1e-12, atol=1e-15)
    assert abs(cont[-1] - a2[-1]) < 1e-6  # only the clipped last point differs (by ~s·1e-3)


def test_linear_matches_ddpm_discretisation():
    sched = LinearSchedule.from_discrete(1e-4, 0.02, 1000)
    assert (sched.beta_min, sched.beta_max) == pytest.approx((0.1, 20.0))
    betas = np.linspace(1e-4, 0.02, 1000)
    log_abar = np.cumsum(np.log1p(-betas))
    t = torch.tensor(np.arange(1, 1001) / 1000, dtype=torch.float64)
    diff = np.abs(sched.alpha2(t).log().numpy() - log_abar)
    # first order: sum of beta_i; the continuous limit drops the O(sum beta²) ~ 0.07 term
    assert diff.max() < 0.08
    assert diff[:500].max() < 0.02


def test_cosine_follows_nichol_curve_and_clip():
    sched = CosineSchedule()
    s = 0.008

    def nichol(tau):  # Nichol & Dhariwal 2021, Eq. 17
        f = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
        return f / math.cos(s / (1 + s) * math.pi / 2) ** 2

    # Nichol's time where the log-SNR reaches -10: the end of the clipped curve
    a2_end = 1 / (1 + math.exp(10.0))
    tau_max = math.acos(math.sqrt(a2_end) * math.cos(s / (1 + s) * math.pi / 2))
    tau_max = tau_max * 2 * (1 + s) / math.pi - s
    assert tau_max == pytest.approx(0.9957, abs=2e-4)
    t = grid(101, 0.0, 1.0)
    torch.testing.assert_close(sched.alpha2(t), nichol(t * tau_max), rtol=1e-10, atol=1e-15)
    assert float(sched.log_snr(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(-10.0)
    # the clip barely moves the curve away from the end
    half = t <= 0.5
    assert float((sched.alpha2(t)[half] - nichol(t)[half]).abs().max()) < 5e-3


def test_ve_is_edm_rho_grid():
    sched = VESchedule(0.002, 80.0, 7.0)
    n = 18  # EDM's N
    ts = sched.timesteps(n - 1)
    sig = sched.sigma(ts)
    i = torch.arange(n, dtype=torch.float64)
    edm = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM Eq. 5
    torch.testing.assert_close(sig, edm, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.alpha(ts), torch.ones_like(ts))
    assert sched.prior_std() == 80.0
    torch.testing.assert_close(sched.timesteps(n - 1, spacing="edm"), ts, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.t_from_sigma(sig), ts, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sched", ALL, ids=IDS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_timesteps_grid(sched, n):
    for spacing in ("uniform", "edm"):
        ts = sched.timesteps(n, spacing=spacing)
        assert ts.shape == (n + 1,) and ts.dtype == torch.float64
        assert float(ts[0]) == 1.0
        assert bool((ts[1:] < ts[:-1]).all())
    assert float(sched.timesteps(n)[-1]) == 0.0
    # EDM spacing of sigma/alpha: constant step in (sigma/alpha)^(1/7)
    ts = sched.timesteps(n, spacing="edm")
    st = (sched.sigma2(ts) / sched.alpha2(ts)).sqrt() ** (1 / 7)
    d = st[1:] - st[:-1]
    torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-6, atol=1e-9)
    assert float(sched.sigma(ts[-1]) / sched.alpha(ts[-1])) == pytest.approx(
        max(0.002, float(sched.sigma(torch.tensor(0.0)) / sched.alpha(torch.tensor(0.0)))),
        rel=1e-6,
    )
    ts = sched.timesteps(n, t_start=0.6)
    assert float(ts[0]) == 0.6 and float(ts[-1]) == 0.0


@pytest.mark.parametrize("sched", ALL, ids=IDS)
@pytest.mark.parametrize(
    "shape", [(3, 2, 5, 4), (3, 1, 4, 3, 5), (3, 7, 3)], ids=["image", "volume", "points"]
)
def test_marginal_is_rank_agnostic(sched, shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    xt = sched.marginal(x0, t, eps)
    for b in range(3):
        ref = sched.alpha(t[b]) * x0[b] + sched.sigma(t[b]) * eps[b]
        torch.testing.assert_close(xt[b], ref)


def test_make_schedule_round_trip_and_errors():
    for s in ALL:
        s2 = make_schedule(**s.config())
        assert type(s2) is type(s) and s2.config() == s.config()
    assert isinstance(make_schedule("edm"), VESchedule)
    assert make_schedule("cosine", s=0.01).s == 0.01
    with pytest.raises(InputError, match="unknown noise schedule"):
        make_schedule("quadratic")
    with pytest.raises(InputError, match="bad parameters"):
        make_schedule("linear", beta=3)
    with pytest.raises(InputError):
        LinearSchedule(beta_min=1.0, beta_max=0.5)
    with pytest.raises(InputError):
        VESchedule().timesteps(0)
    with pytest.raises(InputError):
        VESchedule().timesteps(10, spacing="cubic")


def test_prior_sample_std(gen):
    assert LinearSchedule().prior_std() == pytest.approx(1.0)
    x = VESchedule(sigma_max=5.0).prior_sample((20000,), gen, dtype=torch.float64)
    assert float(x.std()) == pytest.approx(5.0, rel=0.03)
