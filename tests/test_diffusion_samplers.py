"""Denoiser contract, analytic denoisers, samplers and point-cloud (zero-COM) mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cryoprior.core.errors import InputError
from cryoprior.diffusion import (
    AnalyticGaussianDenoiser,
    AnalyticGMMDenoiser,
    CosineSchedule,
    Denoiser,
    LinearSchedule,
    Polynomial2Schedule,
    VESchedule,
    assert_zero_com,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dsm_loss,
    make_schedule,
    ode_sample,
    pc_sample,
    remove_mean,
    reverse_sde_sample,
    sample_zero_com_noise,
)

SCHEDULES = [LinearSchedule(), CosineSchedule(), Polynomial2Schedule(), VESchedule()]
SIDS = [s.name for s in SCHEDULES]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = {"image": (3, 2, 5, 4), "volume": (3, 1, 3, 4, 5), "points": (3, 6, 3)}


class OracleNet(nn.Module):
    """Returns the exact eps / x0 / v for x_t built from known (x0, eps)."""

    def __init__(self, x0, eps, sched, prediction):
        super().__init__()
        self.x0, self.eps, self.sched, self.prediction = x0, eps, sched, prediction
        self.c_noise = None

    def forward(self, x, c_noise, **cond):
        self.c_noise = c_noise
        if self.prediction == "eps":
            return self.eps
        if self.prediction == "x0":
            return self.x0
        a, s = (v.reshape(-1, *((1,) * (x.ndim - 1))) for v in self.sched.alpha_sigma(self.t))
        r = (a**2 + s**2).sqrt()
        return (a / r * self.eps - s / r * self.x0).to(x.dtype)


# --------------------------------------------------------------------------- denoiser
@pytest.mark.parametrize("sched", SCHEDULES, ids=SIDS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoiser_prediction_round_trip(sched, prediction, kind, dtype, gen):
    shape = SHAPES[kind]
    x0 = torch.randn(shape, generator=gen, dtype=dtype)
    eps = torch.randn(shape, generator=gen, dtype=dtype)
    if kind == "points":  # the points mode projects both onto the zero-COM subspace
        x0, eps = remove_mean(x0), remove_mean(eps)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    net = OracleNet(x0, eps, sched, prediction)
    net.t = t
    rep = "points" if kind == "points" else "grid"
    den = Denoiser(net, sched, prediction, representation=rep)
    x_t = sched.marginal(x0, t, eps)
    out = den(x_t, t)
    tol = dict(rtol=1e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.x0, x0, **tol)
    torch.testing.assert_close(out.eps, eps, **tol)
    sig = sched.sigma(t).reshape(-1, *((1,) * (len(shape) - 1))).to(dtype)
    torch.testing.assert_close(out.score, -eps / sig, **tol)
    assert out.x0.dtype == dtype
    # default noise label: -lambda/8 = log(sigma/alpha)/4
    torch.testing.assert_close(net.c_noise, (-sched.log_snr(t) / 8).to(dtype))


def test_denoiser_c_noise_t_and_validation(gen):
    sched = LinearSchedule()
    seen = {}

    def net(x, c_noise, **cond):
        seen["c"], seen["cond"] = c_noise, cond
        return torch.zeros_like(x)

    den = Denoiser(net, sched, "eps", c_noise="t")
    x = torch.randn(4, 2, generator=gen)
    den(x, 0.3, label=7)
    torch.testing.assert_close(seen["c"], torch.full((4,), 0.3))
    assert seen["cond"] == {"label": 7}
    with pytest.raises(InputError, match="precondition"):
        Denoiser(net, sched, "eps", precondition=True)
    with pytest.raises(InputError, match="prediction"):
        Denoiser(net, sched, "score")
    with pytest.raises(InputError, match="node mask"):
        den(x, 0.3, mask=torch.ones(4, 2))
    with pytest.raises(InputError, match="shape"):
        den(x, torch.tensor([0.1, 0.2]))
    cfg = Denoiser(net, VESchedule(), "x0", precondition=True, sigma_data=1.0).config()
    assert cfg["schedule"] == VESchedule().config() and cfg["sigma_data"] == 1.0
    rebuilt = Denoiser(net, make_schedule(**cfg.pop("schedule")), **cfg)
    assert (
        rebuilt.config()
        == Denoiser(net, VESchedule(), "x0", precondition=True, sigma_data=1.0).config()
    )


def test_edm_preconditioning_matches_karras(gen):
    """VE + precondition is EDM's EDMPrecond (Karras et al. 2022, Table 1)."""
    sched, sd = VESchedule(), 0.5
    f_net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def net(x, c_noise):
        return f_net(x) * (1 + c_noise[:, None])

    den = Denoiser(net, sched, "x0", precondition=True, sigma_data=sd)
    t = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    x = torch.randn(3, 3, generator=gen, dtype=torch.float64) * 10
    sigma = sched.sigma(t)[:, None]
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    ref = c_skip * x + c_out * f_net(c_in * x) * (1 + c_noise)
    torch.testing.assert_close(den(x, t).x0, ref)


def test_analytic_gaussian_is_the_noised_marginal_score(gen):
    sched = CosineSchedule()
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sd = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    den = AnalyticGaussianDenoiser(sched, mu, sd)
    t = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    x = torch.randn(3, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    a, s = (v[:, None] for v in sched.alpha_sigma(t))
    logp = torch.distributions.Normal(a * mu, (a**2 * sd**2 + s**2).sqrt()).log_prob(x).sum()
    (score,) = torch.autograd.grad(logp, x)
    out = den(x.detach(), t)
    torch.testing.assert_close(out.score, score)
    torch.testing.assert_close(out.x0, (x.detach() + s**2 * score) / a)  # Tweedie
    torch.testing.assert_close(out.eps, -s * score)


def test_analytic_gmm_is_the_noised_mixture_score(gen):
    sched = LinearSchedule()
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mu = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
    sd = torch.tensor([[0.3, 0.6], [0.5, 0.5], [0.4, 0.2]], dtype=torch.float64)
    den = AnalyticGMMDenoiser(sched, w, mu, sd)
    t = torch.tensor([0.02, 0.3, 0.6, 0.95], dtype=torch.float64)
    x = (3 * torch.randn(4, 2, generator=gen, dtype=torch.float64)).requires_grad_(True)
    a, s = (v[:, None, None] for v in sched.alpha_sigma(t))
    comp = torch.distributions.Independent(
        torch.distributions.Normal(a * mu, (a**2 * sd**2 + s**2).sqrt()), 1
    )
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(w), comp)
    (score,) = torch.autograd.grad(mix.log_prob(x).sum(), x)
    out = den(x.detach(), t)
    torch.testing.assert_close(out.score, score)
    torch.testing.assert_close(out.x0, (x.detach() + s[:, 0] ** 2 * score) / a[:, 0])


# --------------------------------------------------------------------------- steps
def test_ddim_eta1_is_ddpm_and_eta0_deterministic(gen):
    sched = Polynomial2Schedule()
    den = AnalyticGaussianDenoiser(sched, torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.2]))
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    out = den(x, 0.6)
    a = ddim_step(sched, x, out, 0.6, 0.5, eta=1.0, noise=z)
    b = ddpm_step(sched, x, out, 0.6, 0.5, noise=z)
    torch.testing.assert_close(a, b)
    c = ddim_step(sched, x, out, 0.6, 0.5, eta=0.0)
    assert not torch.allclose(a, c)
    with pytest.raises(InputError, match="noise"):
        ddpm_step(sched, x, out, 0.6, 0.5)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SIDS)
def test_ddim_sampler_deterministic_given_x_T(sched):
    den = AnalyticGaussianDenoiser(sched, torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5]))
    x_T = sched.prior_std() * torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = ddim_sample(den, (200, 2), 20, generator=g1, x_T=x_T)
    b = ddim_sample(den, (200, 2), 20, generator=g2, x_T=x_T)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ddim_sample(den, (200, 2), 20, generator=g1, eta=1.0, x_T=x_T)
    assert (a - c).abs().mean() > 0.05
    # Euler on the probability-flow ODE in EDM's variables is DDIM (eta = 0)
    e = ode_sample(den, (200, 2), 20, method="euler", x_T=x_T, spacing="uniform")
    torch.testing.assert_close(e, a, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- distributions
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SD = torch.tensor([0.5, 1.5], dtype=torch.float64)
SAMPLERS = {
    "ddpm": (ddpm_sample, dict(n_steps=500)),
    "ddim": (ddim_sample, dict(n_steps=250)),
    "sde": (reverse_sde_sample, dict(n_steps=1000)),
    "pc": (pc_sample, dict(n_steps=400)),
    "ode": (ode_sample, dict(n_steps=80)),
}


@pytest.mark.parametrize("sched", SCHEDULES, ids=SIDS)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_match_gaussian_moments(sched, name):
    fn, kw = SAMPLERS[name]
    den = AnalyticGaussianDenoiser(sched, MU, SD)
    n = 4000
    g = torch.Generator().manual_seed(11)
    x = fn(den, (n, 2), generator=g, dtype=torch.float64, **kw)
    assert x.shape == (n, 2) and x.dtype == torch.float64
    se = SD / math.sqrt(n)
    assert bool(((x.mean(0) - MU).abs() < 4.5 * se + 0.01).all()), x.mean(0)
    assert bool(((x.std(0) / SD - 1).abs() < 0.05).all()), x.std(0)
    cov = torch.cov(x.T)[0, 1] / (SD[0] * SD[1])
    assert abs(float(cov)) < 0.06


def _energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


GMM_W = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
GMM_MU = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
GMM_SD = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)


def _component(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, GMM_MU).argmin(1)


@pytest.mark.parametrize(
    "sched,name",
    [
        (LinearSchedule(), "ddpm"),
        (CosineSchedule(), "ddim"),
        (VESchedule(), "ode"),
        (Polynomial2Schedule(), "pc"),
        (CosineSchedule(), "sde"),
    ],
    ids=["linear-ddpm", "cosine-ddim", "ve-ode", "poly2-pc", "cosine-sde"],
)
def test_samplers_match_gaussian_mixture(sched, name):
    fn, kw = SAMPLERS[name]
    den = AnalyticGMMDenoiser(sched, GMM_W, GMM_MU, GMM_SD)
    g = torch.Generator().manual_seed(5)
    n = 2000
    x = fn(den, (n, 2), generator=g, dtype=torch.float64, **kw)
    ref = den.sample(n, g)
    floor = _energy_distance(den.sample(n, g), ref)
    ed = _energy_distance(x, ref)
    # a Gaussian with the mixture's mean and covariance must fail the same criterion
    mean, cov = ref.mean(0), torch.cov(ref.T)
    gauss = (
        mean + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    )
    limit = 3 * floor + 0.003
    assert ed < limit, (ed, floor)
    assert _energy_distance(gauss, ref) > 5 * limit
    comp = _component(x)
    frac = torch.bincount(comp, minlength=3).double() / n
    assert bool(((frac - GMM_W).abs() < 0.04).all()), frac
    for k in range(3):
        xs = x[comp == k]
        assert bool(((xs.mean(0) - GMM_MU[k]).abs() < 0.08).all())
        assert bool(((xs.std(0) / GMM_SD[k] - 1).abs() < 0.15).all())


class TinyMLP(nn.Module):
    """x (B, 2) and c_noise (B,) -> (B, 2): Fourier features of c_noise, three SiLU layers."""

    def __init__(self, hidden: int = 64, n_freq: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(50.0), n_freq)))
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * n_freq, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        a = c_noise[:, None] * self.freqs
        return self.net(torch.cat([x, a.sin(), a.cos()], dim=1))


def test_learned_mlp_ddim_matches_mixture_moments():
    """Train a tiny MLP with dsm_loss (EDM recipe) on a 2-D mixture; DDIM samples match."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sched = VESchedule(sigma_max=20.0)
    target = AnalyticGMMDenoiser(
        sched,
        torch.tensor([0.5, 0.5]),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]]),
        torch.tensor([0.5, 0.5]),
    )
    den = Denoiser(TinyMLP(), sched, "x0", precondition=True, sigma_data=1.5)
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    steps = 1000
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = target.sample(256, g).float()
        loss, _ = dsm_loss(den, x0, g, weighting="edm", target="x0", t_sampling="lognormal")
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        lr.step()
    x = ddim_sample(den, (4000, 2), n_steps=100, generator=g)
    ref = target.sample(4000, g).float()
    assert bool(((x.mean(0) - ref.mean(0)).abs() < 0.15).all()), x.mean(0)
    assert bool(((x.std(0) / ref.std(0) - 1).abs() < 0.1).all()), x.std(0)
    assert abs(float((x[:, 0] > 0).float().mean()) - 0.5) < 0.06
    assert _energy_distance(x.double(), ref.double()) < 0.05


# --------------------------------------------------------------------------- shapes, API
@pytest.mark.parametrize("kind", ["image", "volume"])
def test_samplers_are_rank_agnostic(kind):
    shape = SHAPES[kind]
    sched = LinearSchedule()
    mu = torch.linspace(-1, 1, math.prod(shape[1:]), dtype=torch.float64)
    sd = torch.linspace(0.5, 1.5, math.prod(shape[1:]), dtype=torch.float64)
    flat = AnalyticGaussianDenoiser(sched, mu, sd)
    full = AnalyticGaussianDenoiser(sched, mu.reshape(shape[1:]), sd.reshape(shape[1:]))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for fn in (ddim_sample, ddpm_sample, pc_sample):
        a = fn(full, shape, 10, generator=torch.Generator().manual_seed(1), x_T=x_T)
        b = fn(
            flat,
            (shape[0], mu.numel()),
            10,
            generator=torch.Generator().manual_seed(1),
            x_T=x_T.reshape(shape[0], -1),
        )
        assert a.shape == shape
        torch.testing.assert_close(a.reshape(shape[0], -1), b)


def test_sampler_dtype_callback_and_errors():
    sched = CosineSchedule()
    den = AnalyticGaussianDenoiser(sched, 0.0, 1.0)
    calls = []

    def cb(i, x, out):
        calls.append(i)
        return torch.zeros_like(x) if i == 4 else None

    x = ddpm_sample(den, (5, 3), 5, generator=torch.Generator().manual_seed(0), callback=cb)
    assert x.dtype == torch.float32 and calls == [0, 1, 2, 3, 4]
    assert float(x.abs().max()) == 0.0  # the last callback's tensor replaced x
    with pytest.raises(InputError, match="x_T"):
        ddim_sample(den, (5, 3), 5, t_start=0.5)
    with pytest.raises(InputError, match="shape"):
        ddim_sample(den, (5, 3), 5, x_T=torch.zeros(4, 3))
    with pytest.raises(InputError, match="points"):
        ddim_sample(den, (5, 3), 5, mask=torch.ones(5, 3))
    x0 = torch.ones(5, 3)
    y = ddim_sample(den, (5, 3), 10, x_T=sched.marginal(x0, 0.3, torch.zeros(5, 3)), t_start=0.3)
    assert y.shape == (5, 3)


# --------------------------------------------------------------------------- point clouds
def _mask(sizes: list[int], n: int) -> torch.Tensor:
    return (torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]).float()


def test_remove_mean_and_zero_com_noise(gen):
    mask = _mask([5, 3, 8], 8)
    x = torch.randn(3, 8, 3, generator=gen, dtype=torch.float64) + 4.0
    y = remove_mean(x, mask)
    assert_zero_com(y, mask)
    assert float((y * (1 - mask[..., None])).abs().max()) == 0.0
    for b, n in enumerate([5, 3, 8]):
        torch.testing.assert_close(y[b, :n], x[b, :n] - x[b, :n].mean(0))
    with pytest.raises(AssertionError, match="centre of mass"):
        assert_zero_com(x, mask)
    with pytest.raises(AssertionError, match="padded"):
        assert_zero_com(y + (1 - mask[..., None]), mask)
    # noise restricted to the zero-COM subspace: per-coordinate variance (n-1)/n
    m = _mask([4], 6).expand(20000, 6)
    z = sample_zero_com_noise((20000, 6, 3), m, gen, torch.float64)
    assert_zero_com(z, m)
    assert float(z[:, :4].var(0).mean()) == pytest.approx(3 / 4, rel=0.02)
    assert float(z[:, 4:].abs().max()) == 0.0


class NodeNet(nn.Module):
    """A per-node MLP (not translation-equivariant on purpose: the denoiser must fix COM)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.mask_seen = None

    def forward(self, x, c_noise, mask=None):
        self.mask_seen = mask
        c = c_noise[:, None, None].expand(*x.shape[:2], 1)
        return self.lin(torch.cat([x, c], dim=-1)) + 1.0


@pytest.mark.parametrize(
    "fn", [ddpm_sample, ddim_sample, reverse_sde_sample, pc_sample, ode_sample]
)
def test_point_cloud_samples_zero_com_padding_zero(fn):
    sched = Polynomial2Schedule()
    net = NodeNet()
    den = Denoiser(net, sched, "eps", representation="points")
    mask = _mask([6, 4, 9], 10)
    x = fn(
        den,
        (3, 10, 3),
        8,
        generator=torch.Generator().manual_seed(0),
        mask=mask,
        dtype=torch.float64,
    )
    assert net.mask_seen is mask or torch.equal(net.mask_seen, mask)
    assert_zero_com(x, mask, atol=1e-10)
    assert float((x * (1 - mask[..., None])).abs().max()) == 0.0
    assert float(x[:, :4].abs().max()) > 0.1
    out = den(x, 0.3, mask=mask)
    assert_zero_com(out.x0, mask, atol=1e-10)
    assert_zero_com(out.eps, mask, atol=1e-10)


def test_point_cloud_analytic_gaussian_variance():
    """Isotropic N(0, s²) data restricted to the zero-COM subspace: coordinates of a cloud of
    n real nodes have variance s²(n-1)/n, padding stays 0."""
    sched, s = LinearSchedule(), 1.3
    den = AnalyticGaussianDenoiser(sched, 0.0, s, representation="points")
    mask = _mask([3, 7], 8).repeat(1000, 1)
    x = ddpm_sample(
        den,
        (2000, 8, 3),
        200,
        generator=torch.Generator().manual_seed(0),
        mask=mask,
        dtype=torch.float64,
    )
    assert_zero_com(x, mask, atol=1e-10)
    v3 = float(x[0::2, :3].var(0).mean())
    v7 = float(x[1::2, :7].var(0).mean())
    assert v3 == pytest.approx(s**2 * 2 / 3, rel=0.05)
    assert v7 == pytest.approx(s**2 * 6 / 7, rel=0.05)
    assert float(x[0::2, 3:].abs().max()) == 0.0
