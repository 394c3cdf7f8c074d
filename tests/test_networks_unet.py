"""U-Net: shapes in 2-D and 3-D, conditioning, size validation, gradients, registry."""

from __future__ import annotations

import json

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.networks import UNet, build_network, network_config


def perturb_output_layer(net: UNet, seed: int = 0) -> None:
    """Give the zero-initialised last convolution random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("size", [28, 32, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_2d(gen, size, dtype):
    torch.manual_seed(0)
    net = UNet(2, in_channels=2, out_channels=2, base_channels=16, groups=4).to(dtype)
    x = torch.randn(2, 2, size, size, generator=gen).to(dtype)
    out = net(x, torch.rand(2).to(dtype))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.all(out == 0)  # zero-initialised output layer
    perturb_output_layer(net)
    assert net(x, torch.rand(2).to(dtype)).abs().max() > 0


def test_shape_3d_rectangular_and_out_channels(gen):
    torch.manual_seed(0)
    net = UNet(
        3,
        in_channels=1,
        out_channels=3,
        base_channels=8,
        channel_mults=(1, 2),
        attention=True,
        attention_heads=2,
        groups=4,
    )
    x = torch.randn(2, 1, 16, 16, 16, generator=gen)
    assert net(x, torch.rand(2)).shape == (2, 3, 16, 16, 16)
    x = torch.randn(1, 1, 6, 10, 8, generator=gen)
    assert net(x, 0.5).shape == (1, 3, 6, 10, 8)


def test_attention_keeps_batch_elements_independent(gen):
    torch.manual_seed(0)
    plain = UNet(2, 1, 1, base_channels=8, groups=4)
    torch.manual_seed(0)
    attn = UNet(2, 1, 1, base_channels=8, groups=4, attention=True)
    perturb_output_layer(plain)
    perturb_output_layer(attn)
    assert len(list(attn.parameters())) > len(list(plain.parameters()))
    x = torch.randn(1, 1, 16, 16, generator=gen)
    # a batch element's output must not depend on another batch element
    x2 = torch.cat([x, torch.randn(1, 1, 16, 16, generator=gen)])
    c = torch.tensor([0.3, 0.3])
    # (float32 batched vs single convolutions differ by ~1e-5; a leak would be ~1e-1)
    assert torch.allclose(attn(x2, c)[:1], attn(x, c[:1]), atol=1e-4)


@pytest.mark.parametrize("size", [(30, 28), (28, 14), (17, 16)])
def test_incompatible_sizes_raise(size):
    net = UNet(2, 1, 1, base_channels=8, groups=4, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, *size), 0.0)


def test_bad_inputs_raise():
    net = UNet(2, 1, 1, base_channels=8, groups=4)
    with pytest.raises(InputError, match="shape"):
        net(torch.zeros(1, 2, 8, 8), 0.0)
    with pytest.raises(InputError, match="shape"):
        net(torch.zeros(1, 1, 8, 8, 8), 0.0)
    with pytest.raises(InputError, match="cond_channels=0"):
        net(torch.zeros(1, 1, 8, 8), 0.0, cond=torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="n_extra_scalars=0"):
        net(torch.zeros(1, 1, 8, 8), 0.0, extra_scalars=torch.zeros(1, 2))
    with pytest.raises(InputError, match="c_noise"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(3))
    with pytest.raises(InputError, match="groups"):
        UNet(2, 1, 1, base_channels=12, groups=8)
    with pytest.raises(InputError, match="dims"):
        UNet(4, 1, 1)


def test_conditioning_changes_output(gen):
    """SR3 conditioning: the cond channels and the extra scalars (e.g. resolutions in Å)."""
    torch.manual_seed(0)
    net = UNet(2, 1, 1, base_channels=8, groups=4, cond_channels=1, n_extra_scalars=2)
    perturb_output_layer(net)
    x = torch.randn(2, 1, 16, 16, generator=gen)
    cond = torch.randn(2, 1, 16, 16, generator=gen)
    c = torch.rand(2, generator=gen)
    res = torch.tensor([[6.0, 3.0], [6.0, 3.0]])
    out = net(x, c, cond=cond, extra_scalars=res)
    assert (net(x, c, cond=cond * 2, extra_scalars=res) - out).abs().max() > 1e-4
    assert (net(x, c, cond=cond, extra_scalars=res + 1.0) - out).abs().max() > 1e-4
    assert (net(x, c + 0.3, cond=cond, extra_scalars=res) - out).abs().max() > 1e-4
    assert torch.equal(net(x, c, cond=cond, class_emb=res), out)  # alias
    with pytest.raises(InputError, match="cond of shape"):
        net(x, c, extra_scalars=res)
    with pytest.raises(InputError, match="extra_scalars"):
        net(x, c, cond=cond)
    with pytest.raises(InputError, match="not both"):
        net(x, c, cond=cond, extra_scalars=res, class_emb=res)


@pytest.mark.parametrize("dims,size", [(2, 12), (3, 8)])
def test_gradient_reaches_every_parameter(gen, dims, size):
    torch.manual_seed(0)
    net = UNet(
        dims,
        1,
        1,
        base_channels=8,
        groups=4,
        attention=True,
        cond_channels=1,
        n_extra_scalars=1,
        channel_mults=(1, 2),
    )
    perturb_output_layer(net)
    x = torch.randn(2, 1, *([size] * dims), generator=gen)
    out = net(
        x, torch.rand(2), cond=torch.randn(x.shape, generator=gen), extra_scalars=torch.rand(2, 1)
    )
    out.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_registry_round_trip(gen):
    torch.manual_seed(0)
    net = UNet(
        3,
        1,
        1,
        base_channels=8,
        groups=4,
        channel_mults=(1, 2),
        attention=True,
        cond_channels=1,
        n_extra_scalars=2,
    )
    perturb_output_layer(net)
    config = json.loads(json.dumps(network_config(net)))
    assert config["name"] == "unet" and config["channel_mults"] == [1, 2]
    torch.manual_seed(1)
    rebuilt = build_network(config)
    sd, sd2 = net.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd2.items()}
    rebuilt.load_state_dict(sd)
    x = torch.randn(1, 1, 8, 8, 8, generator=gen)
    kw = dict(cond=x.flip(-1), extra_scalars=torch.tensor([[4.0, 2.0]]))
    assert torch.equal(rebuilt(x, 0.2, **kw), net(x, 0.2, **kw))


def test_registry_errors():
    with pytest.raises(InputError, match="unknown network"):
        build_network({"name": "transformer"})
    with pytest.raises(InputError, match="unknown option"):
        build_network({"name": "unet", "dims": 2, "in_channels": 1, "out_channels": 1, "depth": 3})
    with pytest.raises(InputError, match="not a registered network"):
        network_config(torch.nn.Linear(2, 2))


def test_pixel_norm_normalises_each_voxel_over_its_channels(gen):
    from cryoprior.networks.unet import PixelNorm

    norm = PixelNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=gen))
        norm.bias.copy_(torch.randn(6, generator=gen))
    x = 3.0 + 2.0 * torch.randn(2, 6, 5, 4, 3, generator=gen, dtype=torch.float64)
    norm = norm.double()
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    want = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1, 1)
    want = want + norm.bias.view(1, -1, 1, 1, 1)
    y = x.clone()
    y[0, :, 0, 0, 0] += 5.0
    with torch.no_grad():
        out, out_y = norm(x), norm(y)
    assert out.shape == x.shape
    assert torch.allclose(out, want, atol=1e-10)
    # no statistics over space: one voxel's output depends on that voxel only
    diff = (out_y - out).abs().sum(dim=1)
    assert float(diff[0, 0, 0, 0]) > 0 and float(diff.sum() - diff[0, 0, 0, 0]) == 0.0
