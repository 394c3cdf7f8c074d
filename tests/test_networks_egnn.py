"""EGNN: E(3) equivariance, permutation equivariance, padding invariance, masks, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import random_rotations
from cryoprior.networks import EGNN, build_network, network_config

DT = torch.float64
B, N, F = 2, 11, 4
MODES = [
    dict(neighbours="full"),
    dict(neighbours="knn", k=4),
    dict(neighbours="radius", k=6, cutoff=2.0),
]


def make_net(seed: int = 0, **kw) -> EGNN:
    """A small float64 EGNN whose coordinate outputs are O(1) (EDM inits them ~1e-3)."""
    torch.manual_seed(seed)
    opts = dict(
        hidden_features=24,
        num_layers=3,
        in_node_features=F,
        attention=True,
        normalization_factor=4.0,
    )
    opts.update(kw)
    net = EGNN(**opts).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in net.blocks:
            w = block.update.coord_mlp[-1].weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=DT) * 0.5)
    return net


def make_inputs(gen: torch.Generator, n: int = N, b: int = B):
    x = torch.randn(b, n, 3, generator=gen, dtype=DT) * 1.5
    h = torch.nn.functional.one_hot(torch.randint(0, F, (b, n), generator=gen), F).to(DT)
    c = torch.rand(b, generator=gen, dtype=DT)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, -3:] = False  # the last cloud has 3 padding nodes
    return x, h, c, mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
@pytest.mark.parametrize("improper", [False, True], ids=["rotation", "reflection"])
def test_orthogonal_equivariance(gen, mode, improper):
    net = make_net(**mode)
    x, h, c, mask = make_inputs(gen)
    R = random_rotations(1, gen, dtype=DT)[0]
    if improper:
        R = R @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=DT))
        assert torch.det(R) < 0
    out = net(x, c, mask=mask, h=h)
    out_rot = net(x @ R.T, c, mask=mask, h=h)
    assert out.abs().max() > 1e-2  # not a trivially zero field
    assert rel_err(out_rot, out @ R.T) < 1e-5


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
def test_translation_invariance(gen, mode):
    net = make_net(**mode)
    x, h, c, mask = make_inputs(gen)
    t = torch.randn(B, 1, 3, generator=gen, dtype=DT) * 10
    assert rel_err(net(x + t, c, mask=mask, h=h), net(x, c, mask=mask, h=h)) < 1e-5


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
def test_permutation_equivariance(gen, mode):
    net = make_net(**mode)
    x, h, c, mask = make_inputs(gen)
    perm = torch.randperm(N, generator=gen)
    out = net(x, c, mask=mask, h=h)
    out_p = net(x[:, perm], c, mask=mask[:, perm], h=h[:, perm])
    assert rel_err(out_p, out[:, perm]) < 1e-10


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_padding_invariance(gen, mode, aggregation):
    """Extra masked nodes anywhere (also on top of real nodes) change nothing."""
    net = make_net(aggregation=aggregation, **mode)
    x, h, c, _ = make_inputs(gen, b=1)
    n_pad = 6
    x_pad_nodes = torch.cat([x[:, :3] + 0.01, torch.randn(1, 3, 3, generator=gen, dtype=DT)], 1)
    xp = torch.cat([x, x_pad_nodes], dim=1)
    hp = torch.cat([h, torch.rand(1, n_pad, F, generator=gen, dtype=DT)], dim=1)
    mp = torch.cat([torch.ones(1, N), torch.zeros(1, n_pad)], dim=1)
    order = torch.randperm(N + n_pad, generator=gen)  # interleave padding and real nodes
    out = net(x, c[:1], h=h)
    out_p = net(xp[:, order], c[:1], mask=mp[:, order], h=hp[:, order])
    inverse = torch.argsort(order)
    out_p = out_p[:, inverse]
    assert rel_err(out_p[:, :N], out) < 1e-10
    assert torch.all(out_p[:, N:] == 0)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
def test_output_mean_zero_and_masked(gen, mode):
    net = make_net(**mode)
    x, h, c, mask = make_inputs(gen)
    out = net(x, c, mask=mask, h=h)
    assert torch.all(out[~mask] == 0)
    m = mask.to(DT)[..., None]
    assert float(((out * m).sum(1) / m.sum(1)).abs().max().detach()) < 1e-12
    net_raw = make_net(remove_mean=False, **mode)
    raw = net_raw(x, c, mask=mask, h=h)
    assert float(((raw * m).sum(1) / m.sum(1)).abs().max().detach()) > 1e-4  # removal did something
    assert torch.all(raw[~mask] == 0)


def test_knn_and_radius_reduce_to_full(gen):
    """k >= N-1 (and a cutoff beyond every distance) reproduces the full graph exactly."""
    x, h, c, mask = make_inputs(gen)
    full = make_net(neighbours="full")(x, c, mask=mask, h=h)
    knn = make_net(neighbours="knn", k=N - 1)(x, c, mask=mask, h=h)
    radius = make_net(neighbours="radius", k=50, cutoff=1e3)(x, c, mask=mask, h=h)
    assert rel_err(knn, full) < 1e-12
    assert rel_err(radius, full) < 1e-12
    small = make_net(neighbours="knn", k=3)(x, c, mask=mask, h=h)
    assert rel_err(small, full) > 1e-3


def test_radius_cutoff_isolates_far_nodes(gen):
    """A node farther than the cutoff from every other node receives no message: 0 move."""
    net = make_net(neighbours="radius", k=8, cutoff=1.0, remove_mean=False)
    x, h, c, _ = make_inputs(gen, b=1)
    x[0, 0] = torch.tensor([50.0, 0.0, 0.0], dtype=DT)
    out = net(x, c[:1], h=h)
    assert torch.all(out[0, 0] == 0)
    assert out[0, 1:].abs().max() > 1e-3


def test_edge_mask(gen):
    net = make_net()
    x, h, c, mask = make_inputs(gen)
    out = net(x, c, mask=mask, h=h)
    ones = torch.ones(B, N, N, dtype=torch.bool)
    assert rel_err(net(x, c, mask=mask, h=h, edge_mask=ones), out) < 1e-14
    none = torch.zeros(B, N, N, dtype=torch.bool)
    assert torch.all(net(x, c, mask=mask, h=h, edge_mask=none) == 0)
    half = ones.clone()
    half[:, :, : N // 2] = False
    assert rel_err(net(x, c, mask=mask, h=h, edge_mask=half), out) > 1e-3


def test_noise_label_and_features_matter(gen):
    net = make_net()
    x, h, c, mask = make_inputs(gen)
    out = net(x, c, mask=mask, h=h)
    assert rel_err(net(x, c + 0.5, mask=mask, h=h), out) > 1e-3
    assert rel_err(net(x, c, mask=mask, h=h.flip(-1)), out) > 1e-3
    assert torch.equal(
        net(x, 0.25, mask=mask, h=h), net(x, torch.full((B,), 0.25, dtype=DT), mask=mask, h=h)
    )


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
def test_chunking_and_checkpoint_do_not_change_results(gen, mode):
    """Output and gradients (w.r.t. weights and input) equal without chunks/checkpoints."""
    x, h, c, mask = make_inputs(gen)
    results = []
    for opts in [dict(checkpoint=False), dict(checkpoint=True, chunk_size=3)]:
        net = make_net(**mode, **opts)
        xr = x.clone().requires_grad_(True)
        out = net(xr, c, mask=mask, h=h)
        out.pow(2).sum().backward()
        results.append((out.detach(), xr.grad, net.embed_in.weight.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12


def test_untrained_moves_are_small(gen):
    """EDM initialises the last coordinate layer with gain 1e-3: tiny initial moves."""
    torch.manual_seed(0)
    net = EGNN(hidden_features=16, num_layers=2).to(DT)
    x, _, c, mask = make_inputs(gen)
    assert 0 < float(net(x, c, mask=mask).abs().max().detach()) < 1e-2


def test_input_validation(gen):
    net = make_net()
    x, h, c, mask = make_inputs(gen)
    with pytest.raises(InputError, match="node features"):
        net(x, c, mask=mask)
    with pytest.raises(InputError, match=r"\(B, N, 3\)"):
        net(x[..., :2], c, h=h)
    with pytest.raises(InputError, match="mask"):
        net(x, c, mask=mask[:, :-1], h=h)
    with pytest.raises(InputError, match="cutoff"):
        EGNN(neighbours="radius")
    with pytest.raises(InputError, match="neighbours"):
        EGNN(neighbours="delaunay")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["neighbours"])
def test_registry_round_trip(gen, mode):
    import json

    net = make_net(**mode)
    config = json.loads(json.dumps(network_config(net)))
    assert config["name"] == "egnn"
    rebuilt = build_network(config).to(DT)
    rebuilt.load_state_dict(net.state_dict())
    x, h, c, mask = make_inputs(gen)
    assert torch.equal(rebuilt(x, c, mask=mask, h=h), net(x, c, mask=mask, h=h))


@pytest.mark.slow
def test_memory_smoke():
    """Forward + backward at N=100, B=8, hidden 64, 4 layers (full graph) stays small.

    Runs in a fresh process and reads the peak resident set size (VmHWM) so that other
    tests' allocations do not count.
    """
    code = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        from cryoprior.networks import EGNN
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
        torch.manual_seed(0)
        net = EGNN(hidden_features=64, num_layers=4)
        x = torch.randn(8, 100, 3) * 3
        base = hwm()
        net(x, torch.rand(8)).pow(2).sum().backward()
        print(hwm() - base)
    """)
    # Large blocks are mmapped, so freed memory leaves the resident set and VmHWM tracks
    # the peak of live tensors rather than the C allocator's cached arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr
    extra_mb = float(res.stdout.strip().splitlines()[-1])
    # One (8, 100, 100, 64) float32 edge tensor is 20 MB. Measured: ~190 MB with
    # checkpointed edge chunks, ~600 MB when every pass keeps its edge activations.
    assert extra_mb < 400, f"forward+backward used {extra_mb:.0f} MB above baseline"
