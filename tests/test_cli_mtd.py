"""End to end: `cryoprior mtd simulate` then `cryoprior mtd estimate` on tiny data."""

from __future__ import annotations

import argparse
import json
import math
import sys

import mrcfile
import numpy as np
import pytest
import torch

from cryoprior.cli import mtd as mtd_cli
from cryoprior.core.errors import InputError
from cryoprior.solvers.score_prior import gaussian_image_mean


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(argv: list) -> int:
    """Call `cryoprior mtd ARGS` as the command line would."""
    argv = [str(a) for a in argv]
    parser = argparse.ArgumentParser()
    mtd_cli.add_args(parser)
    saved = sys.argv
    sys.argv = ["cryoprior", "mtd", *argv]
    try:
        return mtd_cli.main(parser.parse_args(argv))
    finally:
        sys.argv = saved


def test_simulate_then_estimate_gaussian(tmp_path):
    sim = tmp_path / "sim"
    assert run(["simulate", "--target", "gaussian", "--snr", "5", "--seed", "2", "-o", sim]) == 0
    record = json.loads((sim / "simulation.json").read_text())
    assert record["n"] == 55 and record["copies"] == 12 and record["size"] == 5
    assert record["snr"] == 5.0
    assert all(a in (0.0, 90.0, 180.0, 270.0) for a in record["angles_deg"])
    with mrcfile.open(sim / "measurement.mrc") as m:
        assert m.data.shape == (55, 55) and m.data.dtype == np.float32
    with mrcfile.open(sim / "truth.mrc") as t:
        truth = torch.from_numpy(t.data.astype(np.float64))
    assert truth.shape == (5, 5)
    # σ in the record follows SNR = ‖F‖²/(L²σ²)
    sigma = math.sqrt(float((truth**2).sum()) / (25 * 5.0))
    assert record["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert (sim / "measurement.png").stat().st_size > 1000

    est = tmp_path / "est"
    argv = [
        "estimate", sim / "measurement.mrc", "--prior", "gaussian", "--truth", sim / "truth.mrc",
        "--restarts", "5", "--max-iter", "40", "--sigma", record["sigma"], "--quiet", "-o", est,
    ]  # fmt: skip
    assert run(argv) == 0
    out = json.loads((est / "estimate.json").read_text())
    assert out["size"] == 5 and out["prior"]["kind"] == "gaussian"
    assert len(out["history"]) == out["iterations"] and "error" in out["history"][0]
    assert out["error"] < 0.5
    assert out["aligned_error"] <= out["error"] + 1e-12
    with mrcfile.open(est / "estimate.mrc") as e:
        assert e.data.shape == (5, 5)
    assert (est / "estimate.png").stat().st_size > 1000


def test_estimate_without_truth_estimates_sigma(tmp_path):
    sim = tmp_path / "sim"
    assert run(["simulate", "--target", "gaussian", "--snr", "10", "-o", sim, "--quiet"]) == 0
    est = tmp_path / "est"
    argv = ["estimate", sim / "measurement.mrc", "--size", 5, "--max-iter", 5, "--quiet"]
    assert run([*argv, "-o", est]) == 0
    out = json.loads((est / "estimate.json").read_text())
    assert out["sigma_estimated"] and out["sigma"] > 0
    assert "error" not in out and "error" not in out["history"][0]


def test_simulate_from_a_file_with_continuous_angles(tmp_path):
    target = tmp_path / "target.mrc"
    mtd_cli.write_image_mrc(target, gaussian_image_mean(6))
    sim = tmp_path / "sim"
    argv = ["simulate", "--target", target, "--rotations", 0, "--snr", 0, "-o", sim, "--quiet"]
    assert run(argv) == 0
    record = json.loads((sim / "simulation.json").read_text())
    assert record["n"] == 66 and record["rotations"] is None and record["sigma"] == 0.0
    assert record["snr"] is None


def test_user_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="neither"):
        run(["simulate", "--target", tmp_path / "missing.mrc", "-o", tmp_path / "x"])
    sim = tmp_path / "sim"
    run(["simulate", "--target", "gaussian", "-o", sim, "--quiet"])
    with pytest.raises(InputError, match="--size"):
        run(["estimate", sim / "measurement.mrc", "-o", tmp_path / "e", "--quiet"])
    with pytest.raises(InputError, match="mnist-mean needs"):
        argv = ["estimate", sim / "measurement.mrc", "--size", 5, "--init", "mnist-mean"]
        run([*argv, "-o", tmp_path / "e", "--quiet"])
