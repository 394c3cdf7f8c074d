"""``cryoprior reconstruct --prior`` with a point-cloud (Cα) prior: the STAR -> measurement
conventions (padded-grid CTF, shift sign), the CLI end to end with a tiny untrained EGNN
prior, and its input errors."""

from __future__ import annotations

import json
import math

import gemmi
import numpy as np
import pytest
import torch
from test_calpha_fit import one_thread, spread_cloud, tiny_prior  # noqa: F401 (autouse fixture)

from cryoprior.cli.main import main as cli_main
from cryoprior.cli.reconstruct_calpha import measurement_from_source
from cryoprior.core.containers import ImageStack
from cryoprior.geometry.rotations import matrix_to_euler, random_rotations
from cryoprior.io.mrc import write_stack
from cryoprior.io.star import Particles, write_particles
from cryoprior.physics.ctf import CTFParams, compute_ctf
from cryoprior.physics.source import ParticleSource
from cryoprior.priors import save_prior
from cryoprior.solvers.calpha_fit import CalphaMeasurement, simulate_calpha_images

F64 = torch.float64
BOX, PX, N_RES, K, MAX_NODES = 24, 1.5, 10, 3, 12
SEQUENCE = "MKTAYIAKQR"  # 10 residues


def cloud(n: int, seed: int) -> torch.Tensor:
    """n points (Å) in a ball of 8 Å, pairwise at least 4.5 Å apart, zero centre of mass."""
    return spread_cloud(n, seed, min_dist=4.5, radius=8.0)


def ctf_params(k: int) -> CTFParams:
    defocus = torch.linspace(12000.0, 22000.0, k, dtype=F64)
    return CTFParams(defocus, defocus - 150.0, 0.4, 300.0, 2.7, 0.1)


def write_particle_set(folder, images, rotations, origins, ctf: CTFParams) -> str:
    """images (K, D, D) as an MRC stack + a RELION STAR with poses, origins (Å) and CTF."""
    k = images.shape[0]
    stack = folder / "particles.mrcs"
    write_stack(stack, ImageStack(images.float(), PX))
    particles = Particles(
        image_index=np.arange(1, k + 1),
        image_stack=[str(stack)] * k,
        pixel_size=PX,
        image_size=images.shape[-1],
        angles=matrix_to_euler(rotations.double()).numpy(),
        shifts=origins,
        defocus_u=ctf.defocus_u.numpy(),
        defocus_v=ctf.defocus_v.numpy(),
        defocus_angle=ctf.defocus_angle.numpy(),
        voltage=ctf.voltage.numpy(),
        cs=ctf.cs.numpy(),
        amplitude_contrast=ctf.amplitude_contrast.numpy(),
        has_poses=True,
    )
    star = folder / "particles.star"
    write_particles(star, particles)
    return str(star)


def origins_angstrom(k: int) -> np.ndarray:
    """RELION origins (Å) of k particles: sub-pixel and of both signs."""
    return np.array([[2.1, -3.3], [-1.4, 2.6], [3.0, 0.9], [-2.2, -1.7]])[:k]


def simulated_stack(folder, snr: float | None, seed: int = 5):
    """K images of a Cα cloud with CTF and shifts (particle at −origin), written to disk."""
    truth = cloud(N_RES, seed)
    g = torch.Generator().manual_seed(seed)
    rot = random_rotations(K, g, F64)
    origins = origins_angstrom(K)
    sim = simulate_calpha_images(
        truth,
        rot,
        BOX,
        PX,
        snr,
        ctf_params=ctf_params(K),
        shifts=torch.as_tensor(-origins / PX),
        amplitude=2.0,
        generator=g,
    )
    star = write_particle_set(folder, sim.measurement.images, rot, origins, ctf_params(K))
    return truth, sim, star


@pytest.fixture(scope="module")
def tiny_prior_dir(tmp_path_factory) -> str:
    """An untrained EGNN diffusion prior over clouds of up to 12 points, saved to disk."""
    prior = tiny_prior(max_nodes=MAX_NODES)
    path = tmp_path_factory.mktemp("prior") / "tiny_calpha"
    return str(save_prior(path, prior.denoiser, prior.metadata))


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    """K noisy particles (SNR 1) of a 10-residue cloud, as STAR + MRCS."""
    return simulated_stack(tmp_path_factory.mktemp("particles"), snr=1.0)


# ------------------------------------------------------------------- conventions


def test_measurement_from_star_reproduces_the_simulators_images(tmp_path):
    """Noiseless images written as STAR + MRCS and read back: the measurement's model at the
    true cloud gives the stored images (CTF on the padded grid, particle at −origin)."""
    truth, sim, star = simulated_stack(tmp_path, snr=None)
    source = ParticleSource.from_star(star)
    meas = measurement_from_source(source, np.arange(K))
    assert meas.images.shape == (K, BOX, BOX) and meas.ctf.shape == (K, 2 * BOX, 2 * BOX)
    torch.testing.assert_close(meas.shifts.double(), torch.as_tensor(-origins_angstrom(K) / PX))
    scale = float(sim.clean.abs().max())

    def misfit(m: CalphaMeasurement) -> float:
        with torch.no_grad():
            model = m.operator(N_RES, amplitude=2.0)(truth.float())
        return float((model - meas.images).abs().max()) / scale

    assert misfit(meas) < 1e-4
    # the wrong shift sign, or the CTF on the image grid, would not fit the stored images
    flipped = CalphaMeasurement(
        meas.images, meas.rotations, PX, meas.sigma, meas.ctf, -meas.shifts, meas.pad
    )
    ctf_box = compute_ctf(ctf_params(K), (BOX, BOX), PX).float()
    unpadded = CalphaMeasurement(
        meas.images, meas.rotations, PX, meas.sigma, ctf_box, meas.shifts, meas.pad
    )
    assert misfit(flipped) > 0.1 and misfit(unpadded) > 0.1


# ------------------------------------------------------------------- the CLI


def _atoms(model: gemmi.Model) -> list[gemmi.Atom]:
    return [a for ch in model for r in ch for a in r]


def test_cli_reconstruct_with_a_calpha_prior_end_to_end(noisy_set, tiny_prior_dir, tmp_path):
    truth, sim, star = noisy_set
    out = tmp_path / "rec_ca"
    argv = ["reconstruct", star, "--prior", tiny_prior_dir, "--n-residues", str(N_RES)]
    argv += ["--steps", "3", "--samples", "2", "-o", str(out), "--quiet"]
    assert cli_main(argv) == 0

    model = gemmi.read_structure(str(out / "model.pdb"))
    assert len(model) == 1
    atoms = _atoms(model[0])
    assert len(atoms) == N_RES and {a.name for a in atoms} == {"CA"}
    assert {r.name for ch in model[0] for r in ch} == {"UNK"}
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms])
    # centred at the box centre (the prior's zero centre of mass), inside the box
    assert np.abs(xyz.mean(0)).max() < 2e-3
    assert np.abs(xyz).max() <= BOX / 2 * PX

    samples = gemmi.read_structure(str(out / "samples.pdb"))
    assert len(samples) == 2
    stacked = np.array(
        [[[a.pos.x, a.pos.y, a.pos.z] for a in _atoms(samples[i])] for i in range(2)]
    )
    assert stacked.shape == (2, N_RES, 3)
    assert np.abs(stacked[0] - stacked[1]).max() > 1e-2  # two different samples
    # the model is the mean of the matched samples, point by point
    np.testing.assert_allclose(stacked.mean(0), xyz, atol=2e-3)

    record = json.loads((out / "reconstruct.json").read_text())
    assert record["method"] == "calpha_prior"
    assert (record["n_particles"], record["box"], record["n_residues"]) == (K, BOX, N_RES)
    assert record["pixel_size"] == pytest.approx(PX)
    assert record["guidance"] == "dps_x0" and record["n_steps"] == 3
    assert record["fit"]["dps"]["n_samples"] == 2
    assert record["noise_sigma"] == pytest.approx(sim.noise_sigma, rel=0.3)
    assert record["amplitude"] > 0 and math.isfinite(record["amplitude"])
    spread = np.array(record["spread_rms"])
    assert spread.shape == (N_RES,) and (spread > 0).all()
    # spread of the two matched samples about their mean, per residue
    by_hand = np.sqrt(((stacked - stacked.mean(0)) ** 2).sum(-1).mean(0))
    np.testing.assert_allclose(by_hand[np.argsort(by_hand)], np.sort(spread), atol=5e-3)
    b = np.array([a.b_iso for a in atoms])
    np.testing.assert_allclose(b, np.minimum(8 * math.pi**2 * spread**2 / 3, 999.99), atol=0.02)
    assert record["seconds"]["total"] > 0


def test_cli_calpha_sequence_fasta_and_max_images(noisy_set, tiny_prior_dir, tmp_path, capsys):
    _, _, star = noisy_set
    fasta = tmp_path / "seq.fasta"
    fasta.write_text(f">segment\n{SEQUENCE[:6]}\n{SEQUENCE[6:]}\n")
    out = tmp_path / "rec"
    argv = ["reconstruct", star, "--prior", tiny_prior_dir, "--sequence", str(fasta)]
    argv += ["--guidance", "dps", "--steps", "2", "--max-images", "2", "-o", str(out), "--quiet"]
    assert cli_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "first 2 of 3 particles" in stdout and "model.pdb" in stdout
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["n_particles"] == 2 and record["n_particles_in_star"] == K
    assert record["n_residues"] == len(SEQUENCE) and record["guidance"] == "dps"
    assert len(_atoms(gemmi.read_structure(str(out / "model.pdb"))[0])) == len(SEQUENCE)
    assert not (out / "samples.pdb").exists()  # one sample


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "--n-residues N or --sequence"),
        (["--n-residues", "20"], "at most 12 points"),
        (["--n-residues", str(N_RES), "--guidance", "pigdm"], "dps_x0 or dps"),
        (["--n-residues", "9", "--sequence", SEQUENCE], "disagrees"),
        (["--n-residues", str(N_RES), "--mass-kda", "5"], "density-map prior"),
    ],
    ids=["no_n", "n_too_large", "guidance", "n_vs_sequence", "mass"],
)
def test_cli_calpha_input_errors(noisy_set, tiny_prior_dir, tmp_path, capsys, extra, message):
    _, _, star = noisy_set
    out = tmp_path / "rec"
    rc = cli_main(["reconstruct", star, "--prior", tiny_prior_dir, *extra, "-o", str(out)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (out / "model.pdb").exists()
