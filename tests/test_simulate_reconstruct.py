"""The simulator and the baseline reconstruction, end to end, and the CLI on tiny inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoprior.cli.main import main as cli
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.data.corpus import demo_record
from cryoprior.io.mrc import read_map, read_stack, write_map
from cryoprior.io.star import read_particles
from cryoprior.metrics.correlation import masked_correlation
from cryoprior.physics.projection import gaussian_blobs, project
from cryoprior.physics.simulator import SimulationConfig, simulate_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import reconstruct_source


def blob_volume(box: int, px: float = 2.0) -> Volume:
    """An asymmetric arrangement of Gaussian blobs (no rotational symmetry)."""
    centres = (
        torch.tensor(
            [[3.0, 0.0, 0.0], [-2.0, 4.0, 1.0], [0.0, -3.0, -4.0], [2.0, 2.0, 3.0]],
            dtype=torch.float64,
        )
        * box
        / 16
    )
    data = gaussian_blobs(centres, 1.2 * box / 16, box, dtype=torch.float64)
    return Volume(data.float(), px)


@pytest.mark.parametrize("box", [16, 17])
def test_noiseless_simulation_without_ctf_equals_projection(tmp_path, box):
    vol = blob_volume(box)
    cfg = SimulationConfig(n_particles=7, snr=None, ctf=False, seed=3, chunk_size=3)
    res = simulate_particles(vol, cfg, tmp_path, show_progress=False)
    with read_stack(res.paths["stack"]) as stack:
        images = stack.get(np.arange(7))
        assert stack.pixel_size == pytest.approx(2.0)
    expected = project(vol.data, res.rotations.float())
    assert (images - expected).abs().max() < 1e-4 * expected.abs().max()
    # Poses in the STAR file reproduce the rotations used.
    p = read_particles(res.paths["star"])
    assert (p.rotation_matrices() - res.rotations).abs().max() < 1e-6


def test_shifts_follow_relion_convention(tmp_path):
    # A particle with origin (+3 px, 0) has its centre at -3 px: re-centring with the
    # origin (ParticleSource, center=True) gives back the unshifted projection.
    vol = blob_volume(24)
    cfg = SimulationConfig(n_particles=4, snr=None, ctf=False, max_shift=6.0, seed=5)
    res = simulate_particles(vol, cfg, tmp_path, show_progress=False)
    src = ParticleSource.from_star(res.paths["star"])
    batch = next(src.batches(4))
    raw = next(src.batches(4, center=False))
    expected = project(vol.data, res.rotations.float())
    inner = (slice(None), slice(4, -4), slice(4, -4))  # away from the wrapped-around edge
    assert (batch.images - expected)[inner].abs().max() < 0.02 * expected.abs().max()
    assert (raw.images - expected)[inner].abs().max() > 0.1 * expected.abs().max()


def test_snr_of_simulation_matches_request(tmp_path):
    vol = blob_volume(20)
    cfg = SimulationConfig(n_particles=300, snr=0.5, seed=1, snr_pilot=300)
    res = simulate_particles(vol, cfg, tmp_path, show_progress=False)
    assert res.measured_snr == pytest.approx(0.5, rel=1e-3)
    with read_stack(res.paths["stack"]) as stack:
        noisy = stack.get(np.arange(300)).double()
    noise_var = noisy.var().item()  # signal + noise; signal var = 0.5 * sigma^2 on average
    assert noise_var == pytest.approx(res.noise_sigma**2 * 1.5, rel=0.1)


def test_same_seed_same_particles(tmp_path):
    vol = blob_volume(16)
    cfg = SimulationConfig(n_particles=5, snr=1.0, seed=9)
    a = simulate_particles(vol, cfg, tmp_path / "a", show_progress=False)
    b = simulate_particles(vol, cfg, tmp_path / "b", show_progress=False)
    with read_stack(a.paths["stack"]) as sa, read_stack(b.paths["stack"]) as sb:
        assert torch.equal(sa.get(np.arange(5)), sb.get(np.arange(5)))


def test_simulate_reconstruct_recovers_map_at_high_snr(tmp_path):
    vol = blob_volume(24, px=2.0)
    cfg = SimulationConfig(
        n_particles=600, snr=20.0, seed=2, defocus_min=8000, defocus_max=15000, max_shift=4.0
    )
    res = simulate_particles(vol, cfg, tmp_path, show_progress=False)
    rec = reconstruct_source(ParticleSource.from_star(res.paths["star"]), seed=0)
    cc = float(masked_correlation(rec.full, vol.data))
    assert cc > 0.9
    assert rec.fsc_halves.resolution_0143 < 3 * vol.pixel_size * 2


def test_bad_simulation_inputs(tmp_path):
    vol = blob_volume(16)
    for bad in (
        dict(n_particles=0),
        dict(n_particles=3, snr=0.0),
        dict(n_particles=3, snr=-1.0),
        dict(n_particles=3, defocus_min=-5.0),
    ):
        with pytest.raises(InputError):
            simulate_particles(vol, SimulationConfig(**bad), tmp_path / "x", show_progress=False)
    assert not any((tmp_path / "x").glob("*.mrcs"))


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """The shipped demo protein (a real structure)."""
    return demo_record().path


def test_cli_simulate_reconstruct_fsc(tmp_path, small_model, capsys):
    sim = tmp_path / "sim"
    assert (
        cli(
            [
                "simulate",
                str(small_model),
                "-n",
                "120",
                "--box",
                "32",
                "--pixel-size",
                "3.0",
                "--snr",
                "1",
                "-o",
                str(sim),
                "--quiet",
                "--max-shift",
                "3",
            ]
        )
        == 0
    )
    for f in ("particles.mrcs", "particles.star", "ground_truth.mrc", "simulation.json"):
        assert (sim / f).is_file()
    truth = read_map(sim / "ground_truth.mrc")
    assert truth.pixel_size == pytest.approx(3.0) and truth.data.shape == (32, 32, 32)
    info = json.loads((sim / "simulation.json").read_text())
    assert info["measured_snr"] == pytest.approx(1.0, rel=0.2)

    rec = tmp_path / "rec"
    assert cli(["reconstruct", str(sim / "particles.star"), "-o", str(rec), "--quiet"]) == 0
    for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc_halves.png", "fsc_halves.json"):
        assert (rec / f).is_file()
    m = read_map(rec / "map.mrc")
    assert m.pixel_size == pytest.approx(3.0)
    assert float(masked_correlation(m.data, truth.data)) > 0.5

    out = tmp_path / "fsc"
    assert (
        cli(
            [
                "fsc",
                str(rec / "map.mrc"),
                str(sim / "ground_truth.mrc"),
                "-o",
                str(out),
                "--mask-radius",
                "40",
            ]
        )
        == 0
    )
    res = json.loads((out / "fsc.json").read_text())
    assert 2 * 3.0 <= res["resolution_0143_angstrom"] < 40
    assert (out / "fsc.png").stat().st_size > 1000
    assert "resolution" in capsys.readouterr().out


def test_cli_fsc_of_map_with_itself(tmp_path):
    vol = blob_volume(16)
    write_map(tmp_path / "a.mrc", vol)
    assert (
        cli(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "a.mrc"), "-o", str(tmp_path / "o")])
        == 0
    )
    res = json.loads((tmp_path / "o" / "fsc.json").read_text())
    assert np.allclose(res["fsc"], 1.0)
    assert res["resolution_0143_at_nyquist"]


def test_cli_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    assert (
        cli(
            ["demo", "-n", "200", "--box", "32", "--pixel-size", "1.5", "-o", str(out), "--quiet"]
            + ["--prior-particles", "40", "--prior-steps", "4", "--prior-samples", "2"]
        )
        == 0
    )
    for f in ("report.md", "fsc.png", "wiener_map.mrc", "ground_truth.mrc", "demo.json"):
        assert (out / f).is_file()
    summary = json.loads((out / "demo.json").read_text())
    res = summary["wiener"]["fsc0143_vs_truth_angstrom"]
    assert math.isfinite(res) and res < 30
    # the few-particle comparison ran with the native prior on the particles' own grid
    few = summary["few_particles"]
    assert few["n_particles"] == 40 and few["prior_grid"] == "32^3 at 1.5 A/px"
    assert few["prior_native"] and summary["envelope_bfactor"] == 60.0
    prior_map = read_map(out / "prior_40_map.mrc")
    assert prior_map.pixel_size == 1.5 and prior_map.data.shape == (32, 32, 32)
    assert read_map(out / "prior_40_std.mrc").data.abs().sum() > 0  # two samples differ
    for method in ("wiener", "prior"):
        r = few[method]["fsc0143_vs_truth_angstrom"]
        assert math.isfinite(r) and 3.0 <= r < 40, (method, r)
    assert few["prior"]["antithetic"] is True  # two samples: one antithetic pair
    report = (out / "report.md").read_text()
    assert "Few particles: Wiener vs the learned prior" in report
    assert "in antithetic pairs" in report


def test_cli_demo_skips_the_prior_comparison_when_the_grid_cannot_match(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "-n", "60", "--box", "32", "--pixel-size", "3.0", "-o", str(out), "--quiet"]
    assert cli(argv + ["--prior-particles", "20"]) == 0
    assert "prior comparison skipped" in capsys.readouterr().err
    assert "few_particles" not in json.loads((out / "demo.json").read_text())


# ----------------------------------------------------------------------------- bad input


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_cli_missing_file(tmp_path, capsys):
    assert cli(["simulate", str(tmp_path / "nope.pdb"), "-o", str(tmp_path / "o")]) == 2
    assert "nope.pdb" in _err(capsys)
    assert cli(["reconstruct", str(tmp_path / "nope.star"), "-o", str(tmp_path / "r")]) == 2
    assert "nope.star" in _err(capsys)
    assert not (tmp_path / "r" / "map.mrc").exists()


def test_cli_truncated_mrc(tmp_path, capsys):
    write_map(tmp_path / "a.mrc", blob_volume(16))
    data = (tmp_path / "a.mrc").read_bytes()
    (tmp_path / "b.mrc").write_bytes(data[: len(data) // 2])
    assert (
        cli(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "b.mrc" in _err(capsys)
    assert not (tmp_path / "o" / "fsc.json").exists()


def test_cli_mismatched_boxes_and_bad_values(tmp_path, capsys, small_model):
    write_map(tmp_path / "a.mrc", blob_volume(16))
    write_map(tmp_path / "b.mrc", blob_volume(17))
    assert (
        cli(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "same box" in _err(capsys)
    assert cli(["simulate", str(small_model), "--pixel-size", "-1", "-o", str(tmp_path / "s")]) == 2
    assert "pixel size" in _err(capsys)
    assert (
        cli(["simulate", str(small_model), "--snr", "0", "-n", "3", "-o", str(tmp_path / "s")]) == 2
    )
    assert "SNR" in _err(capsys)
    assert not list((tmp_path / "s").glob("particles.*"))
    # A model that does not fit in the box.
    assert (
        cli(
            [
                "simulate",
                str(small_model),
                "--box",
                "16",
                "--pixel-size",
                "1.0",
                "-o",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "larger --box" in _err(capsys)


def test_cli_star_with_missing_stack_index(tmp_path, capsys):
    vol = blob_volume(16)
    res = simulate_particles(
        vol, SimulationConfig(n_particles=3, snr=None), tmp_path / "s", show_progress=False
    )
    star = Path(res.paths["star"])
    text = star.read_text().replace("000003@", "000009@")
    star.write_text(text)
    assert cli(["reconstruct", str(star), "-o", str(tmp_path / "r")]) == 2
    msg = _err(capsys)
    assert "9@" in msg and "out of range" in msg
