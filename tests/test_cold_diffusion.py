"""Cold-diffusion samplers, the EGNN restorer and its loss."""

from __future__ import annotations

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion.pointcloud import remove_mean
from cryoprior.geometry.rotations import random_rotations
from cryoprior.networks import EGNN
from cryoprior.physics.heat_kernel import HeatKernelProcess, gaussian_kernel_matrix
from cryoprior.solvers.cold_diffusion import (
    RestorationModel,
    cold_sample_improved,
    cold_sample_naive,
    one_step_restore,
    restoration_loss,
    time_grid,
)

DT = torch.float64
SAMPLERS = {"naive": cold_sample_naive, "improved": cold_sample_improved}
KINDS = ["gaussian", "semigroup"]


def cloud(gen, b=2, n=12, scale=3.0):
    """A centred random cloud (B, N, 3) Å; the last cloud has 3 padding nodes."""
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, -3:] = False
    x = torch.randn(b, n, 3, generator=gen, dtype=DT) * scale
    return remove_mean(x, mask), mask


def rms(a, b, mask):
    return float(((a - b) ** 2).sum(-1)[mask].mean().sqrt())


class LinearBlur:
    """A degradation linear in its argument: D(x, t) = W_t x, W from a fixed cloud."""

    def __init__(self, ref, mask, max_radius=4.0):
        self.ref, self.mask, self.max_radius = ref, mask, max_radius

    def matrix(self, t):
        w = gaussian_kernel_matrix(self.ref, self.max_radius * t, self.mask)
        m = self.mask.to(DT)
        # COM-keeping version: W ← W − 1 (1ᵀW − 1ᵀ)/n on the real block, still linear
        n = m.sum(1)[:, None, None]
        col = (w * m[..., None]).sum(1, keepdim=True)
        return (w - m[..., None] * (col - m[:, None, :]) / n) * m[..., None]

    def degrade(self, x, t, mask=None, noise_std=0.0, generator=None):
        return self.matrix(t) @ x


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t_start,steps", [(1.0, 1), (1.0, 9), (0.37, 4)])
def test_perfect_restorer_recovers_x0(gen, sampler, kind, t_start, steps):
    x0, mask = cloud(gen)
    process = HeatKernelProcess(max_radius=4.0, kind=kind)
    x_start = process.degrade(x0, t_start, mask)
    assert rms(x_start, x0, mask) > 0.1  # the start really is degraded
    out, traj = SAMPLERS[sampler](
        lambda x, t, m: x0, process, x_start, mask, t_start, steps, return_trajectory=True
    )
    assert (out - x0).abs().max() < 1e-10
    assert len(traj) == steps + 1
    for x in traj:
        assert x[~mask].abs().max() == 0
        assert x[mask].reshape(-1, 3).sum(0).abs().max() < 1e-10 * (1 + x.abs().max())


def test_improved_removes_the_surviving_part_of_a_constant_error(gen):
    # D linear in x̂0: x_{t_k} = W_{t_k} X0 + (W_{t_k} − W_T) δ, final error (I − W_T) δ
    x0, mask = cloud(gen)
    delta = remove_mean(torch.randn(x0.shape, generator=gen, dtype=DT) * 0.5, mask)
    process = LinearBlur(x0, mask)
    w_t = process.matrix(torch.tensor([0.8, 0.8], dtype=DT))
    x_start = w_t @ x0
    restore = lambda x, t, m: x0 + delta  # noqa: E731
    naive = cold_sample_naive(restore, process, x_start, mask, 0.8, 6)
    improved = cold_sample_improved(restore, process, x_start, mask, 0.8, 6)
    torch.testing.assert_close(naive, x0 + delta, rtol=0, atol=1e-10)
    torch.testing.assert_close(improved, x0 + delta - w_t @ delta, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_which_algorithm_wins_under_which_error(gen, kind):
    x0, mask = cloud(gen, n=20, scale=4.0)
    process = HeatKernelProcess(max_radius=4.0, kind=kind)
    x_start = process.degrade(x0, 1.0, mask)

    def errors(restore):
        a = cold_sample_naive(restore, process, x_start, mask, 1.0, 20)
        b = cold_sample_improved(restore, process, x_start, mask, 1.0, 20)
        return rms(a, x0, mask), rms(b, x0, mask)

    # a systematic error constant in t (5 % too large): Algorithm 2 is better
    naive, improved = errors(lambda x, t, m: 1.05 * x0)
    assert improved < 0.6 * naive
    # an error that vanishes as t → 0 (R goes only 80 % of the way): Algorithm 1 is better
    naive, improved = errors(lambda x, t, m: x + 0.8 * (x0 - x))
    assert naive < 0.2 * improved


def test_one_step_restore_and_padding_of_inputs(gen):
    x0, mask = cloud(gen)
    process = HeatKernelProcess(max_radius=3.0)
    x_start = process.degrade(x0, 0.7, mask) + 4.0  # off-centre input
    x_start = x_start * mask[..., None]
    seen = {}

    def restore(x, t, m):
        seen["t"], seen["x"] = t, x
        return 0.5 * x + 1.0  # also off-centre and non-zero on padding

    out = one_step_restore(restore, x_start, 0.7, mask)
    torch.testing.assert_close(seen["t"], torch.full((2,), 0.7, dtype=DT))
    torch.testing.assert_close(seen["x"], remove_mean(x_start, mask))
    torch.testing.assert_close(out, remove_mean(0.5 * seen["x"], mask))
    assert out[~mask].abs().max() == 0
    with pytest.raises(InputError):
        cold_sample_improved(lambda x, t, m: x[:, :-1], process, x_start, mask, 1.0, 2)


def test_time_grid():
    g = time_grid(0.5, 4)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.375, 0.25, 0.125, 0.0], dtype=DT))
    assert g[-1] == 0
    for bad in [(0.0, 3), (1.5, 3), (0.5, 0)]:
        with pytest.raises(InputError):
            time_grid(*bad)


def make_model(seed=0, in_node_features=0):
    torch.manual_seed(seed)
    net = EGNN(
        hidden_features=16,
        num_layers=2,
        in_node_features=in_node_features,
        normalization_factor=4.0,
        checkpoint=False,
    ).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in net.blocks:
            w = block.update.coord_mlp[-1].weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=DT) * 0.5)
    return RestorationModel(net)


@pytest.mark.parametrize("improper", [False, True], ids=["rotation", "reflection"])
def test_restoration_model_is_equivariant(gen, improper):
    model = make_model()
    x, mask = cloud(gen)
    x = x + 3.0 * mask[..., None]
    t = torch.tensor([0.2, 0.9], dtype=DT)
    R = random_rotations(1, gen, dtype=DT)[0]
    if improper:
        R = R @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=DT))
    shift = torch.randn(1, 1, 3, generator=gen, dtype=DT) * 5.0
    m3 = mask[..., None].to(DT)
    out = model(x, t, mask)
    assert (out - x).abs().max() > 1e-2  # a non-trivial displacement
    assert out[~mask].abs().max() == 0
    moved = model((x @ R.T + shift) * m3, t, mask)
    torch.testing.assert_close(moved, (out @ R.T + shift) * m3, rtol=0, atol=1e-10)
    perm = torch.randperm(x.shape[1], generator=gen)
    torch.testing.assert_close(
        model(x[:, perm], t, mask[:, perm]), out[:, perm], rtol=0, atol=1e-10
    )


def test_restoration_loss_ignores_padding(gen):
    model = make_model()
    process = HeatKernelProcess(max_radius=3.0)
    n = 10
    x = remove_mean(torch.randn(1, n, 3, generator=gen, dtype=DT) * 3.0)
    t = torch.tensor([0.6], dtype=DT)
    ref = restoration_loss(model, process, x, None, t=t)
    mask = torch.zeros(1, n + 4, dtype=torch.bool)
    mask[0, [0, 2, 3, 5, 6, 8, 9, 10, 11, 13]] = True
    xp = torch.randn(1, n + 4, 3, generator=gen, dtype=DT) * 40.0
    xp[mask] = x[0] + 7.0  # padded, off-centre: the loss centres X0 itself
    padded = restoration_loss(model, process, xp, mask, t=t)
    torch.testing.assert_close(padded, ref, rtol=1e-10, atol=0)
    # the value: identity restorer gives the mean per-atom ‖D(X0, t) − X0‖²
    identity = restoration_loss(lambda x_t, tt, m: x_t, process, xp, mask, t=t)
    xt = process.degrade(x, t)
    torch.testing.assert_close(identity, ((xt - x) ** 2).sum(-1).mean(), rtol=1e-10, atol=0)
    assert float(identity) > 0.01
    # a random t per cloud from the generator, and gradients reach the network
    loss = restoration_loss(model, process, xp, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().max()) > 0 for g in grads)
