"""MLP network and shared embeddings: shapes, time dependence, conditioning, registry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.networks import MLP, SinusoidalEmbedding, build_network, network_config


def perturb_output_layer(net: MLP, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.lin_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("shape", [(5, 5), (1, 28, 28), (7,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_zero_init(gen, shape, dtype):
    torch.manual_seed(0)
    net = MLP(math.prod(shape), hidden_features=32, num_blocks=2).to(dtype)
    x = torch.randn(3, *shape, generator=gen).to(dtype)
    out = net(x, torch.rand(3).to(dtype))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.all(out == 0)


def test_time_dependence(gen):
    torch.manual_seed(0)
    net = MLP(25, hidden_features=32)
    perturb_output_layer(net)
    x = torch.randn(4, 5, 5, generator=gen)
    c = torch.rand(4, generator=gen)
    out = net(x, c)
    assert (net(x, c + 0.05) - out).abs().max() > 1e-4
    # per-sample labels: changing sample 0's label changes only sample 0's output
    c2 = c.clone()
    c2[0] += 0.5
    out2 = net(x, c2)
    assert (out2[0] - out[0]).abs().max() > 1e-4
    assert torch.equal(out2[1:], out[1:])
    assert torch.equal(net(x, 0.3), net(x, torch.full((4,), 0.3)))


def test_conditioning_and_validation(gen):
    torch.manual_seed(0)
    net = MLP(25, hidden_features=32, cond_features=25, n_extra_scalars=1)
    perturb_output_layer(net)
    x = torch.randn(2, 5, 5, generator=gen)
    cond = torch.randn(2, 5, 5, generator=gen)
    s = torch.tensor([[1.0], [2.0]])
    out = net(x, 0.1, cond=cond, extra_scalars=s)
    assert (net(x, 0.1, cond=-cond, extra_scalars=s) - out).abs().max() > 1e-4
    assert (net(x, 0.1, cond=cond, extra_scalars=s * 3) - out).abs().max() > 1e-4
    with pytest.raises(InputError, match="cond"):
        net(x, 0.1, extra_scalars=s)
    with pytest.raises(InputError, match="values per sample"):
        net(torch.zeros(2, 6, 6), 0.1, cond=cond, extra_scalars=s)
    with pytest.raises(InputError, match=r"shape \(2, 1\)"):
        net(x, 0.1, cond=cond, extra_scalars=torch.zeros(2, 3))


def test_registry_round_trip(gen):
    torch.manual_seed(0)
    net = MLP(25, hidden_features=16, num_blocks=2, n_extra_scalars=2)
    perturb_output_layer(net)
    config = json.loads(json.dumps(network_config(net)))
    assert config["name"] == "mlp"
    rebuilt = build_network(config)
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [
        (k, v.shape) for k, v in net.state_dict().items()
    ]
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(3, 25, generator=gen)
    s = torch.rand(3, 2, generator=gen)
    assert torch.equal(rebuilt(x, 0.4, extra_scalars=s), net(x, 0.4, extra_scalars=s))


def test_sinusoidal_embedding_values():
    emb = SinusoidalEmbedding(8, max_period=10000.0, scale=2.0)
    c = torch.tensor([0.0, 0.5], dtype=torch.float64)
    out = emb(c)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat(
        [torch.cos(2.0 * c[:, None] * freqs), torch.sin(2.0 * c[:, None] * freqs)], dim=1
    )
    assert out.shape == (2, 8) and out.dtype == torch.float64
    assert torch.allclose(out, expected, atol=1e-14)
    with pytest.raises(InputError, match="even"):
        SinusoidalEmbedding(7)
