"""BACON and residual MFN: exact band limits, multiscale outputs, stages, grid rendering."""

from __future__ import annotations

import json

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.fft import fftn_c
from cryoprior.geometry.grids import frequency_grid
from cryoprior.networks.mfn import (
    BACON,
    ResidualMFN,
    lattice_directions,
    marching_fractions,
    render_grid,
)
from cryoprior.networks.registry import build_network, network_config, register_network


def energy_outside(vol: torch.Tensor, band: float) -> float:
    """Fraction of the (non-DC-removed) spectral energy with a component |k| > band."""
    n = vol.shape[0]
    k = frequency_grid(vol.shape, 1.0 / n, torch.float64).abs().amax(dim=-1)  # cycles/box
    power = fftn_c(vol.to(torch.float64), vol.ndim).abs() ** 2
    return float(power[k > band + 1e-9].sum() / power.sum())


def make_bacon(**kw) -> BACON:
    torch.manual_seed(0)
    args = dict(hidden_features=16, num_layers=3, box_size=16)
    return BACON(**(args | kw))


def make_residual(**kw) -> ResidualMFN:
    torch.manual_seed(0)
    # b_0 = 16 / 3.3**2 ≈ 1.47 ≥ 1 cycle/box, so quantised filters are not constant
    args = dict(hidden_features=16, num_layers=2, box_size=32, quantize=True)
    return ResidualMFN(**(args | kw))


def test_lattice_directions():
    d3 = lattice_directions(3)
    assert d3.shape == (13, 3) and lattice_directions(2).shape == (4, 2)
    # one of each ±pair: together with their negatives they are all 26 neighbours
    both = torch.cat([d3, -d3])
    assert len({tuple(v.tolist()) for v in both}) == 26


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bacon_outputs_are_band_limited(dtype):
    # 16-voxel net with max frequency 8: render on 32³ so the top band is below Nyquist
    net = make_bacon(box_size=16).to(dtype)
    assert net.bands == pytest.approx([4.0, 6.0, 8.0])
    with torch.no_grad():
        vols = [render_grid(net, 32, scale=i) for i in (1, 2, 3)]
    for vol, band in zip(vols, net.bands, strict=True):
        assert vol.shape == (32, 32, 32) and vol.dtype == dtype
        assert energy_outside(vol, band) < 1e-6
    # multiscale: each output carries energy above the previous band, the previous not
    assert energy_outside(vols[1], net.bands[0]) > 1e-3
    assert energy_outside(vols[2], net.bands[1]) > 1e-3
    assert energy_outside(vols[2], net.bands[1]) > energy_outside(vols[1], net.bands[1])


def test_bacon_default_nyquist_and_fractions():
    net = BACON(hidden_features=4, num_layers=1, box_size=33)
    assert net.bands == [16.0]  # Nyquist of 33 voxels: 16.5 cycles/box, ⌊16.5/2⌋ = 8 per filter
    for f in net.filters:
        assert f.frequency.abs().max() <= 8 and torch.equal(f.frequency, f.frequency.round())
    net = BACON(hidden_features=8, num_layers=2, box_size=20, band_fractions=[0.5, 0.0, 0.5])
    assert net.bands == [5.0, 10.0]
    assert torch.all(net.filters[1].frequency == 0)
    with pytest.raises(InputError, match="band_fractions"):
        BACON(num_layers=2, band_fractions=[0.6, 0.6, 0.1])
    with pytest.raises(InputError, match="Nyquist"):
        BACON(box_size=16, max_frequency=9.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_outputs_are_band_limited(dtype):
    net = make_residual().to(dtype)
    assert net.bands == pytest.approx([16 / 3.3, 16.0])
    with torch.no_grad():
        vols = [render_grid(net, 40, scale=i) for i in (1, 2)]
    for vol, band in zip(vols, net.bands, strict=True):
        assert energy_outside(vol, band) < 1e-6
    assert (
        energy_outside(vols[0], net.bands[0]) < 1e-6 < 1e-3 < energy_outside(vols[1], net.bands[0])
    )


def test_residual_frequency_marching_init():
    torch.manual_seed(1)
    net = ResidualMFN(hidden_features=64, num_layers=3, box_size=64)
    b = [32 / 3.3**3, 32 / 3.3**2, 32 / 3.3, 32.0]
    assert net.bands == pytest.approx(b[1:])
    assert net.filters[0].bandwidth <= b[0]
    for i in range(1, 4):
        f = net.filters[i].frequency.double()
        # cube of half-width 0.3 b_{i-1} around 2 b_{i-1} r, r a lattice direction
        r = torch.round(f / (2 * b[i - 1]))
        dirs = {
            tuple(v.tolist()) for v in torch.cat([lattice_directions(3), -lattice_directions(3)])
        }
        assert all(tuple(v.tolist()) in dirs for v in r)
        assert (f - 2 * b[i - 1] * r).abs().max() <= 0.3 * b[i - 1] + 1e-9
        # cumulative band: b_{i-1} + 2.3 b_{i-1} = b_i
        cumulative = sum(net.filters[k].bandwidth for k in range(i + 1))
        assert cumulative <= b[i] + 1e-9
    assert not any(f.frequency.requires_grad for f in net.filters)
    assert "frequency" not in dict(net.named_parameters())


def test_residual_outputs_are_cumulative_sums(gen):
    net = make_residual(quantize=False).double()
    x = torch.rand(50, 3, generator=gen, dtype=torch.float64) - 0.5
    outs = net(x)
    feats = net.features(x)
    assert len(outs) == 2 and outs[0].shape == (50, 1)
    torch.testing.assert_close(outs[0], net.heads[0](feats[0]))
    torch.testing.assert_close(outs[1], net.heads[0](feats[0]) + net.heads[1](feats[1]))
    assert (outs[1] - outs[0]).abs().max() > 1e-3
    # BACON outputs are independent heads, not sums
    bacon = make_bacon().double()
    b_outs, b_feats = bacon(x), bacon.features(x)
    torch.testing.assert_close(b_outs[2], bacon.heads[2](b_feats[2]))


@pytest.mark.parametrize("cls", [make_bacon, make_residual])
def test_set_stage_freezes_later_layers(cls, gen):
    net = cls()
    n = net.num_layers
    net.set_stage(1)
    x = torch.rand(20, 3, generator=gen) - 0.5
    outs = net(x)
    assert len(outs) == 1 and net.stage == 1
    outs[-1].sum().backward()
    for name, p in net.named_parameters():
        index = int(name.split(".")[1])
        active = index <= 1 if name.startswith("filters") else index < 1
        assert p.requires_grad == active, name
        assert (p.grad is not None) == active, name
    with pytest.raises(InputError, match="scale"):
        render_grid(net, 8, scale=2)
    net.set_stage(n)
    assert len(net(x)) == n and all(p.requires_grad for p in net.parameters())
    for bad in (0, n + 1, 1.0):
        with pytest.raises(InputError, match="stage"):
            net.set_stage(bad)


@pytest.mark.parametrize("box", [16, 17])
def test_render_grid_orientation_and_origin(box):
    net = make_bacon(box_size=16).double()
    with torch.no_grad():
        for f in net.filters:
            f.frequency[:, 1:] = 0  # depends on x only
        vol = render_grid(net, box, chunk_size=100)
        assert vol.shape == (box, box, box)
        assert torch.allclose(vol, vol[:1, :1, :].expand_as(vol), atol=1e-12)  # const in z, y
        assert vol[0, 0].std() > 1e-3  # varies along the last axis (x)
        origin = net(torch.zeros(1, 3, dtype=torch.float64))[-1]
        assert torch.allclose(vol[box // 2, box // 2, box // 2], origin[0, 0])
        # index j along x sits at x = (j - box//2)/box
        x = (torch.arange(box, dtype=torch.float64) - box // 2) / box
        line = net(torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], -1))[-1]
        torch.testing.assert_close(vol[0, 0], line[:, 0])


def test_render_grid_2d_and_multichannel():
    torch.manual_seed(0)
    net = BACON(in_features=2, out_features=3, hidden_features=8, num_layers=2, box_size=12)
    with torch.no_grad():
        img = render_grid(net, 12)
    assert img.shape == (12, 12, 3)
    with pytest.raises(InputError, match="coordinates"):
        net(torch.zeros(5, 3))


@pytest.mark.parametrize(("name", "cls"), [("bacon", BACON), ("residual_mfn", ResidualMFN)])
def test_config_round_trip(name, cls, gen):
    register_network(name, cls)
    torch.manual_seed(0)
    net = cls(hidden_features=8, num_layers=2, box_size=20, max_frequency=7.0)
    config = network_config(net)
    assert config["name"] == name and json.loads(json.dumps(config)) == config
    rebuilt = build_network(json.loads(json.dumps(config)))
    assert type(rebuilt) is cls and rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())  # frequencies travel in the state dict
    x = torch.rand(10, 3, generator=gen) - 0.5
    for a, b in zip(net(x), rebuilt(x), strict=True):
        torch.testing.assert_close(a, b)


def test_marching_fractions_match_residual_bands():
    torch.manual_seed(0)
    for layers in (1, 2, 3):
        residual = ResidualMFN(hidden_features=4, num_layers=layers, box_size=64)
        bacon = BACON(
            hidden_features=4,
            num_layers=layers,
            box_size=64,
            band_fractions=marching_fractions(layers),
            quantize=False,
        )
        assert bacon.bands == pytest.approx(residual.bands)
    assert sum(marching_fractions(3, 0.3, 0.7)) == pytest.approx(1.0)
    assert marching_fractions(2, 0.3, 0.7)[0] == pytest.approx(0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_bacon_init_is_band_limited_and_residual(dtype, gen):
    torch.manual_seed(0)
    net = ResidualMFN(
        hidden_features=16, num_layers=2, box_size=32, init="bacon", quantize=True
    ).to(dtype)
    # default fractions: the marching bands, floored to integers by the quantisation
    fractions = marching_fractions(2)
    assert net.bands == [
        sum(float(int(f * 16 + 1e-9)) for f in fractions[: i + 2]) for i in range(2)
    ]
    for f, frac in zip(net.filters, fractions, strict=True):
        assert f.frequency.abs().max() <= int(frac * 16 + 1e-9)
    with torch.no_grad():
        vols = [render_grid(net, 40, scale=i) for i in (1, 2)]
    for vol, band in zip(vols, net.bands, strict=True):
        assert energy_outside(vol, band) < 1e-6
    x = torch.rand(20, 3, generator=gen, dtype=dtype) - 0.5
    outs, feats = net(x), net.features(x)
    torch.testing.assert_close(outs[1], net.heads[0](feats[0]) + net.heads[1](feats[1]))
    with pytest.raises(InputError, match="init"):
        ResidualMFN(init="random")
    with pytest.raises(InputError, match="band_fractions"):
        ResidualMFN(band_fractions=[0.5, 0.5, 0.0, 0.0])


def test_marching_init_misses_lowest_band_and_base_output_fills_it(gen):
    # every frequency f_1 ± f_0 of output 1 has a component >= (offset - spread - 1) b_0
    torch.manual_seed(2)
    net = ResidualMFN(hidden_features=32, num_layers=2, box_size=64)
    b0 = 32 / 3.3**2
    f0, f1 = net.filters[0].frequency.double(), net.filters[1].frequency.double()
    for sign in (1.0, -1.0):
        sums = f1[:, None, :] + sign * f0[None, :, :]  # all (j, i) pairs
        assert float(sums.abs().amax(-1).min()) >= 0.7 * b0 - 1e-9
    # the base head adds a function of the first filter (band b_0) to every output
    torch.manual_seed(2)
    based = ResidualMFN(hidden_features=32, num_layers=2, box_size=64, base_output=True)
    assert based.config["base_output"] and based.base_head is not None
    x = torch.rand(30, 3, generator=gen) - 0.5
    outs, feats = based(x), based.features(x)
    base = based.base_head(based.filters[0](x))
    torch.testing.assert_close(outs[0], base + based.heads[0](feats[0]))
    torch.testing.assert_close(outs[1], outs[0] + based.heads[1](feats[1]))
    rebuilt = build_network(json.loads(json.dumps(network_config(based))))
    rebuilt.load_state_dict(based.state_dict())
    torch.testing.assert_close(rebuilt(x)[1], outs[1])


def test_render_grid_rigid_motion(gen):
    net = make_bacon(box_size=16).double()
    a = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    a = a * torch.sign(torch.linalg.det(a))  # a proper rotation
    t = torch.tensor([0.05, -0.1, 0.02], dtype=torch.float64)
    with torch.no_grad():
        moved = render_grid(net, 9, rotation=a, shift=t)
        # voxel [z, y, x] = [1, 5, 7] sits at (x, y, z) = ((7, 5, 1) - 4) / 9
        r = (torch.tensor([7.0, 5.0, 1.0], dtype=torch.float64) - 4) / 9
        want = net((a.T @ (r - t))[None])[-1][0, 0]
        assert torch.allclose(moved[1, 5, 7], want)
        plain = render_grid(net, 9)
        same = render_grid(net, 9, rotation=torch.eye(3, dtype=torch.float64), shift=t * 0)
        torch.testing.assert_close(same, plain)
    with pytest.raises(InputError, match="rotation"):
        render_grid(net, 9, rotation=torch.eye(2))
