"""Prior-guided reconstruction on the data's own grid with the native-resolution prior
(``volume_native``: 1.5 Å/px, fully convolutional): any box, pixel-size handling, the
denoiser-only baseline and the spread calibration; tiny inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryoprior.cli.main import main as cli_main
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_records
from cryoprior.diffusion import per_sample_time
from cryoprior.io.mrc import read_map
from cryoprior.metrics import expected_coverage, fsc, spherical_mask, spread_calibration
from cryoprior.physics.atoms import atoms_to_map
from cryoprior.physics.simulator import SimulationConfig, simulate_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.priors import load_prior
from cryoprior.solvers.map_baselines import denoiser_plug_and_play
from cryoprior.solvers.prior_reconstruction import (
    accumulate_particles,
    calibrate_fourier_likelihood,
    intensity_scale,
    prior_grid_plan,
)

PRIOR = "volume_native"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prior():
    return load_prior(PRIOR)


def _bpti():
    rec = next(r for r in shipped_records() if r.name == "5pti_A")
    xyz, el, _ = rec.atoms()
    return rec, xyz - xyz.mean(0), el


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    """60 particles of BPTI, 32² at 1.5 Å/px (48 Å: a box smaller than the prior was
    ever trained on whole), CTF, envelope B 60 Å², SNR 1."""
    rec, xyz, el = _bpti()
    truth = atoms_to_map(xyz, el, 32, 1.5, bfactors=np.full(len(el), 36.0))
    out = tmp_path_factory.mktemp("native")
    sim = simulate_particles(
        Volume(truth, 1.5),
        SimulationConfig(n_particles=60, snr=1.0, seed=5, envelope_bfactor=60.0),
        out,
        show_progress=False,
    )
    return rec, truth, sim


def test_shipped_native_prior_is_fully_convolutional_and_documented(prior):
    meta = prior.metadata
    assert meta.fully_convolutional and meta.pixel_size == pytest.approx(1.5)
    assert meta.network["norm"] == "pixel" and not meta.network["attention"]
    summary = meta.data["summary"]
    assert summary["kind"] == "map_patches" and summary["patch"] == 32
    split = meta.data["split"]
    assert set(split["train"]).isdisjoint(split["test"])
    assert "1fki_A" in split["test"]  # the demo protein is held out
    assert meta.command.startswith("cryoprior train")


@pytest.mark.parametrize("size", [48, 64])
def test_the_prior_denoises_any_box(prior, size):
    x = torch.randn(1, 1, size, size, size)
    with torch.no_grad():
        out = prior.denoiser(x, per_sample_time(0.5, x))
    assert out.x0.shape == (1, 1, size, size, size)
    assert torch.isfinite(out.x0).all()


def test_prior_grid_plan_is_native_for_the_native_prior(prior):
    plan = prior_grid_plan(prior, 48, 1.5)
    assert plan.identity and plan.target_box == 48
    plan = prior_grid_plan(prior, 100, 1.5)  # cropped to a multiple of 8
    assert plan.target_box == 96 and plan.crop == 96
    coarse = load_prior("volume_32")  # the fixed-box prior keeps its own grid
    assert prior_grid_plan(coarse, 64, 1.5).target_box == 32


def test_cli_native_reconstruct_with_a_bare_prior_flag(particles, tmp_path):
    rec, truth, sim = particles
    out = tmp_path / "rec"
    args = ["reconstruct", sim.paths["star"], "--prior", "--sequence", rec.sequence]
    args += ["--samples", "2", "--steps", "3", "-o", str(out), "--quiet"]
    assert cli_main(args) == 0
    mean, std = read_map(out / "map.mrc"), read_map(out / "std.mrc")
    assert mean.data.shape == (32, 32, 32) and mean.pixel_size == pytest.approx(1.5)
    assert float(std.data.abs().max()) > 0
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["prior_grid"] == {"box": 32, "pixel_size": pytest.approx(1.5)}
    assert record["dps"]["n_samples"] == 2
    assert record["dps"]["antithetic"] is True  # an even number: antithetic pairs
    mask = spherical_mask((32,) * 3, 12.0, soft_edge_px=2.0)
    corr = fsc(mean.data.double(), truth.double(), 1.5, mask=mask).fsc
    assert corr[1:4].mean() > 0.5  # the low shells of the map are the protein's


def test_cli_native_reconstruct_resamples_and_returns_to_the_users_grid(tmp_path):
    rec, xyz, el = _bpti()
    truth = atoms_to_map(xyz, el, 30, 1.6, bfactors=np.full(len(el), 40.0))
    sim = simulate_particles(
        Volume(truth, 1.6),
        SimulationConfig(n_particles=20, snr=1.0, seed=2),
        tmp_path,
        show_progress=False,
    )
    out = tmp_path / "rec"
    args = ["reconstruct", sim.paths["star"], "--prior", PRIOR, "--mass-kda", "6.5"]
    assert cli_main(args + ["--steps", "2", "-o", str(out), "--quiet"]) == 0
    mean = read_map(out / "map.mrc")
    assert mean.data.shape == (30, 30, 30) and mean.pixel_size == pytest.approx(1.6)
    record = json.loads((out / "reconstruct.json").read_text())
    assert "Fourier-padded" in record["grid"]
    assert record["dps"]["antithetic"] is False  # one sample


def test_cli_independent_samples_opt_out_of_pairs(particles, tmp_path):
    rec, _, sim = particles
    out = tmp_path / "rec"
    args = ["reconstruct", sim.paths["star"], "--prior", "--sequence", rec.sequence]
    args += ["--samples", "2", "--steps", "2", "--independent-samples", "-o", str(out)]
    assert cli_main(args + ["--quiet"]) == 0
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["dps"]["antithetic"] is False and record["dps"]["n_samples"] == 2


def test_cli_native_reconstruct_refuses_a_far_pixel_size(tmp_path, capsys):
    rec, xyz, el = _bpti()
    vol = atoms_to_map(xyz, el, 32, 3.0)
    sim = simulate_particles(
        Volume(vol, 3.0), SimulationConfig(n_particles=4, snr=1.0), tmp_path, show_progress=False
    )
    out = tmp_path / "rec"
    rc = cli_main(["reconstruct", sim.paths["star"], "--prior", "--mass-kda", "6", "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "coarser than the prior" in err and "invent" in err
    assert not (out / "map.mrc").exists()


def test_denoiser_only_baseline_follows_the_data(prior, particles):
    rec, truth, sim = particles
    from cryoprior.physics.composition import protein_mass_kda

    source = ParticleSource.from_star(sim.paths["star"])
    plan = prior_grid_plan(prior, source.box, source.pixel_size)
    data = accumulate_particles(source, plan.target_box, plan.target_pixel_size, plan=plan)
    calibrate_fourier_likelihood(data)
    scale = intensity_scale(data, mass_kda=protein_mass_kda(rec.sequence))
    pnp = denoiser_plug_and_play(prior, data, scale.value, n_iter=3, n_inner=5)
    assert pnp.map.shape == (32, 32, 32) and torch.isfinite(pnp.map).all()
    assert pnp.sigmas[0] > pnp.sigmas[-1]
    mask = spherical_mask((32,) * 3, 12.0, soft_edge_px=2.0)
    good = fsc(pnp.map.double(), truth.double(), 1.5, mask=mask).fsc[1:4].mean()
    flipped = torch.flip(truth, [0]).double()  # the same protein, mirrored: wrong map
    bad = fsc(pnp.map.double(), flipped, 1.5, mask=mask).fsc[1:4].mean()
    assert good > 0.5 and good > bad


def test_spread_calibration_of_a_calibrated_gaussian_posterior():
    g = torch.Generator().manual_seed(0)
    d, k = 16, 4
    mu = torch.randn((d,) * 3, generator=g)
    sd = 0.5 + torch.rand((d,) * 3, generator=g)
    samples = mu + sd * torch.randn((k, d, d, d), generator=g)
    truth = mu + sd * torch.randn((d,) * 3, generator=g)
    cal = spread_calibration(truth, samples, torch.ones((d,) * 3), 1.0)
    assert cal["expected"] == pytest.approx(expected_coverage(4)) == pytest.approx(0.828, abs=1e-3)
    assert cal["voxels"] == pytest.approx(cal["expected"], abs=0.02)
    assert len(cal["shells"]["coverage"]) == d // 2
    narrow = mu + 0.2 * sd * torch.randn((k, d, d, d), generator=g)  # over-confident
    assert spread_calibration(truth, narrow, torch.ones((d,) * 3), 1.0)["voxels"] < 0.5


def test_spread_calibration_of_antithetic_pairs():
    """Pairs μ ± sd·z (mean exactly μ): the expected coverage is P(|t_{K/2}| ≤ 2√(K/(K−1)))."""
    g = torch.Generator().manual_seed(1)
    d, k = 16, 4
    mu = torch.randn((d,) * 3, generator=g)
    sd = 0.5 + torch.rand((d,) * 3, generator=g)
    half = sd * torch.randn((k // 2, d, d, d), generator=g)
    samples = mu + torch.cat([half, -half])
    truth = mu + sd * torch.randn((d,) * 3, generator=g)
    cal = spread_calibration(truth, samples, torch.ones((d,) * 3), 1.0, antithetic=True)
    assert cal["expected"] == pytest.approx(expected_coverage(4, antithetic=True))
    assert cal["expected"] == pytest.approx(0.853, abs=1e-3)
    assert cal["voxels"] == pytest.approx(cal["expected"], abs=0.02)
    with pytest.raises(InputError, match="pairs"):
        expected_coverage(3, antithetic=True)
