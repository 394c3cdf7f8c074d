"""Denoising score matching: expected loss of the exact denoiser, weightings, masks, t draws."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cryoprior.core.errors import InputError
from cryoprior.diffusion import (
    AnalyticGaussianDenoiser,
    CosineSchedule,
    Denoiser,
    LinearSchedule,
    Polynomial2Schedule,
    VESchedule,
    dsm_loss,
    loss_weight,
    sample_time,
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


MU = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
SD = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SIDS)
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_exact_denoiser_loss_is_posterior_variance(sched, target, t):
    """For x0 ~ N(μ, s²) the exact denoiser's expected squared error is the posterior
    variance: x0: s²σ²/V; eps: α²s²/V; v: (SNR + 1) s²σ²/V, with V = α²s² + σ²."""
    den = AnalyticGaussianDenoiser(sched, MU, SD)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = den.sample(n, g)
    loss, info = dsm_loss(den, x0, g, target=target, t=t)
    assert loss.shape == (n,)
    torch.testing.assert_close(info["weight"], torch.ones(n, dtype=torch.float64))
    a2, s2 = sched.alpha2(torch.tensor(t)), sched.sigma2(torch.tensor(t))
    v = a2 * SD**2 + s2
    post = {"x0": SD**2 * s2 / v, "eps": a2 * SD**2 / v, "v": (a2 / s2 + 1) * SD**2 * s2 / v}
    expected = float(post[target].mean())
    # the mean of n scaled chi-square(1) terms: relative sd <= sqrt(2/n) = 1%
    assert float(loss.mean()) == pytest.approx(expected, rel=0.03)


def test_wrong_denoiser_has_larger_loss():
    sched = CosineSchedule()
    good = AnalyticGaussianDenoiser(sched, MU, SD)
    bad = AnalyticGaussianDenoiser(sched, MU + 0.3, SD)
    x0 = good.sample(4000, torch.Generator().manual_seed(1))
    lg, _ = dsm_loss(good, x0, torch.Generator().manual_seed(2))
    lb, _ = dsm_loss(bad, x0, torch.Generator().manual_seed(2))
    assert float(lb.mean()) > 1.05 * float(lg.mean())


class SmallNet(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(d + 1, 32), nn.Tanh(), nn.Linear(32, d)).double()

    def forward(self, x, c_noise):
        return self.lin(torch.cat([x, c_noise[:, None]], dim=1))


@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
@pytest.mark.parametrize("sched", SCHEDULES, ids=SIDS)
def test_snr_weightings_do_not_depend_on_target(weighting, sched, gen):
    """min-SNR-γ and EDM weights are weights on the x0 error: the same loss in every space."""
    torch.manual_seed(0)
    den = Denoiser(SmallNet(), sched, "v")
    x0 = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    losses = [
        dsm_loss(den, x0, weighting=weighting, target=tg, t=t, noise=noise)[0]
        for tg in ("eps", "x0", "v")
    ]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])
    uniform = [dsm_loss(den, x0, target=tg, t=t, noise=noise)[0] for tg in ("eps", "x0")]
    assert not torch.allclose(uniform[0], uniform[1])


def test_loss_weight_values():
    lam = torch.tensor([-4.0, 0.0, math.log(5.0), 4.0], dtype=torch.float64)
    snr = lam.exp()
    w = loss_weight("min_snr", lam, "eps", min_snr_gamma=5.0)
    torch.testing.assert_close(w, snr.clamp(max=5.0) / snr)  # Hang et al. 2023, Eq. 9
    torch.testing.assert_close(loss_weight("min_snr", lam, "v"), snr.clamp(max=5.0) / (snr + 1))
    torch.testing.assert_close(
        loss_weight("uniform", lam, "x0"), torch.ones(4, dtype=torch.float64)
    )
    torch.testing.assert_close(loss_weight(lambda x: 2 * x, lam, "x0"), 2 * lam)
    with pytest.raises(InputError, match="weighting"):
        loss_weight("p2", lam, "eps")
    den = AnalyticGaussianDenoiser(CosineSchedule(), 0.0, 1.0)
    x0, z = torch.ones(3, 2), torch.full((3, 2), 0.5)
    a = dsm_loss(den, x0, weighting=None, t=0.4, noise=z)[0]
    torch.testing.assert_close(a, dsm_loss(den, x0, weighting="uniform", t=0.4, noise=z)[0])


def test_edm_recipe_is_edm_loss(gen):
    """VE + preconditioning + EDM weight + x0 target = EDM's EDMLoss (Karras et al. 2022)."""
    sched, sd = VESchedule(), 0.5
    f_net = SmallNet()
    den = Denoiser(f_net, sched, "x0", precondition=True, sigma_data=sd)
    y = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    n = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    sigma = (torch.randn(16, generator=gen, dtype=torch.float64) * 1.2 - 1.2).exp()
    t = sched.t_from_sigma(sigma)
    loss, info = dsm_loss(den, y, weighting="edm", target="x0", t=t, noise=n)
    s = sigma[:, None]
    weight = (s**2 + sd**2) / (s * sd) ** 2
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), sigma.log() / 4
    x = y + n * s
    d = c_skip * x + c_out * f_net(c_in * x, c_noise)
    torch.testing.assert_close(loss, (weight * (d - y) ** 2).mean(1))
    torch.testing.assert_close(info["log_snr"], -2 * sigma.log())


def test_sample_time_distributions():
    g = torch.Generator().manual_seed(0)
    sched = VESchedule()
    t = sample_time(sched, 20000, g, "uniform", t_min=0.01)
    assert t.dtype == torch.float64 and float(t.min()) >= 0.01 and float(t.max()) <= 1.0
    assert float(t.mean()) == pytest.approx(0.505, abs=0.01)
    ts = sample_time(sched, 100, g, "stratified", t_min=0.0)
    counts = torch.histc(ts, bins=100, min=0.0, max=1.0)
    assert torch.equal(counts, torch.ones(100))  # one draw per stratum
    tl = sample_time(sched, 20000, g, "lognormal")
    ls = sched.sigma(tl).log()  # EDM: ln σ ~ N(-1.2, 1.2²)
    assert float(ls.mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(ls.std()) == pytest.approx(1.2, abs=0.03)
    with pytest.raises(InputError, match="t_sampling"):
        sample_time(sched, 4, g, "beta")


@pytest.mark.parametrize(
    "shape", [(3, 2, 6, 5), (3, 1, 4, 3, 5), (3, 7, 3)], ids=["image", "volume", "points"]
)
def test_loss_is_rank_agnostic_and_differentiable(shape, gen):
    conv = nn.Conv1d(1, 1, 3, padding=1).double()

    def net(x, c_noise, **cond):
        flat = x.reshape(x.shape[0], 1, -1)
        return conv(flat).reshape(x.shape) * (1 + c_noise.reshape(-1, *((1,) * (x.ndim - 1))))

    rep = "points" if len(shape) == 3 else "grid"
    den = Denoiser(net, CosineSchedule(), "eps", representation=rep)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    loss, info = dsm_loss(den, x0, gen, weighting="min_snr")
    assert loss.shape == (3,) and set(info) == {"t", "log_snr", "weight", "mse"}
    loss.mean().backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


class NodeNet(nn.Module):
    """Per-node MLP that records its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.seen = None

    def forward(self, x, c_noise, mask=None):
        self.seen = x
        c = c_noise[:, None, None].expand(*x.shape[:2], 1)
        return self.lin(torch.cat([x, c], dim=-1))


def test_masked_point_loss_ignores_padding_and_matches_unpadded(gen):
    sched = Polynomial2Schedule()
    net = NodeNet()
    den = Denoiser(net, sched, "eps", representation="points")
    sizes = [5, 3, 8]
    mask = (torch.arange(8)[None, :] < torch.tensor(sizes)[:, None]).float()
    x0 = torch.randn(3, 8, 3, generator=gen, dtype=torch.float64) + 2.0
    noise = torch.randn(3, 8, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    loss, _ = dsm_loss(den, x0, mask=mask, t=t, noise=noise)
    # the network saw a zero-COM, zero-padded x_t
    com = (net.seen * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert float(com.abs().max()) < 1e-12
    assert float((net.seen * (1 - mask[..., None])).abs().max()) == 0.0
    pad = (1 - mask[..., None]) * 100.0
    loss2, _ = dsm_loss(den, x0 + pad, mask=mask, t=t, noise=noise - pad)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for b, n in enumerate(sizes):  # same as each cloud alone, without padding or mask
        lb, _ = dsm_loss(den, x0[b : b + 1, :n], t=t[b : b + 1], noise=noise[b : b + 1, :n])
        torch.testing.assert_close(lb[0], loss[b])
    # drawn noise is in the zero-COM subspace: translating x0 does not change the loss
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    la, _ = dsm_loss(den, x0, g1, mask=mask)
    lb, _ = dsm_loss(den, x0 + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), g2, mask=mask)
    torch.testing.assert_close(la, lb)


def test_loss_rejects_bad_target(gen):
    den = AnalyticGaussianDenoiser(LinearSchedule(), 0.0, 1.0)
    with pytest.raises(InputError, match="target"):
        dsm_loss(den, torch.zeros(2, 2), gen, target="score")
