"""Missing views (preferred orientation): restricted pose draws, the measured-Fourier mask
of a set of views, the directional (cone) FSC, the half-map noise on the measured region,
and ``cryoprior denoise --angles`` (issue 17)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoprior.cli.main import main as cli_main
from cryoprior.geometry.rotations import matrix_to_euler, random_rotations, rotation_about_axis
from cryoprior.metrics import cone_fsc, cone_mask, fsc
from cryoprior.physics.simulator import draw_rotations
from cryoprior.solvers.halfmap import half_map_noise, measured_fourier_mask, rfft_shells

F64 = torch.float64


def _rfft_k(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kz, ky, kx) broadcastable on the rfft grid, and |k|."""
    k = torch.fft.fftfreq(d, dtype=F64) * d
    kz, ky, kx = k[:, None, None], k[None, :, None], k[None, None, : d // 2 + 1].abs()
    return torch.broadcast_tensors(kz, ky, kx), torch.sqrt(kz**2 + ky**2 + kx**2)


def test_restricted_poses_stay_within_the_tilt_and_cover_it():
    g = torch.Generator().manual_seed(0)
    r = draw_rotations(3000, g, max_tilt=60.0)
    tilt = torch.rad2deg(torch.acos(r[:, 2, 2].abs()))  # angle of Rᵀẑ to ±z
    assert r.shape == (3000, 3, 3) and float(tilt.max()) <= 60.0 + 1e-9
    assert float(tilt.max()) > 55.0  # the whole allowed range is used
    # uniform directions: P(tilt ≤ 30° | tilt ≤ 60°) = (1 − cos 30°)/(1 − cos 60°) = 0.268
    frac = float((tilt <= 30).double().mean())
    assert frac == pytest.approx((1 - math.cos(math.pi / 6)) / 0.5, abs=0.03)
    again = [draw_rotations(5, torch.Generator().manual_seed(1), 40.0) for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_measured_mask_of_single_views_is_their_central_plane():
    d = 16
    (kz, ky, kx), _ = _rfft_k(d)
    top = measured_fourier_mask(torch.eye(3, dtype=F64)[None], d)  # view along z
    assert torch.equal(top.bool(), kz == 0)
    side = rotation_about_axis("x", math.pi / 2)
    # R about x by 90°: the view direction Rᵀẑ is ±ŷ, so the plane k_y = 0 is measured
    m = measured_fourier_mask(side.reshape(1, 3, 3), d)
    assert torch.equal(m.bool(), ky == 0)
    both = measured_fourier_mask(torch.stack([torch.eye(3, dtype=F64), side.reshape(3, 3)]), d)
    assert torch.equal(both.bool(), (kz == 0) | (ky == 0))


def test_measured_mask_of_a_tilt_range_leaves_the_cone_out():
    d = 32
    views = draw_rotations(4000, torch.Generator().manual_seed(2), max_tilt=60.0)
    m = measured_fourier_mask(views, d).bool()
    (kz, _, _), r = _rfft_k(d)
    angle = torch.rad2deg(torch.acos((kz.abs() / r.clamp_min(1e-9)).clamp(max=1.0)))
    far = r >= 6
    assert not bool(m[far & (angle < 25)].any())  # inside the 30° cone: never measured
    assert bool(m[far & (angle > 36) & (r <= d // 2)].all())  # outside: all measured
    assert bool(m[0, 0, 0])  # DC
    # uniform views measure everything within Nyquist
    uniform = random_rotations(3000, torch.Generator().manual_seed(3), dtype=F64)
    full = measured_fourier_mask(uniform, d)
    assert bool(full.bool()[r <= d // 2].all())


def test_cone_fsc_of_a_map_with_itself_is_one_and_sees_only_the_cone():
    d, gen = 32, torch.Generator().manual_seed(4)
    a = torch.randn(d, d, d, generator=gen, dtype=F64)
    assert np.allclose(cone_fsc(a, a, 1.0, math.radians(30)).fsc[1:], 1.0)
    cone = cone_mask(d, math.radians(30))
    assert cone.shape == (d, d, d) and bool(cone[d // 2, d // 2, d // 2])
    assert bool(cone[d // 2 + 5, d // 2, d // 2]) and not bool(cone[d // 2, d // 2 + 5, d // 2])
    # a map corrupted only outside the cone keeps a perfect cone FSC, not a perfect FSC
    spec = torch.fft.fftshift(torch.fft.fftn(a))
    noise = torch.fft.fftshift(torch.fft.fftn(torch.randn(d, d, d, generator=gen, dtype=F64)))
    b = torch.fft.ifftn(torch.fft.ifftshift(spec + noise * (~cone))).real
    assert float(cone_fsc(a, b, 1.0, math.radians(30)).fsc[2 : d // 2].min()) > 0.999
    assert float(fsc(a, b, 1.0).fsc[2 : d // 2].max()) < 0.9


def test_half_map_noise_on_the_measured_region_ignores_an_empty_cone():
    d, gen = 32, torch.Generator().manual_seed(5)
    views = draw_rotations(2000, torch.Generator().manual_seed(6), max_tilt=60.0)
    m = measured_fourier_mask(views, d)

    def half() -> torch.Tensor:  # white noise (per-voxel variance 1), nothing in the cone
        spec = torch.fft.rfftn(torch.randn(d, d, d, generator=gen, dtype=F64), norm="ortho")
        return torch.fft.irfftn(spec * m, s=(d, d, d), norm="ortho")

    h1, h2 = half(), half()
    shells = torch.arange(6, d // 2)
    masked = half_map_noise(h1, h2, 1.0, m).noise_power[shells]
    naive = half_map_noise(h1, h2, 1.0).noise_power[shells]
    assert float((masked / 0.5 - 1).abs().max()) < 0.12  # the average's noise: 1/2
    assert float(naive.mean()) < 0.45  # the empty cone drags the plain estimate down
    assert rfft_shells(d).shape == m.shape


def _star_with_views(path, views: torch.Tensor) -> None:
    eul = np.rad2deg(matrix_to_euler(views).numpy())
    n = len(eul)
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
            "rlnAngleRot": eul[:, 0],
            "rlnAngleTilt": eul[:, 1],
            "rlnAnglePsi": eul[:, 2],
            "rlnImagePixelSize": 1.5,
            "rlnImageSize": 32,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
        }
    )
    starfile.write({"particles": table}, path)


def test_cli_denoise_with_angles_records_the_measured_fraction(tmp_path):
    from test_denoise import _halves

    _, (p1, p2) = _halves(tmp_path)
    star = tmp_path / "views.star"
    _star_with_views(star, draw_rotations(500, torch.Generator().manual_seed(7), max_tilt=60.0))
    out = tmp_path / "out"
    args = ["denoise", str(p1), str(p2), "--mass-kda", "6.5", "--steps", "2", "--samples", "1"]
    rc = cli_main(args + ["--angles", str(star), "--quiet", "-o", str(out)])
    assert rc == 0
    record = json.loads((out / "denoise.json").read_text())
    # a 30° cone (both sides) is 1 − cos 30° = 13 % of the sphere's directions
    assert 0.75 < record["measured_fraction"] < 0.95
    # a STAR file without poses is refused, naming the fix, and nothing is written
    table = starfile.read(star)
    no_poses = table.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write({"particles": no_poses}, star, overwrite=True)
    bad = tmp_path / "bad"
    assert cli_main(args + ["--angles", str(star), "-o", str(bad)]) == 2
    assert not bad.exists()
