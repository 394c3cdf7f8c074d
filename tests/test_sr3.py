"""SR3 conditioning, conditional sampling with data consistency, and the regression baseline."""

from __future__ import annotations

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion import AnalyticGaussianDenoiser, CosineSchedule, Denoiser, dsm_loss
from cryoprior.networks import UNet
from cryoprior.physics.degrade import (
    DownsampleOperator,
    fourier_downsample,
    fourier_upsample,
    linear_upsample,
)
from cryoprior.solvers.sr3 import (
    RESOLUTION_SCALE,
    SR3Conditioner,
    _ConsistentDenoiser,
    factor_from_shapes,
    regression_loss,
    regression_predict,
    sr3_loss,
    sr3_sample,
)


def _unet(dims: int, cond: bool = True) -> UNet:
    torch.manual_seed(0)
    net = UNet(
        dims,
        1,
        1,
        base_channels=8,
        channel_mults=(1, 2),
        cond_channels=1 if cond else 0,
        n_extra_scalars=2,
    ).double()
    return net


def _randomise_output(net: UNet) -> None:
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)


@pytest.mark.parametrize("upsample", ["fourier", "linear"])
def test_conditioner_shapes_and_scalars(upsample, gen):
    cond = SR3Conditioner(2, upsample=upsample)
    low = torch.randn(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    out = cond(low, 2, 2.0)
    assert set(out) == {"cond", "extra_scalars"}
    assert out["cond"].shape == (3, 1, 12, 12)
    ref = (fourier_upsample if upsample == "fourier" else linear_upsample)(low, 2, ndim=2)
    torch.testing.assert_close(out["cond"], ref)
    # Nyquist resolutions 4 Å in, 2 Å out, over the stated scale
    expected = torch.tensor([[4.0, 2.0]], dtype=torch.float64) / RESOLUTION_SCALE
    torch.testing.assert_close(out["extra_scalars"], expected.expand(3, 2))
    res = torch.tensor([6.0, 7.0, 8.0])
    s = cond(low, 2, 2.0, input_resolution=res, output_resolution=3.0)["extra_scalars"]
    torch.testing.assert_close(s[:, 0], res.double() / RESOLUTION_SCALE)
    torch.testing.assert_close(s[:, 1], torch.full((3,), 0.3, dtype=torch.float64))


def test_conditioner_3d_and_errors(gen):
    cond = SR3Conditioner(3)
    low = torch.randn(2, 1, 4, 4, 4, generator=gen)
    out = cond(low, 3, 1.5)
    assert out["cond"].shape == (2, 1, 12, 12, 12)
    assert out["extra_scalars"].dtype == torch.float32
    torch.testing.assert_close(out["extra_scalars"][0], torch.tensor([0.3, 0.1]))
    with pytest.raises(InputError, match="spatial"):
        cond(torch.zeros(4, 4, 4), 2, 1.0)
    with pytest.raises(InputError, match="resolutions"):
        cond(low, 2, 1.0, input_resolution=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(InputError, match="factor"):
        factor_from_shapes(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 8, 12), 2)
    assert factor_from_shapes(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 12, 12), 2) == 3


@pytest.mark.parametrize(
    ("low_shape", "factor", "sampler", "mode"),
    [
        ((6, 6), 2, "ddim", True),
        ((5, 5), 3, "ddpm", "final"),
        ((4, 4, 4), 2, "ddim", "every_step"),
        ((3, 3, 3), 2, "ddpm", "every_step"),
    ],
)
def test_data_consistency(low_shape, factor, sampler, mode, gen):
    """fourier_downsample(sample) reproduces the low-res input (in physical units)."""
    high = tuple(n * factor for n in low_shape)
    den = AnalyticGaussianDenoiser(CosineSchedule(), 0.0, 1.0)
    low = 5.0 + 2.0 * torch.randn(*low_shape, generator=gen, dtype=torch.float64)
    kw = dict(n_samples=3, steps=8, sampler=sampler, norm_mean=5.0, norm_std=2.0)
    res = sr3_sample(den, low, factor, 2.0, generator=gen, data_consistency=mode, **kw)
    assert res.samples.shape == (3, *high) and res.mean.shape == high
    assert res.pixel_size == pytest.approx(2.0 / factor)
    down = fourier_downsample(res.samples, factor, ndim=len(low_shape))
    torch.testing.assert_close(down, low.expand_as(down), rtol=0, atol=1e-5)
    free = sr3_sample(den, low, factor, 2.0, generator=gen, **kw)
    err = (fourier_downsample(free.samples, factor, ndim=len(low_shape)) - low).abs().max()
    assert err > 0.1  # without the projection the prior ignores the measurement


@pytest.mark.parametrize("mode", ["final", "every_step"])
def test_residual_sampling_adds_the_upsampled_input_and_stays_consistent(mode, gen):
    # a residual prior's denoiser models the detail x − up(y): with a prior whose detail
    # is exactly 0 (analytic Gaussian of variance ~0) every sample is up(y); any
    # consistency mode reproduces the input
    low = 5.0 + 2.0 * torch.randn(4, 4, generator=gen, dtype=torch.float64)
    zero = AnalyticGaussianDenoiser(CosineSchedule(), 0.0, 1e-8)
    kw = dict(n_samples=2, steps=6, norm_mean=5.0, norm_std=2.0, generator=gen)
    res = sr3_sample(zero, low, 2, 2.0, residual=True, data_consistency=mode, **kw)
    up = fourier_upsample(low[None, None], 2, ndim=2)[0, 0]
    torch.testing.assert_close(res.mean, up, rtol=0, atol=1e-4)
    den = AnalyticGaussianDenoiser(CosineSchedule(), 0.0, 1.0)
    res = sr3_sample(den, low, 2, 2.0, residual=True, data_consistency=mode, **kw)
    down = fourier_downsample(res.samples, 2, ndim=2)
    torch.testing.assert_close(down, low.expand_as(down), rtol=0, atol=1e-5)
    assert float(res.std.max()) > 0.1  # the detail is sampled


def test_residual_sr3_loss_targets_the_detail(gen):
    # the DSM loss of a residual prior is the plain loss of the detail x − up(y)
    net = _unet(2)
    _randomise_output(net)
    den = Denoiser(net, CosineSchedule())
    high = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    low = fourier_downsample(high, 2, ndim=2)
    detail = high - fourier_upsample(low, 2, ndim=2)
    a, _ = sr3_loss(den, low, high, 2.0, generator=torch.Generator().manual_seed(1), residual=True)
    cond = SR3Conditioner(2)(low, 2.0, 2.0)
    b, _ = dsm_loss(den, detail, torch.Generator().manual_seed(1), cond=cond)
    torch.testing.assert_close(a, b)


def test_every_step_denoiser_is_consistent(gen):
    sched = CosineSchedule()
    op = DownsampleOperator((8, 8), 2)
    low = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64)
    wrapped = _ConsistentDenoiser(AnalyticGaussianDenoiser(sched, 0.0, 1.0), op, low)
    x_t = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    out = wrapped(x_t, 0.6)
    torch.testing.assert_close(op(out.x0), low.expand(2, 1, 4, 4))
    a, s = sched.alpha_sigma(torch.tensor(0.6, dtype=torch.float64))
    torch.testing.assert_close(a * out.x0 + s * out.eps, x_t)


def test_sr3_sample_with_unet_uses_conditioning(gen):
    net = _unet(2)
    _randomise_output(net)
    den = Denoiser(net, CosineSchedule())
    low = torch.randn(4, 4, generator=gen, dtype=torch.float64)

    def run(y: torch.Tensor, n: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return sr3_sample(den, y, 2, 3.0, n_samples=n, steps=3, generator=g).samples

    a = run(low)
    assert a.shape == (2, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, run(low))  # seeded: reproducible
    assert (a - run(low + 1.0)).abs().max() > 1e-4  # the low-res input reaches the net
    one = sr3_sample(den, low, 2, 3.0, n_samples=1, steps=2, generator=gen)
    assert torch.equal(one.std, torch.zeros(8, 8, dtype=torch.float64))
    chunked = sr3_sample(
        den, low, 2, 3.0, n_samples=3, steps=2, batch_size=2, generator=gen, sampler="ddpm"
    )
    assert chunked.samples.shape == (3, 8, 8) and bool((chunked.std > 0).all())


def test_sr3_loss_trains_the_conditional_net(gen):
    net = _unet(2)
    den = Denoiser(net, CosineSchedule())
    high = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    low = fourier_downsample(high, 2, ndim=2)
    loss, info = sr3_loss(den, low, high, 2.0, generator=gen)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0
    with pytest.raises(InputError):
        sr3_loss(den, low, high[..., :6, :8], 2.0, generator=gen)


def test_regression_baseline(gen):
    net = _unet(2, cond=False)  # untrained: zero output (zero-initialised last conv)
    high = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    low = fourier_downsample(high, 2, ndim=2)
    loss = regression_loss(net, low, high, 2.0)
    torch.testing.assert_close(loss, (high**2).flatten(1).mean(1))
    up = fourier_upsample(low, 2, ndim=2)
    loss_res = regression_loss(net, low, high, 2.0, residual=True)
    torch.testing.assert_close(loss_res, ((up - high) ** 2).flatten(1).mean(1))
    # a band-limited target is already explained by the upsampled input
    torch.testing.assert_close(
        regression_loss(net, low, up, 2.0, residual=True), torch.zeros(3, dtype=torch.float64)
    )
    _randomise_output(net)
    pred = regression_predict(net, low, 2, 2.0)
    assert pred.shape == high.shape
    regression_loss(net, low, high, 2.0).mean().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0


def test_bad_arguments(gen):
    den = AnalyticGaussianDenoiser(CosineSchedule(), 0.0, 1.0)
    low = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    with pytest.raises(InputError, match="sampler"):
        sr3_sample(den, low, 2, 1.0, sampler="euler")
    with pytest.raises(InputError, match="data_consistency"):
        sr3_sample(den, low, 2, 1.0, data_consistency="sometimes")
    with pytest.raises(InputError, match="whole number"):
        sr3_sample(den, low[:3, :3], 1.5, 1.0)
