"""Gold-standard refinement (``cryoprior refine``): poses found without being given, resume
after a stop, the estimated-pose STAR file, and bad inputs (issue 18)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import starfile
import torch

from cryoprior.cli.main import main as cli_main
from cryoprior.core.containers import Volume
from cryoprior.data.corpus import shipped_records
from cryoprior.io.mrc import read_map, write_map
from cryoprior.io.star import read_particles
from cryoprior.physics.atoms import atoms_to_map
from cryoprior.physics.simulator import SimulationConfig, simulate_particles
from cryoprior.solvers.backprojection import randomisation_shell
from cryoprior.solvers.pose_frames import pose_errors
from cryoprior.solvers.refine import (
    IterationRecord,
    _randomise_limit,
    _stalled,
    angular_step,
    lowpass,
    solvent_mask,
)

BOX, PX = 32, 3.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """240 CTF-modulated FKBP12 particles (32² at 3 Å/px, SNR 5, shifts ≤ 3 Å)."""
    folder = tmp_path_factory.mktemp("refine_sim")
    rec = next(r for r in shipped_records() if r.name == "1fki_A")
    xyz, el, _ = rec.atoms()
    truth = atoms_to_map(xyz - xyz.mean(0), el, BOX, PX, bfactors=np.full(len(el), 36.0))
    cfg = SimulationConfig(n_particles=240, snr=5.0, max_shift=3.0, seed=4, defocus_min=8000)
    sim = simulate_particles(Volume(truth.float(), PX), cfg, folder, show_progress=False)
    write_map(folder / "truth.mrc", Volume(truth.float(), PX))
    return folder, sim.paths["star"]


def _refine(star, model, out, iterations, *extra):
    args = ["refine", str(star), "--initial-model", str(model), "--initial-lowpass", "15"]
    args += ["--global-step", "15", "--iterations", str(iterations), "--quiet", "-o", str(out)]
    return cli_main(args + list(extra))


def _pose_errors(estimated, true) -> dict:
    """Rotation and origin errors of an estimated-pose STAR file against the true one."""
    est, ref = read_particles(estimated), read_particles(true)
    return pose_errors(
        est.rotation_matrices(),
        torch.from_numpy(est.shifts),
        ref.rotation_matrices(),
        torch.from_numpy(ref.shifts),
    )


def test_lowpass_and_angular_step():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(24, 24, 24, generator=gen, dtype=torch.float64)
    low = lowpass(v, 2.0, 8.0)  # cut at shell 24·2/8 = 6: 1 up to 5, 1/2 at 6, 0 from 7
    k = torch.fft.fftfreq(24, dtype=torch.float64) * 24
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = torch.round(r)
    spec, full = torch.fft.fftn(low).abs(), torch.fft.fftn(v).abs()
    assert float(spec[shell >= 7].max()) < 1e-9
    assert torch.allclose(spec[shell <= 5], full[shell <= 5])
    assert torch.allclose(spec[shell == 6], 0.5 * full[shell == 6])
    # θ = res / (4 r): 8 Å at 30 Å radius is 3.82°, clamped to [min, max]
    assert angular_step(8.0, 30.0, 0.5, 10.0) == pytest.approx(3.82, abs=0.01)
    assert angular_step(8.0, 30.0, 0.5, 2.0) == 2.0
    assert angular_step(0.1, 30.0, 0.5, 10.0) == 0.5


def test_solvent_mask_and_the_mask_corrections_start():
    m = solvent_mask(32, 2.0, None)  # 0.4 box = 12.8 px, 3 px soft edge
    assert m.dtype == torch.float64 and float(m[16, 16, 16]) == 1.0
    assert float(m[16, 16, 16 + 12]) == 1.0 and float(m[16, 16, 16 + 16 - 1]) < 0.1
    assert float(m[0, 0, 0]) == 0.0
    assert float(solvent_mask(32, 2.0, 100.0)[16, 16, 16 + 11]) == 1.0  # capped inside the box
    # randomise from the first shell below 0.8 of the unmasked FSC, at most one past the band
    curve = np.array([1.0, 0.99, 0.95, 0.85, 0.6, 0.3, 0.1, 0.0, 0.0])
    assert _randomise_limit(30.0, 16, 2.0) == 3  # one past the band: ⌈32/30⌉ + 1
    assert _randomise_limit(4.0, 16, 2.0) == 6  # at most box/2 - 2
    assert randomisation_shell(curve, 3) == 3
    assert randomisation_shell(curve, 8) == 4  # below 0.8 from shell 4
    assert randomisation_shell(np.ones(9), 6) == 6  # never below


def test_stopping_rule_compares_local_iterations_only():
    """A spuriously fine FSC of a global iteration (seen at iteration 0 of low-SNR runs)
    must not stop a run whose local iterations still improve; flat local ones do stop."""

    def history(kinds_fsc):
        return [
            IterationRecord(i, kind, 7.0, 2.0, f, f, None, None, 1.0)
            for i, (kind, f) in enumerate(kinds_fsc)
        ]

    improving = history(
        [("global", 4.1), ("global", 12.3), ("local", 9.3), ("local", 9.2), ("local", 9.1)]
    )
    assert not _stalled(improving, patience=2)
    flat = history(
        [("global", 12.0), ("global", 10.0), ("local", 9.3), ("local", 9.3), ("local", 9.4)]
    )
    assert _stalled(flat, patience=2)
    # too few local iterations to judge
    assert not _stalled(flat[:4], patience=2)


def test_cli_refine_finds_poses_resumes_and_writes_a_star_that_reconstructs(stack, tmp_path):
    folder, star = stack
    out = tmp_path / "refine"
    assert _refine(star, folder / "truth.mrc", out, 1) == 0
    first = (out / "iter_000" / "half1.mrc").stat().st_mtime_ns
    # a second call with more iterations resumes after iteration 0 instead of redoing it
    assert _refine(star, folder / "truth.mrc", out, 3) == 0
    assert (out / "iter_000" / "half1.mrc").stat().st_mtime_ns == first
    record = json.loads((out / "refine.json").read_text())
    assert record["resumed"] and record["iterations"] == 3
    history = json.loads((out / "fsc.json").read_text())["iterations"]
    assert [h["search"] for h in history] == ["global", "global", "local"]
    for name in ("map", "half1", "half2"):
        m = read_map(out / f"{name}.mrc")
        assert tuple(m.data.shape) == (BOX,) * 3 and m.pixel_size == pytest.approx(PX)
    assert (out / "fsc.png").stat().st_size > 0
    # the estimated poses: readable by starfile, close to the truth the method never saw
    table = starfile.read(out / "run_data.star")
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"} <= set(
        table["particles"].columns
    )
    err = _pose_errors(out / "run_data.star", star)
    # (random poses: ~126° median; the 6 Å Nyquist of this grid limits the accuracy)
    assert err["median_angle_deg"] < 10.0, err
    assert err["median_shift_angstrom"] < 1.5, err
    # ... and go back through `cryoprior reconstruct` as they are
    rec = tmp_path / "rec"
    assert cli_main(["reconstruct", str(out / "run_data.star"), "--quiet", "-o", str(rec)]) == 0
    assert json.loads((rec / "reconstruct.json").read_text())["resolution_0143_halves"] < 12.0


def test_cli_refine_with_soft_assignment_finds_poses(stack, tmp_path):
    folder, star = stack
    out = tmp_path / "soft"
    assert _refine(star, folder / "truth.mrc", out, 2, "--soft-k", "4") == 0
    assert json.loads((out / "refine_state.json").read_text())["config"]["soft_k"] == 4
    err = _pose_errors(out / "run_data.star", star)
    assert err["median_angle_deg"] < 12.0, err


def test_cli_refine_refuses_bad_inputs_without_output(stack, tmp_path, capsys):
    folder, star = stack
    bad = tmp_path / "bad.mrc"
    write_map(bad, Volume(torch.rand(BOX, BOX, BOX + 2), PX))
    out = tmp_path / "out"
    assert _refine(star, bad, out, 1) == 2
    assert "not a cube" in capsys.readouterr().err
    assert not out.exists()
    assert _refine(star, folder / "truth.mrc", out, 1, "--prior") == 2
    assert "--mass-kda" in capsys.readouterr().err
    assert not out.exists()
    # a finished run in the output folder with other settings is not silently mixed in
    assert _refine(star, folder / "truth.mrc", out, 1) == 0
    assert _refine(star, folder / "truth.mrc", out, 2, "--max-shift", "9") == 2
    assert "other settings" in capsys.readouterr().err
    assert os.path.isfile(out / "iter_000" / "particles.star")


def test_cli_ab_initio_start_runs_and_records_its_rounds(stack, tmp_path):
    _, star = stack
    out = tmp_path / "abinitio"
    args = ["refine", str(star), "--initial-model", "none", "--abinitio-subset", "120"]
    args += ["--global-step", "15", "--iterations", "1", "--quiet", "-o", str(out)]
    assert cli_main(args) == 0
    record = json.loads((out / "refine.json").read_text())
    assert len(record["abinitio"]) == 16 and record["abinitio"][-1]["band"] == 15.0
    model = read_map(out / "abinitio.mrc")
    assert tuple(model.data.shape) == (BOX,) * 3 and float(model.data.std()) > 0
    assert read_particles(out / "run_data.star").has_poses


def _refine_worker(
    rank: int, world: int, port: int, star: str, model: str, out: str, soft_k: int
) -> None:
    from test_ddp_reconstruct import _torchrun_env

    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    assert _refine(star, model, out, 2, "--soft-k", str(soft_k)) == 0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("soft_k", [1, 3])
def test_refine_under_two_ranks_equals_one_process(stack, tmp_path, soft_k):
    import torch.multiprocessing as mp
    from test_ddp_reconstruct import _free_port

    folder, star = stack
    model = folder / "truth.mrc"
    args = (2, _free_port(), str(star), str(model), str(tmp_path / "two"), soft_k)
    mp.spawn(_refine_worker, args=args, nprocs=2, join=True)
    assert _refine(star, model, tmp_path / "one", 2, "--soft-k", str(soft_k)) == 0
    one, two = (read_particles(tmp_path / d / "run_data.star") for d in ("one", "two"))
    # each particle is searched by one rank against the same references: the same poses
    assert np.allclose(one.angles, two.angles, atol=1e-4)
    assert np.allclose(one.shifts, two.shifts, atol=1e-6)
    a, b = (read_map(tmp_path / d / "map.mrc").data for d in ("one", "two"))
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_prior_denoised_references_keep_the_half_maps_scale_and_agreement():
    """The references ``refine --prior`` aligns against: each half denoised by the native
    prior must stay at the half's own intensity (integral) and correlate with the truth
    at least as well as the noisy half does. (Unpreconditioned data-consistency solves
    once returned references ~30× too weak, which scrambled every pose.)"""
    from cryoprior.priors import load_prior
    from cryoprior.solvers.refine import _denoise_halves

    rec = next(r for r in shipped_records() if r.name == "1fki_A")
    xyz, el, _ = rec.atoms()
    truth = atoms_to_map(xyz - xyz.mean(0), el, 32, 1.5, bfactors=np.full(len(el), 36.0))
    truth = truth.to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    k = torch.fft.fftfreq(32, dtype=torch.float64) * 32
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    damp = torch.exp(-((r / 8.0) ** 2))  # a Wiener-like filter damps signal and noise

    def half() -> torch.Tensor:
        noisy = truth + 0.5 * float(truth.std()) * torch.randn(truth.shape, generator=gen)
        return torch.fft.ifftn(torch.fft.fftn(noisy.to(torch.float64)) * damp).real

    mask = solvent_mask(32, 1.5, None)
    halves = (half() * mask, half() * mask)
    out = _denoise_halves(halves, 1.5, load_prior("volume_native"), 12.0, 4)

    def cc(a: torch.Tensor) -> float:
        a, b = a - a.mean(), truth - truth.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    for noisy, clean in zip(halves, out, strict=True):
        assert float(clean.sum()) == pytest.approx(float(noisy.sum()), rel=0.1)
        assert float(clean.std()) > 0.5 * float(noisy.std())
        assert cc(clean) >= cc(noisy) - 0.02


def test_global_searches_continue_while_the_poses_still_move():
    """Global searches: always the first ``global_iterations``; then again while the last
    one moved the poses by more than ``global_until``° (at most ``max_global_iterations``)."""
    from cryoprior.solvers.refine import IterationRecord, RefineConfig, _search_kind

    config = RefineConfig(global_iterations=2, max_global_iterations=4, global_until=10.0)

    def rec(i: int, search: str, change: float | None) -> IterationRecord:
        return IterationRecord(
            iteration=i,
            search=search,
            band=10.0,
            step=7.5,
            fsc0143=6.0,
            fsc05=8.0,
            pose_change_deg=change,
            shift_change=None,
            seconds=1.0,
            prior=False,
        )

    assert _search_kind([], config) == "global"
    assert _search_kind([rec(0, "global", None)], config) == "global"
    moving = [rec(0, "global", None), rec(1, "global", 60.0)]
    assert _search_kind(moving, config) == "global"
    settled = [rec(0, "global", None), rec(1, "global", 4.0)]
    assert _search_kind(settled, config) == "local"
    capped = moving + [rec(2, "global", 40.0), rec(3, "global", 30.0)]
    assert _search_kind(capped, config) == "local"
    assert _search_kind(settled + [rec(2, "local", 50.0)], config) == "local"
