"""RELION STAR particle files: 3.1 round trip, 3.0 reading, errors, stack references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoprior.core.containers import ImageStack
from cryoprior.core.errors import InputError
from cryoprior.geometry.rotations import euler_to_matrix
from cryoprior.io.mrc import write_stack
from cryoprior.io.star import (
    Particles,
    check_stack_references,
    read_particle_images,
    read_particles,
    write_particles,
)


def _particles(tmp_path, n: int = 6, seed: int = 0) -> Particles:
    rng = np.random.default_rng(seed)
    stack = tmp_path / "stacks" / "parts.mrcs"
    return Particles(
        image_index=np.arange(1, n + 1),
        image_stack=[str(stack)] * n,
        pixel_size=1.25,
        image_size=16,
        angles=rng.uniform(-np.pi, np.pi, (n, 3)) * np.array([1.0, 0.5, 1.0]) + [0, np.pi / 2, 0],
        shifts=rng.normal(0, 3, (n, 2)),
        defocus_u=rng.uniform(8000, 20000, n),
        defocus_v=rng.uniform(8000, 20000, n),
        defocus_angle=rng.uniform(0, np.pi, n),
        voltage=np.where(np.arange(n) < n // 2, 300.0, 200.0),
        cs=2.7,
        amplitude_contrast=0.07,
        phase_shift=rng.uniform(0, 0.5, n),
        bfactor=rng.uniform(0, 50, n),
        extra=pd.DataFrame(
            {
                "rlnMicrographName": [f"mic{i % 2}.mrc" for i in range(n)],
                "rlnClassNumber": np.arange(n) % 3 + 1,
            }
        ),
    )


def test_star_31_round_trip_keeps_every_field(tmp_path):
    particles = _particles(tmp_path)
    path = tmp_path / "out" / "particles.star"
    write_particles(path, particles)

    text = path.read_text()
    assert "data_optics" in text and "data_particles" in text
    assert "000003@../stacks/parts.mrcs" in text  # 6 digits, relative to the STAR folder
    raw = starfile.read(path, always_dict=True)
    np.testing.assert_allclose(
        raw["particles"]["rlnAngleRot"], np.rad2deg(particles.angles[:, 0]), atol=1e-6
    )
    assert sorted(raw["optics"]["rlnVoltage"]) == [200.0, 300.0]  # one group per setting

    back = read_particles(path)
    assert len(back) == len(particles) and back.has_poses and back.has_ctf
    np.testing.assert_array_equal(back.image_index, particles.image_index)
    assert [str(s) for s in back.image_stack] == [str(s) for s in particles.image_stack]
    np.testing.assert_allclose(back.angles, particles.angles, atol=1e-8)
    np.testing.assert_allclose(back.shifts, particles.shifts, atol=1e-8)
    for name in (
        "defocus_u",
        "defocus_v",
        "defocus_angle",
        "voltage",
        "cs",
        "amplitude_contrast",
        "phase_shift",
        "bfactor",
    ):
        np.testing.assert_allclose(
            getattr(back, name), getattr(particles, name), atol=1e-6, err_msg=name
        )
    assert back.pixel_size == 1.25 and back.image_size == 16
    assert list(back.extra.columns) == ["rlnMicrographName", "rlnClassNumber"]
    assert back.extra["rlnMicrographName"].tolist() == particles.extra["rlnMicrographName"].tolist()
    assert back.extra["rlnClassNumber"].tolist() == particles.extra["rlnClassNumber"].tolist()
    assert len(set(back.optics_group)) == 2

    # A second round trip keeps the optics groups and names unchanged.
    write_particles(tmp_path / "again.star", back)
    optics = starfile.read(tmp_path / "again.star", always_dict=True)["optics"]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]


def test_rotation_matrices_and_subset(tmp_path):
    particles = _particles(tmp_path)
    R = particles.rotation_matrices()
    assert R.shape == (6, 3, 3) and R.dtype == torch.float64
    assert torch.allclose(R[2], euler_to_matrix(torch.from_numpy(particles.angles[2])))
    sub = particles.subset([4, 1])
    assert len(sub) == 2 and sub.image_index.tolist() == [5, 2]
    np.testing.assert_array_equal(sub.defocus_u, particles.defocus_u[[4, 1]])
    assert sub.extra["rlnClassNumber"].tolist() == [2, 2]
    assert len(particles.subset(particles.voltage > 250)) == 3


RELION30 = """
# RELION; version 3.0

data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnDetectorPixelSize #9
_rlnMagnification #10
_rlnOriginX #11
_rlnOriginY #12
_rlnAngleRot #13
_rlnAngleTilt #14
_rlnAnglePsi #15
_rlnImageSize #16
000001@Particles/mic1.mrcs mic1.mrc 15000 14000 30 300 2.7 0.1 14 100000 2 -1.5 10 90 -45 64
000002@Particles/mic1.mrcs mic1.mrc 16000 15500 45 300 2.7 0.1 14 100000 -4 0.5 20 45 180 64
"""


def test_relion30_file_converts_pixel_origins_to_angstrom(tmp_path):
    path = tmp_path / "old.star"
    path.write_text(RELION30)
    p = read_particles(path)
    assert p.pixel_size == pytest.approx(1.4)  # 14 µm * 1e4 / 100000
    np.testing.assert_allclose(p.shifts, [[2.8, -2.1], [-5.6, 0.7]])
    np.testing.assert_allclose(np.rad2deg(p.angles), [[10, 90, -45], [20, 45, 180]])
    np.testing.assert_allclose(np.rad2deg(p.defocus_angle), [30, 45])
    assert p.has_poses and p.has_ctf and p.image_size == 64
    assert p.voltage.tolist() == [300.0, 300.0] and p.optics_group.tolist() == [1, 1]
    assert p.image_index.tolist() == [1, 2]
    assert p.image_stack[0] == str(tmp_path / "Particles" / "mic1.mrcs")
    assert list(p.extra.columns) == ["rlnMicrographName"]
    np.testing.assert_array_equal(p.phase_shift, 0.0)
    np.testing.assert_array_equal(p.bfactor, 0.0)


def test_missing_angles_give_zero_poses_flag(tmp_path):
    path = tmp_path / "noposes.star"
    path.write_text(
        "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_rlnImageSize\n"
        "1@s.mrcs 2.0 32\n2@s.mrcs 2.0 32\n"
    )
    p = read_particles(path)
    assert not p.has_poses and not p.has_ctf
    np.testing.assert_array_equal(p.angles, np.zeros((2, 3)))
    np.testing.assert_array_equal(p.shifts, np.zeros((2, 2)))


def test_missing_image_name_names_the_column(tmp_path):
    path = tmp_path / "noname.star"
    path.write_text("data_particles\nloop_\n_rlnAngleRot\n_rlnImagePixelSize\n1.0 2.0\n")
    with pytest.raises(InputError, match="rlnImageName") as info:
        read_particles(path)
    assert "noname.star" in str(info.value)


def test_missing_defocus_v_and_pixel_size_are_named(tmp_path):
    path = tmp_path / "ctf.star"
    path.write_text(
        "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_rlnImageSize\n"
        "_rlnDefocusU\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n1@s.mrcs 2.0 32 10000 300 2.7 0.1\n"
    )
    with pytest.raises(InputError, match="rlnDefocusV"):
        read_particles(path)
    path.write_text("data_\nloop_\n_rlnImageName\n_rlnImageSize\n1@s.mrcs 32\n")
    with pytest.raises(InputError, match="pixel size"):
        read_particles(path)
    assert read_particles(path, pixel_size=3.0).pixel_size == 3.0


def test_check_stack_references_and_image_reading(tmp_path, gen):
    particles = _particles(tmp_path)
    images = torch.randn(6, 16, 16, generator=gen)
    write_stack(tmp_path / "stacks" / "parts.mrcs", ImageStack(images, 1.25))
    write_particles(tmp_path / "p.star", particles)
    p = read_particles(tmp_path / "p.star")
    check_stack_references(p)
    assert torch.equal(read_particle_images(p, [5, 0]), images[[5, 0]])

    bad = Particles(**{**vars(p), "image_index": np.array([1, 2, 3, 4, 5, 7])})
    with pytest.raises(InputError, match="out of range") as info:
        check_stack_references(bad)
    message = str(info.value)
    assert "p.star" in message and "parts.mrcs" in message and "7@" in message

    missing = Particles(**{**vars(p), "image_stack": [str(tmp_path / "nope.mrcs")] * 6})
    with pytest.raises(InputError, match="nope.mrcs"):
        check_stack_references(missing)
