"""Cα clouds from particle images: the no-prior fit, the likelihood, amplitudes, matching,
and the posterior path with a tiny untrained EGNN prior."""

from __future__ import annotations

import math

import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.diffusion import CosineSchedule, Denoiser
from cryoprior.geometry.rotations import axis_angle_to_matrix, random_rotations
from cryoprior.networks import EGNN
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.priors import Prior, PriorMetadata, load_prior, save_prior
from cryoprior.solvers.calpha_fit import (
    CalphaMeasurement,
    ClippedDenoiser,
    ProfiledAmplitudeOperator,
    average_clouds,
    calpha_log_likelihood,
    estimate_amplitude,
    fit_calpha_no_prior,
    fit_calpha_with_prior,
    matched_kabsch_rmsd,
    profile_amplitude,
    simulate_calpha_images,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Small problems: one thread is fastest on a busy machine; restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spread_cloud(n: int, seed: int, min_dist: float = 5.0, radius: float = 9.0) -> torch.Tensor:
    """n points (Å) in a ball, pairwise at least ``min_dist`` apart, zero centre of mass."""
    g = torch.Generator().manual_seed(seed)
    pts: list[torch.Tensor] = []
    while len(pts) < n:
        p = (2 * torch.rand(3, generator=g, dtype=F64) - 1) * radius
        if p.norm() <= radius and all((p - q).norm() >= min_dist for q in pts):
            pts.append(p)
    x = torch.stack(pts)
    return x - x.mean(0)


def ctf_params(k: int) -> CTFParams:
    defocus = torch.linspace(12000.0, 22000.0, k, dtype=F64)
    return CTFParams(defocus, defocus - 100.0, 0.3, 300.0, 2.7, 0.1)


def tiny_prior(max_nodes: int = 12, scale: float = 5.0, seed: int = 0) -> Prior:
    """An untrained EGNN diffusion prior over clouds of up to ``max_nodes`` points."""
    torch.manual_seed(seed)
    net = EGNN(hidden_features=16, num_layers=2, checkpoint=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    den = Denoiser(net, CosineSchedule(), prediction="eps", representation="points")
    meta = PriorMetadata(
        representation="points",
        shape=(max_nodes, 3),
        normalisation={"scale": scale, "offset": 0.0},
        data={"split": {"train": ["a"], "validation": ["b"], "test": ["c"]}},
    )
    return Prior(den, meta)


# --------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("box", [24, 25])
def test_no_prior_fit_recovers_a_noiseless_cloud(box):
    """10 separated atoms, 10 views with CTF: the ML fit finds them (up to labels) and the
    profile amplitude, without being told the amplitude."""
    truth = spread_cloud(10, seed=1)
    rot = random_rotations(10, torch.Generator().manual_seed(2), F64)
    sim = simulate_calpha_images(
        truth, rot, box, 1.5, None, ctf_params=ctf_params(10), amplitude=2.7, dtype=F64
    )
    fit = fit_calpha_no_prior(sim.measurement, 10, n_starts=3, n_iter=250, noise_sigma=1.0, seed=0)
    assert fit.coords.shape == (10, 3) and fit.samples.shape == (3, 10, 3)
    assert matched_kabsch_rmsd(fit.coords, truth) < 0.05  # measured 0.002 Å
    assert matched_kabsch_rmsd(fit.coords, truth, superpose=False) < 0.05  # data fix the frame
    assert fit.amplitude == pytest.approx(2.7, rel=0.005)
    assert fit.seconds > 0 and fit.spread is None
    # the fit's likelihood is the best start's
    best = fit.config["best_start"]
    assert fit.config["relative_misfit"][best] == min(fit.config["relative_misfit"])


@pytest.mark.parametrize("amplitude", ["profile", 1.7])
def test_likelihood_gradient_matches_finite_differences(amplitude):
    g = torch.Generator().manual_seed(0)
    truth = spread_cloud(5, seed=3, radius=6.0)
    rot = random_rotations(3, g, F64)
    shifts = torch.tensor([[0.5, -1.0], [0.0, 0.3], [-0.7, 0.2]], dtype=F64)
    sim = simulate_calpha_images(
        truth, rot, 20, 1.5, 2.0, ctf_params=ctf_params(3), shifts=shifts, generator=g, dtype=F64
    )
    x = (truth + 0.8 * torch.randn(truth.shape, generator=g, dtype=F64)).requires_grad_(True)
    ll = calpha_log_likelihood(sim.measurement, x, sim.noise_sigma, amplitude)
    (grad,) = torch.autograd.grad(ll, x)
    h = 1e-5
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for j in range(3):
                e = torch.zeros_like(x)
                e[i, j] = h
                up = calpha_log_likelihood(sim.measurement, x + e, sim.noise_sigma, amplitude)
                dn = calpha_log_likelihood(sim.measurement, x - e, sim.noise_sigma, amplitude)
                fd[i, j] = (up - dn) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))
    assert float(grad.abs().max()) > 0


def test_profile_amplitude_and_dc_estimate_recover_a_known_amplitude():
    truth = spread_cloud(8, seed=4)
    rot = random_rotations(4, torch.Generator().manual_seed(5), F64)
    ctf = compute_ctf(ctf_params(4), (24, 24), 1.5, F64)  # on the image grid: DC exact
    empty = torch.zeros(4, 24, 24, dtype=F64)
    meas = CalphaMeasurement(empty, rot, 1.5, ctf=ctf)
    y = meas.operator(8, 3.2)(truth)
    meas = CalphaMeasurement(y, rot, 1.5, ctf=ctf)
    unit = meas.operator(8)(torch.stack([truth, truth + 1.0]))
    a = profile_amplitude(y, unit)
    assert a.shape == (2,) and float(a[0]) == pytest.approx(3.2, rel=1e-10)
    assert float(a[1]) < 3.2  # a misplaced cloud explains less of y
    op = ProfiledAmplitudeOperator(meas.operator(8), y)
    torch.testing.assert_close(op(truth), y)
    assert estimate_amplitude(meas, 8) == pytest.approx(3.2, rel=1e-3)
    with pytest.raises(InputError, match="non-positive"):
        estimate_amplitude(CalphaMeasurement(-y, rot, 1.5, ctf=ctf), 8)


# --------------------------------------------------------------------------- matching


def test_matched_rmsd_ignores_labels_and_rigid_motions():
    x = spread_cloud(12, seed=6)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.5, 0.2], dtype=F64))
    y = x[perm] @ R.T + torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    assert matched_kabsch_rmsd(y, x) < 1e-8
    assert matched_kabsch_rmsd(x[perm], x, superpose=False) < 1e-12
    assert matched_kabsch_rmsd(y, x, superpose=False) > 1.0  # the frame differs
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert matched_kabsch_rmsd(noisy, x) == pytest.approx(
        float(((noisy - x) ** 2).sum(-1).mean().sqrt()), abs=0.05
    )


def test_average_clouds_matches_unlabelled_samples():
    x = spread_cloud(10, seed=7)
    g = torch.Generator().manual_seed(2)
    samples = torch.stack([x[torch.randperm(10, generator=g)] for _ in range(3)])
    mean, matched, spread = average_clouds(samples)
    assert matched_kabsch_rmsd(mean, x) < 1e-8
    assert float(spread.max()) < 1e-8
    jitter = samples + 0.3 * torch.randn(samples.shape, generator=g, dtype=F64)
    mean, matched, spread = average_clouds(jitter)
    assert matched.shape == (3, 10, 3) and spread.shape == (10,)
    assert 0.05 < float(spread.mean()) < 0.6
    assert matched_kabsch_rmsd(mean, x) < 0.35


# --------------------------------------------------------------------------- with a prior


def test_clipped_denoiser_keeps_x0_in_the_ball_with_consistent_eps():
    prior = tiny_prior(max_nodes=6)
    clipped = ClippedDenoiser(prior.denoiser, radius=0.5)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1.0, 1, 1, 1, 1, 1]])
    x = 3.0 * torch.randn(2, 6, 3, generator=g) * mask[..., None]
    t = torch.tensor([0.9, 0.5], dtype=F64)
    with torch.no_grad():
        out = clipped(x, t, mask=mask)
    assert float((out.x0 * mask[..., None]).sum(1).abs().max()) < 1e-5
    assert float(out.x0.norm(dim=-1).max()) <= 2 * 0.5 + 1e-5  # clip, then recentre
    assert bool((out.x0[0, 5] == 0).all())
    alpha, sigma = prior.denoiser.schedule.alpha_sigma(t)
    recon = alpha.float()[:, None, None] * out.x0 + sigma.float()[:, None, None] * out.eps
    torch.testing.assert_close(recon, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance", ["dps_x0", "dps"])
def test_prior_path_runs_end_to_end_with_a_tiny_untrained_prior(tmp_path, guidance):
    folder = save_prior(tmp_path / "tiny", tiny_prior().denoiser, tiny_prior().metadata)
    prior = load_prior(folder)
    truth = spread_cloud(9, seed=8, radius=8.0)
    g = torch.Generator().manual_seed(3)
    rot = random_rotations(3, g, F64)
    sim = simulate_calpha_images(truth, rot, 20, 1.5, 1.0, ctf_params=ctf_params(3), generator=g)
    fit = fit_calpha_with_prior(
        sim.measurement, 9, folder, n_samples=3, n_steps=6, guidance=guidance, zeta=0.1, seed=0
    )
    assert fit.coords.shape == (9, 3) and fit.samples.shape == (3, 9, 3)
    assert fit.spread is not None and fit.spread.shape == (9,)
    for t in (fit.coords, fit.samples, fit.spread):
        assert bool(torch.isfinite(t).all())
    # samples live in the prior's zero-COM subspace; their superposed mean keeps it
    assert float(fit.coords.mean(0).abs().max()) < 1e-4
    assert fit.amplitude > 0 and math.isfinite(fit.amplitude)
    assert fit.noise_sigma == pytest.approx(sim.noise_sigma, rel=0.2)  # from the background
    assert fit.config["max_nodes"] == 12 and fit.config["normalisation_scale"] == 5.0
    assert fit.seconds > 0
    again = fit_calpha_with_prior(
        sim.measurement, 9, prior, n_samples=3, n_steps=6, guidance=guidance, zeta=0.1, seed=0
    )
    torch.testing.assert_close(again.coords, fit.coords)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_input_errors():
    truth = spread_cloud(6, seed=9)
    rot = random_rotations(2, torch.Generator().manual_seed(4), F64)
    sim = simulate_calpha_images(truth, rot, 16, 1.5, 1.0, generator=torch.Generator())
    meas = sim.measurement
    prior = tiny_prior(max_nodes=5)
    with pytest.raises(InputError, match="up to 5 points"):
        fit_calpha_with_prior(meas, 6, prior, n_steps=2)
    with pytest.raises(InputError, match="SNR"):
        simulate_calpha_images(truth, rot, 16, 1.5, 0.0)
    with pytest.raises(InputError, match="SNR"):
        simulate_calpha_images(truth, rot, 16, 1.5, -1.0)
    with pytest.raises(InputError, match="rotations"):
        CalphaMeasurement(meas.images, rot[:1], 1.5)
    with pytest.raises(InputError, match=r"\(K, D, D\)"):
        CalphaMeasurement(meas.images[0], rot, 1.5)
    with pytest.raises(InputError, match="ctf"):
        CalphaMeasurement(meas.images, rot, 1.5, ctf=torch.ones(2, 10, 10))
    with pytest.raises(InputError, match="shifts"):
        CalphaMeasurement(meas.images, rot, 1.5, shifts=torch.zeros(3, 2))
    with pytest.raises(InputError, match="sigma"):
        CalphaMeasurement(meas.images, rot, 1.5, sigma=0.0)
    with pytest.raises(InputError, match="residues"):
        fit_calpha_no_prior(meas, 0)
    with pytest.raises(InputError, match="residues"):
        fit_calpha_no_prior(meas, 2.5)
    with pytest.raises(InputError, match="amplitude"):
        fit_calpha_no_prior(meas, 6, amplitude="mean")
    with pytest.raises(InputError, match="amplitude"):
        fit_calpha_no_prior(meas, 6, amplitude=-1.0)
    with pytest.raises(InputError, match="guidance"):
        fit_calpha_with_prior(meas, 4, prior, guidance="pigdm")
    with pytest.raises(InputError, match="coords"):
        simulate_calpha_images(truth[None], rot, 16, 1.5, 1.0)
    with pytest.raises(InputError, match="noise sigma"):
        calpha_log_likelihood(meas, truth.float(), 0.0)
