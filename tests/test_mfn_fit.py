"""MFN fitting: forward model vs the simulator, pose refinement, frames, staged fit, resume, CLI."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from cryoprior.cli.main import main as cli
from cryoprior.cli.reconstruct_mfn import add_mfn_args, config_from_args, run_mfn
from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import axis_angle_to_matrix, random_rotations, rotation_angle
from cryoprior.io.mrc import read_map
from cryoprior.io.star import read_particles
from cryoprior.networks.mfn import ResidualMFN, render_grid
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.projection import (
    Projector,
    gaussian_blobs,
    padded_size,
)
from cryoprior.physics.simulator import (
    ParticleRenderer,
    SimulationConfig,
    draw_particle_parameters,
    simulate_particles,
)
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.mfn_config import MFNFitConfig, Stage, format_stages, parse_stages
from cryoprior.solvers.mfn_fit import fit_mfn
from cryoprior.solvers.mfn_poses import BandSearchModel, refine_poses, search_grid
from cryoprior.solvers.mfn_render import data_spectra, fourier_crop, model_spectra, working_grid
from cryoprior.solvers.pose_frames import align_poses, global_alignment, perturb_poses, pose_errors
from cryoprior.solvers.pose_grids import rotation_log, search_offsets
from cryoprior.solvers.pose_lattice import PosePrior

# three blobs, no symmetry: poses are identifiable (x, y, z in voxels of a 24-voxel box)
CENTRES = torch.tensor([[3.0, -2.0, 1.0], [-4.0, 2.0, 0.0], [0.0, 3.0, -3.5], [1.5, 0.5, 3.0]])
AMPLITUDES = torch.tensor([1.0, 0.8, 1.2, 0.6])


def blob_map(box: int, sigma: float = 1.6) -> torch.Tensor:
    scale = box / 24
    return gaussian_blobs(CENTRES * scale, sigma * scale, box, AMPLITUDES).float()


def particle_params(n: int, box: int, px: float, shift: float = 4.0, seed: int = 1):
    cfg = SimulationConfig(n_particles=n, max_shift=shift, seed=seed)
    rotations, shifts, ctf = draw_particle_parameters(cfg, box, px)
    return rotations, shifts, CTFParams.from_particles(ctf)


@pytest.mark.parametrize("box", [16, 17])
def test_forward_model_matches_simulator_full_grid(box):
    # the network's map, rendered and passed through the simulator, is what the fit models
    torch.manual_seed(0)
    net = ResidualMFN(hidden_features=16, num_layers=2, box_size=box)
    px = 3.0
    with torch.no_grad():
        vol = render_grid(net, box)
    rotations, shifts, ctf = particle_params(6, box, px)
    images = ParticleRenderer(Volume(vol, px), pad=2.0).render(rotations.float(), shifts, ctf)
    grid = working_grid(box, px, box / 2, box / 2)
    assert grid.box == box and grid.spectral_scale == 1.0
    dp = padded_size(box, 2.0)
    ctf_padded = compute_ctf(ctf, (dp, dp), grid.pixel_size)
    with torch.no_grad():
        model = model_spectra(
            Projector(vol, 2.0, "cubic"),
            rotations.float(),
            torch.as_tensor(shifts).float(),
            ctf_padded,
            grid,
        )
    data = data_spectra(images, grid)
    assert float((model - data).norm() / data.norm()) < 1e-5
    # a wrong shift sign or CTF would not match
    with torch.no_grad():
        wrong = model_spectra(
            Projector(vol, 2.0, "cubic"),
            rotations.float(),
            -torch.as_tensor(shifts).float(),
            ctf_padded,
            grid,
        )
    assert float((wrong - data).norm() / data.norm()) > 0.05


@pytest.mark.parametrize("band", [4.5, 7.0])
def test_forward_model_on_coarse_working_grid(band):
    # a compact map rendered on the coarse working grid gives the low-passed images
    box, px = 32, 3.0
    full = blob_map(box, sigma=2.4)
    rotations, shifts, ctf = particle_params(6, box, px)
    images = ParticleRenderer(Volume(full, px), pad=2.0).render(rotations.float(), shifts, ctf)
    grid = working_grid(box, px, band, band)
    assert grid.box < box and grid.box / 2 > band
    assert grid.pixel_size == pytest.approx(px * box / grid.box)
    coarse = blob_map(grid.box, sigma=2.4)  # the same function sampled coarser
    dp = padded_size(grid.box, 2.0)
    with torch.no_grad():
        model = model_spectra(
            Projector(coarse, 2.0, "cubic"),
            rotations.float(),
            torch.as_tensor(shifts).float(),
            compute_ctf(ctf, (dp, dp), grid.pixel_size),
            grid,
        )
    data = data_spectra(images, grid)
    assert float((model - data).norm() / data.norm()) < 0.01


def test_refine_poses_recovers_small_perturbation():
    # noiseless toy problem, the true map fixed: Adam steps undo a 4° / 1 Å perturbation
    box, px = 24, 2.0
    vol = blob_map(box)
    rotations, shifts, ctf = particle_params(24, box, px, shift=2.0)
    images = ParticleRenderer(Volume(vol, px), pad=2.0).render(rotations.float(), shifts, ctf)
    start_r, start_s = perturb_poses(rotations, shifts, 4.0, 1.0, seed=3)
    config = MFNFitConfig(
        pose_search="adam", pose_steps=25, pose_lr_deg=0.15, pose_lr_angstrom=0.05, kernel="cubic"
    )
    r, s = refine_poses(vol, px, images, start_r, start_s, ctf, band=1.0, visits=3, config=config)
    truth_s = torch.as_tensor(shifts)
    before = pose_errors(start_r, start_s, rotations, truth_s, align=False)
    after = pose_errors(r, s, rotations, truth_s, align=False)
    assert before["mean_angle_deg"] == pytest.approx(4.0, abs=1e-6)
    assert before["mean_shift_angstrom"] == pytest.approx(1.0, abs=1e-6)
    assert after["mean_angle_deg"] < 0.5 and after["mean_shift_angstrom"] < 0.15


def test_perturb_poses_exact_sizes(gen):
    rotations = random_rotations(50, gen, dtype=torch.float64)
    shifts = torch.zeros(50, 2, dtype=torch.float64)
    r, s = perturb_poses(rotations, shifts, 20.0, 3.0, seed=4)
    torch.testing.assert_close(
        torch.rad2deg(rotation_angle(r, rotations)), torch.full((50,), 20.0, dtype=torch.float64)
    )
    torch.testing.assert_close(s.norm(dim=-1), torch.full((50,), 3.0, dtype=torch.float64))
    r2, _ = perturb_poses(rotations, shifts, 20.0, 3.0, seed=4)
    assert torch.equal(r, r2)
    # the axes are spread out: the mean rotation change is small
    assert float((r - rotations).mean(0).abs().max()) < 0.1


def test_global_alignment_and_frame_conventions(gen):
    # a map in a moved frame V_est(q) = V(A q + c) explains the images with poses
    # (R A, s - (R c)_xy); global_alignment recovers (A, c) and the particles agree
    n = 40
    rotations = random_rotations(n, gen, dtype=torch.float64)
    shifts = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    a = axis_angle_to_matrix(torch.tensor([0.1, -0.2, 0.15], dtype=torch.float64))
    c = torch.tensor([1.0, -0.5, 0.7], dtype=torch.float64)  # Å (pixel size 1)
    est_r = rotations @ a
    est_s = shifts - (rotations @ c)[:, :2]
    found_a, found_c = global_alignment(est_r, est_s, rotations, shifts)
    torch.testing.assert_close(found_a, a)
    torch.testing.assert_close(found_c, c)
    aligned_r, aligned_s = align_poses(est_r, est_s, found_a, found_c)
    torch.testing.assert_close(aligned_r, rotations)
    torch.testing.assert_close(aligned_s, shifts)
    errors = pose_errors(est_r, est_s, rotations, shifts)
    assert errors["mean_angle_deg"] < 1e-6 and errors["mean_shift_angstrom"] < 1e-6
    assert errors["frame_rotation_deg"] == pytest.approx(math.degrees(math.sqrt(0.0725)))
    raw = pose_errors(est_r, est_s, rotations, shifts, align=False)
    assert raw["mean_angle_deg"] == pytest.approx(errors["frame_rotation_deg"])
    # moved blobs Aᵀ(mu - c) seen at the estimated poses land where the true blobs land at
    # the true poses (projected centre (R mu)_xy, particle centre at -s)
    moved = (CENTRES.double() - c) @ a  # rows: Aᵀ(mu - c)
    ours = torch.einsum("nij,kj->nki", est_r, moved)[..., :2] - est_s[:, None, :]
    true = torch.einsum("nij,kj->nki", rotations, CENTRES.double())[..., :2] - shifts[:, None, :]
    torch.testing.assert_close(ours, true)


def test_global_alignment_ignores_particles_locked_in_a_symmetric_copy(gen):
    # 60 % of the particles in frame A, 40 % in A followed by a 180° flip (a pseudo-
    # symmetric copy): the plain mean of the frames falls between the two and would call
    # every pose ~50-130° wrong; the robust frame is A, and 60 % are within 10° of it
    n = 200
    rotations = random_rotations(n, gen, dtype=torch.float64)
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    a = axis_angle_to_matrix(torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64))
    flip = axis_angle_to_matrix(torch.tensor([0.0, math.pi, 0.0], dtype=torch.float64))
    est_r = rotations @ a
    est_r[120:] = est_r[120:] @ flip
    found_a, _ = global_alignment(est_r, shifts, rotations, shifts)
    torch.testing.assert_close(found_a, a)
    errors = pose_errors(est_r, shifts, rotations, shifts)
    assert errors["within_10_deg"] == pytest.approx(0.6)
    assert errors["median_angle_deg"] < 1e-4


def test_parse_and_format_stages():
    stages = parse_stages("auto:2:1, 12A:1:2:shifts ,0.5:1.5:2:fixed", pixel_size=3.0)
    assert stages == (
        Stage(None, 2.0, 1, "all"),
        Stage(0.5, 1.0, 2, "shifts"),
        Stage(0.5, 1.5, 2, "fixed"),
    )
    assert parse_stages(format_stages(stages)) == stages
    for bad in ("0.5:2", "x:1:1", "0.5:1:1:maybe", "", "3A:1:1"):
        with pytest.raises(InputError):
            parse_stages(bad, pixel_size=3.0)
    with pytest.raises(InputError, match="outputs"):
        MFNFitConfig(num_layers=2, stages=(Stage(0.5, 1.0, 3),)).validate()
    with pytest.raises(InputError, match="marching"):
        MFNFitConfig(network="bacon", init="marching").validate()
    config = MFNFitConfig(stages=stages)
    assert MFNFitConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ----------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """64 noiseless particles (CTF, shifts) of a blob map, 16 px at 4 Å/px."""
    folder = tmp_path_factory.mktemp("mfn_data")
    truth = Volume(blob_map(16, sigma=1.6), 4.0)
    cfg = SimulationConfig(n_particles=64, snr=None, max_shift=4.0, seed=2, chunk_size=64)
    simulate_particles(truth, cfg, folder, show_progress=False)
    return folder / "particles.star", truth


def tiny_config(**kw) -> MFNFitConfig:
    base = dict(
        hidden_features=32,
        num_layers=2,
        stages=(Stage(None, 1.0, 1), Stage(1.0, 1.0, 2)),
        batch_size=16,
        lr=2e-2,
        pose_steps=2,
        warm_start_steps=10,
        checkpoint_every=2,
    )
    return MFNFitConfig(**(base | kw))


def test_fit_mfn_runs_stages_and_writes_maps(tiny_set, tmp_path):
    star, truth = tiny_set
    source = ParticleSource.from_star(star)
    # poses fixed (they are the true ones): the map alone is fitted, 60 batches at full band
    stages = (Stage(None, 4.0, 1, "fixed"), Stage(1.0, 15.0, 2, "fixed"))
    result = fit_mfn(source, tiny_config(stages=stages), out_dir=tmp_path, show_progress=False)
    assert result.finished and not result.resumed
    assert result.map.shape == (16, 16, 16) and result.rotations.shape == (64, 3, 3)
    assert result.shifts.shape == (64, 2)
    assert [s.outputs for s in result.stages] == [1, 2]
    assert [h["working_box"] for h in result.history][1] == 16
    assert result.history[0]["working_box"] < 16  # the coarse stage ran on a smaller grid
    for k in (1, 2):
        stage_map = read_map(tmp_path / f"stage{k}.mrc")
        assert stage_map.pixel_size == pytest.approx(4.0)
        torch.testing.assert_close(stage_map.data, result.stages[k - 1].map.float())

    # the fitted map resembles the truth (noiseless data, true poses); stage 2 improves on 1
    def corr(m: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([m.flatten(), truth.data.flatten()]))[0, 1])

    assert corr(result.map) > 0.8 and corr(result.map) > corr(result.stages[0].map) + 0.05
    torch.testing.assert_close(result.rotations, source.rotations)
    assert result.stages[1].losses[-1] < result.stages[1].losses[0]


@pytest.mark.parametrize("search", ["local", "adam"])
def test_fit_mfn_resume_is_exact(tiny_set, tmp_path, search):
    star, _ = tiny_set
    source = ParticleSource.from_star(star)
    config = tiny_config(pose_search=search, search_radius_deg=16.0, search_step_deg=8.0)
    start = perturb_poses(source.rotations, source.particles.shifts, 10.0, 2.0, seed=1)
    kw = {"show_progress": False, "initial_rotations": start[0], "initial_shifts": start[1]}
    full = fit_mfn(source, config, out_dir=tmp_path / "a", **kw)
    part = fit_mfn(source, config, out_dir=tmp_path / "b", max_steps=5, **kw)
    assert not part.finished and len(part.stages) == 1
    with pytest.raises(InputError, match="resume"):
        fit_mfn(source, config, out_dir=tmp_path / "b", **kw)
    with pytest.raises(InputError, match="lr"):
        fit_mfn(source, replace(config, lr=5e-2), out_dir=tmp_path / "b", resume=True, **kw)
    with pytest.raises(InputError, match="search_radius_deg"):
        bigger = replace(config, search_radius_deg=24.0)
        fit_mfn(source, bigger, out_dir=tmp_path / "b", resume=True, **kw)
    rest = fit_mfn(source, config, out_dir=tmp_path / "b", resume=True, **kw)
    assert rest.finished and rest.resumed and len(rest.stages) == 2
    assert float(rotation_angle(full.rotations, start[0]).max()) > 0.01  # the poses moved
    torch.testing.assert_close(rest.map, full.map, rtol=0, atol=1e-6)
    torch.testing.assert_close(rest.rotations, full.rotations, rtol=0, atol=1e-9)
    torch.testing.assert_close(rest.shifts, full.shifts, rtol=0, atol=1e-9)


def test_cli_run_mfn_writes_outputs(tiny_set, tmp_path):
    star, _ = tiny_set
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad", type=float, default=2.0)
    parser.add_argument("--quiet", action="store_true")
    add_mfn_args(parser)
    args = parser.parse_args(
        [
            "--quiet",
            "--mfn-hidden=16",
            "--mfn-stages=auto:0.5:1,1:0.5:2:shifts",
            "--mfn-batch-size=16",
            "--mfn-warm-start=5",
            "--perturb-deg=5",
            "--perturb-shift=1",
            "--mfn-search-radius-deg=12",
            "--mfn-search-step-deg=4",
            "--mfn-search-refine-steps=1.5",
            "--mfn-search-levels=1",
            "--mfn-max-shift=2.5",
            "--mfn-search-estimate=best",
        ]
    )
    config = config_from_args(args, 4.0)
    assert (config.pose_search, config.search_radius_deg, config.search_step_deg) == (
        "local",
        12.0,
        4.0,
    )
    assert (config.search_refine_steps, config.search_levels) == (1.5, 1)
    assert (config.search_max_shift, config.search_estimate) == (2.5, "best")
    adam = config_from_args(parser.parse_args(["--mfn-pose-search=adam"]), 4.0)
    assert adam.pose_search == "adam" and adam.search_max_shift is None
    source = ParticleSource.from_star(star)
    summary = run_mfn(args, source, tmp_path)
    for name in ("map.mrc", "stage1.mrc", "stage2.mrc", "initial.mrc", "loss.png", "mfn.json"):
        assert (tmp_path / name).is_file(), name
    refined = read_particles(tmp_path / "particles_refined.star")
    assert len(refined) == 64 and refined.has_poses
    report = json.loads((tmp_path / "mfn.json").read_text())
    assert report["method"] == "mfn" and report["stages"] == "auto:0.5:1,1:0.5:2:shifts"
    assert report["pose_error_before"]["mean_angle_deg"] == pytest.approx(5.0, abs=0.6)
    assert summary["pose_error_after"]["mean_angle_deg"] > 0
    assert len(report["history"]) == 2


def test_cli_reconstruct_method_mfn_end_to_end(tiny_set, tmp_path, capsys):
    """`cryoprior reconstruct STAR --method mfn` through the real entry point."""
    star, _ = tiny_set
    out = tmp_path / "mfn_out"
    argv = [
        "reconstruct",
        str(star),
        "--method",
        "mfn",
        "--mfn-hidden=16",
        "--mfn-stages=auto:0.5:1,1:0.5:2:fixed",
        "--mfn-batch-size=16",
        "--mfn-warm-start=5",
        "--quiet",
        "-o",
        str(out),
    ]
    assert cli(argv) == 0
    written = read_map(out / "map.mrc")
    assert written.pixel_size == pytest.approx(4.0) and written.data.shape == (16, 16, 16)
    assert json.loads((out / "mfn.json").read_text())["method"] == "mfn"
    assert "MFN reconstruction of 64 particles" in capsys.readouterr().out
    # resuming a finished run in the same folder without --resume is refused clearly
    assert cli(argv) == 2
    assert "resume" in capsys.readouterr().err.lower()


# ----------------------------------------------------------------------------- pose search


def test_rotation_log_and_search_lattice(gen):
    v = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True) * torch.rand(200, 1, generator=gen, dtype=torch.float64)
    v = v * 3.1  # angles up to 3.1 rad
    torch.testing.assert_close(rotation_log(axis_angle_to_matrix(v)), v)
    assert float(rotation_log(torch.eye(3, dtype=torch.float64)).abs().max()) == 0.0
    offsets = search_offsets(math.radians(30), math.radians(7.5))
    assert torch.equal(offsets[0], torch.zeros(3, dtype=torch.float64))
    assert float(offsets.norm(dim=-1).max()) <= math.radians(30) + 1e-12
    # the cubic lattice of spacing 7.5° inside a 30° ball: 257 points (|n| <= 4, n in Z³)
    assert offsets.shape == (257, 3)
    steps = offsets / math.radians(7.5)
    torch.testing.assert_close(steps, steps.round())
    assert search_offsets(0.0, 0.1).shape == (1, 3)


def noiseless_toy(n: int = 32, box: int = 24, px: float = 4.0):
    vol = blob_map(box)
    rotations, shifts, ctf = particle_params(n, box, px, shift=4.0)
    images = ParticleRenderer(Volume(vol, px), pad=2.0).render(rotations.float(), shifts, ctf)
    return vol, px, images, rotations, torch.as_tensor(shifts), ctf


@pytest.mark.parametrize("kernel", ["linear", "cubic"])
def test_local_search_recovers_large_perturbation(kernel):
    # noiseless 24 px toy with CTF, the true map fixed: 18° / 2 Å (half a pixel) errors
    # are found by the search alone to about its finest spacing (6° -> 2° -> 0.67°): no
    # image is left outside the first lattice's cell, shifts within a fraction of a pixel
    vol, px, images, rotations, shifts, ctf = noiseless_toy()
    start_r, start_s = perturb_poses(rotations, shifts, 18.0, 2.0, seed=3)
    config = MFNFitConfig(
        pose_steps=0,
        search_radius_deg=25.0,
        search_step_deg=6.0,
        search_levels=3,
        search_estimate="best",
        kernel=kernel,
    )
    r, s = refine_poses(vol, px, images, start_r, start_s, ctf, band=1.0, config=config)
    angles = torch.rad2deg(rotation_angle(r, rotations))
    moved = (s - shifts).norm(dim=-1)
    assert float(angles.mean()) < 1.5 and float(angles.max()) < 6.0, angles
    assert float(moved.mean()) < 0.1 * px and float(moved.max()) < 0.25 * px, moved
    # a few Adam steps after the search polish further; Adam steps alone stay far off
    both = replace(config, pose_steps=5)
    r_both, _ = refine_poses(vol, px, images, start_r, start_s, ctf, band=1.0, config=both)
    assert float(torch.rad2deg(rotation_angle(r_both, rotations)).mean()) < 0.8
    adam = replace(config, pose_search="adam", pose_steps=10)
    r_adam, _ = refine_poses(vol, px, images, start_r, start_s, ctf, band=1.0, config=adam)
    assert float(torch.rad2deg(rotation_angle(r_adam, rotations)).mean()) > 5.0


def test_local_search_never_increases_the_loss():
    # noisy images, a wrong map scale and random far-off starts: every image's loss under
    # the fit's forward model is at most what it was, and most images improve
    vol, px, images, rotations, shifts, ctf = noiseless_toy(n=48)
    g = torch.Generator().manual_seed(7)
    noisy = images + images.std() * 2 * torch.randn(images.shape, generator=g)
    start_r, start_s = perturb_poses(rotations, shifts, 25.0, 3.0, seed=5)
    config = MFNFitConfig(pose_steps=0, search_radius_deg=20.0, search_step_deg=8.0)
    band = 0.6
    r, s = refine_poses(0.7 * vol, px, noisy, start_r, start_s, ctf, band=band, config=config)
    grid = working_grid(24, px, band * 12, band * 12)
    dp = padded_size(grid.box, 2.0)
    projector = Projector(fourier_crop(0.7 * vol, grid.box), 2.0, "linear")
    data = data_spectra(noisy, grid)
    ctf_padded = compute_ctf(ctf, (dp, dp), grid.pixel_size)

    def loss(rot, sh):
        model = model_spectra(projector, rot.float(), sh.float(), ctf_padded, grid)
        return ((model - data).abs() ** 2).sum(-1)

    before, after = loss(start_r, start_s), loss(r, s)
    assert bool((after <= before).all())
    assert float((after < before).float().mean()) > 0.5
    assert float(torch.rad2deg(rotation_angle(r, rotations)).mean()) < 20.0


def test_pose_prior_penalty_is_the_gaussian_log_density(gen):
    start = random_rotations(5, generator=gen).double()
    v = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.2
    prior = PosePrior(start, sigma=0.1)
    torch.testing.assert_close(prior.penalty(start), torch.zeros(5, dtype=torch.float64))
    moved = axis_angle_to_matrix(v) @ start
    torch.testing.assert_close(prior.penalty(moved), (v**2).sum(-1) / (2 * 0.1**2))
    # candidates (C, B, 3, 3) broadcast against the batch's starts
    both = torch.stack([start, moved])
    assert prior.penalty(both).shape == (2, 5)


def test_pose_prior_keeps_good_starts_and_still_corrects_bad_ones():
    # very noisy images, the true map: a uniform prior lets the wide search move poses
    # that started 2° from the truth by the noise; a prior that states the starting error
    # (rms 2°) keeps them close (measured 9.3° vs 2.0°), and from 10° with a prior of rms
    # 10° the search still improves the poses, at least as much as without one (10.1° vs
    # 8.6°)
    vol, px, images, rotations, shifts, ctf = noiseless_toy(n=48)
    g = torch.Generator().manual_seed(11)
    noisy = images + images.std() * 6 * torch.randn(images.shape, generator=g)
    config = MFNFitConfig(pose_steps=0, search_radius_deg=30.0, search_step_deg=6.0)

    def mean_error(start_deg: float, prior: float | None) -> float:
        start = perturb_poses(rotations, shifts, start_deg, 0.0, seed=4)
        cfg = replace(config, pose_prior_deg=prior)
        r, _ = refine_poses(vol, px, noisy, *start, ctf, band=0.5, config=cfg)
        return float(torch.rad2deg(rotation_angle(r, rotations)).mean())

    uniform, prior = mean_error(2.0, None), mean_error(2.0, 2.0)
    assert prior < uniform and prior < 3.0, (uniform, prior)
    far_uniform, far_prior = mean_error(10.0, None), mean_error(10.0, 10.0)
    assert far_prior < 9.5 and far_prior <= far_uniform, (far_uniform, far_prior)


@pytest.mark.parametrize("box", [16, 17])
def test_shift_search_matches_brute_force(box):
    # the losses at all shifts of a rotation, from one spectrum and phase ramps, equal the
    # loss evaluated spectrum by spectrum at each shift; without a CTF they match the fit's
    # forward model (model_spectra) up to its crop, and the best shift is the same
    px = 3.0
    vol = blob_map(box)
    rotations, shifts, ctf = particle_params(4, box, px, shift=3.0)
    images = ParticleRenderer(Volume(vol, px), pad=2.0).render(rotations.float(), shifts, None)
    grid = working_grid(box, px, 0.8 * box / 2, 0.8 * box / 2)
    projector = Projector(fourier_crop(vol, grid.box), 2.0, "linear")
    model = BandSearchModel(projector, grid, None)
    data = model.half(data_spectra(images, grid))
    start = torch.as_tensor(shifts).float() + torch.tensor([1.0, -2.0])  # truth: t = (-1, 2)
    axis = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)
    offsets = torch.cartesian_prod(axis, axis)  # (49, 2) Å
    rot = rotations.double()[None]
    fast = model.losses(model.spectra(rot, start), data, model.ramps(offsets))[0]  # (B, S)
    for j in (0, 10, 24, 48):
        moved = start + offsets[j].float()
        spec = model.spectra(rot, moved)[0]
        direct = (model.weight * ((spec - data).abs() ** 2 - data.abs() ** 2)).sum(-1)
        torch.testing.assert_close(
            fast[:, j], direct, rtol=1e-4, atol=1e-3 * float(direct.abs().max())
        )
    full = data_spectra(images, grid)
    exact = torch.stack(
        [
            (
                (
                    model_spectra(projector, rotations.float(), start + t.float(), None, grid)
                    - full
                ).abs()
                ** 2
            ).sum(-1)
            for t in offsets
        ],
        -1,
    ) - (full.abs() ** 2).sum(-1, keepdim=True)
    truth = int(((offsets - torch.tensor([-1.0, 2.0], dtype=torch.float64)).norm(dim=-1)).argmin())
    assert fast.argmin(-1).tolist() == exact.argmin(-1).tolist() == [truth] * 4
    corr = torch.corrcoef(torch.stack([fast.flatten(), exact.flatten()]))[0, 1]
    assert float(corr) > 0.99


def test_search_config_validation_and_schedule():
    for bad in (
        {"pose_search": "grid"},
        {"search_radius_deg": -1.0},
        {"search_step_deg": 0.0},
        {"search_radius_deg": 90.0, "search_step_deg": 2.0},
        {"search_levels": 0},
        {"search_max_shift": -1.0},
        {"search_estimate": "median"},
        {"search_refine_steps": 10.0},
        {"pose_prior_deg": 0.0},
        {"pose_prior_deg": float("nan")},
    ):
        with pytest.raises(InputError):
            MFNFitConfig(**bad).validate()
    config = MFNFitConfig(
        search_radius_deg=40.0, search_step_deg=10.0, search_max_shift=2.5, search_levels=3
    )
    restored = MFNFitConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == replace(config, stages=config.resolved_stages())
    # the default schedule: coarse outputs refine shifts only, the finest output searches
    stages = MFNFitConfig(num_layers=3).resolved_stages()
    assert [s.poses for s in stages] == ["shifts", "shifts", "all", "all"]
    # search radius / step per stage: the config's at the first searching stage, then the
    # step scaled by the band ratio and the radius search_refine_steps steps
    grid = working_grid(64, 1.5, 9.6, 19.2)
    first = search_grid(config, grid)
    assert first.radius == pytest.approx(math.radians(40.0))
    assert first.step == pytest.approx(math.radians(10.0))
    assert first.max_shift == 2.5 and first.levels == 3
    assert first.shift_step == pytest.approx(64 * 1.5 / (4 * 9.6))
    later = search_grid(config, working_grid(64, 1.5, 19.2, 19.2), scale=0.5, refine=True)
    assert later.step == pytest.approx(math.radians(5.0))
    assert later.radius == pytest.approx(2 * math.radians(5.0))
    default_shift = search_grid(MFNFitConfig(), grid).max_shift
    assert default_shift == pytest.approx(3 * 1.5)
    assert search_grid(MFNFitConfig(refine_shifts=False), grid).max_shift == 0.0
