"""Half maps from soft pose assignments (RELION's expectation, truncated to K poses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_records
from cryoprior.geometry.rotations import random_rotations
from cryoprior.physics.atoms import atoms_to_map
from cryoprior.physics.simulator import SimulationConfig, simulate_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import reconstruct_source
from cryoprior.solvers.soft_reconstruction import SoftPoses, reconstruct_soft


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soft_sim")
    rec = next(r for r in shipped_records() if r.name == "1fki_A")
    xyz, el, _ = rec.atoms()
    truth = atoms_to_map(xyz - xyz.mean(0), el, 24, 3.0, bfactors=np.full(len(el), 36.0))
    cfg = SimulationConfig(n_particles=60, snr=2.0, max_shift=3.0, seed=2, defocus_min=8000)
    sim = simulate_particles(Volume(truth.float(), 3.0), cfg, folder, show_progress=False)
    return ParticleSource.from_star(sim.paths["star"])


def _true(source: ParticleSource) -> tuple[torch.Tensor, torch.Tensor]:
    rot = source.rotations.to(torch.float64)
    shifts = torch.from_numpy(source.particles.shifts).to(torch.float64)
    return rot, shifts


def test_one_hot_and_split_weights_give_the_hard_reconstruction(source):
    rot, shifts = _true(source)
    n = len(source)
    hard = reconstruct_source(source, ssnr="fsc", seed=3, randomise_from=4)
    junk = random_rotations(n, torch.Generator().manual_seed(1), dtype=torch.float64)
    # slot 0 the true pose with all the weight, slot 1 a wrong pose with none
    one_hot = SoftPoses(
        torch.stack([rot, junk], 1),
        torch.stack([shifts, torch.zeros_like(shifts)], 1),
        torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(n, 2).clone(),
    )
    # the true pose twice, half the weight each: the same sums
    split = SoftPoses(
        torch.stack([rot, rot], 1),
        torch.stack([shifts, shifts], 1),
        torch.full((n, 2), 0.5, dtype=torch.float64),
    )
    for poses in (one_hot, split):
        soft = reconstruct_soft(source, poses, seed=3, randomise_from=4)
        scale = float(hard.full.abs().max())
        for a, b in ((soft.half1, hard.half1), (soft.half2, hard.half2), (soft.full, hard.full)):
            assert float((a - b).abs().max()) < 1e-4 * scale
        assert soft.randomised is not None and soft.randomised_from == hard.randomised_from
        assert [np.array_equal(a, b) for a, b in zip(soft.split, hard.split, strict=True)] == [
            True,
            True,
        ]


def test_spreading_weight_onto_wrong_poses_blurs_instead_of_building_features(source):
    rot, shifts = _true(source)
    n = len(source)
    hard = reconstruct_source(source, ssnr="fsc", seed=0).full
    junk = random_rotations(n, torch.Generator().manual_seed(5), dtype=torch.float64)
    mixed = SoftPoses(
        torch.stack([rot, junk], 1),
        torch.stack([shifts, shifts], 1),
        torch.tensor([[0.6, 0.4]], dtype=torch.float64).expand(n, 2).clone(),
    )
    soft = reconstruct_soft(source, mixed, seed=0).full

    def cc(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert 0.5 < cc(soft, hard) < 0.999  # the true-pose share still dominates


def test_soft_poses_refuse_mismatched_shapes(source):
    n = len(source)
    with pytest.raises(InputError, match="soft poses need"):
        SoftPoses(torch.zeros(n, 2, 3, 3), torch.zeros(n, 3, 2), torch.zeros(n, 2))
    with pytest.raises(InputError, match="soft poses for"):
        poses = SoftPoses(torch.zeros(3, 1, 3, 3), torch.zeros(3, 1, 2), torch.ones(3, 1))
        reconstruct_soft(source, poses)
