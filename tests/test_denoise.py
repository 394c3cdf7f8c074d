"""Half-map denoising: the noise estimate, the half-map likelihood, the post-processing
baselines, and ``cryoprior denoise`` end to end (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryoprior.cli.main import main as cli_main
from cryoprior.core.containers import Volume
from cryoprior.data.corpus import shipped_records
from cryoprior.io.mrc import read_map, read_map_origin, write_map
from cryoprior.physics.atoms import atoms_to_map
from cryoprior.solvers.halfmap import (
    HalfMapLikelihood,
    half_map_noise,
    rfft_multiplicity,
    rfft_shells,
)
from cryoprior.solvers.postprocess import fsc_lowpass, guinier_bfactor

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _radius(d: int) -> torch.Tensor:
    k = torch.fft.fftfreq(d, dtype=F64) * d
    return torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)


def _coloured(d: int, power, gen: torch.Generator) -> torch.Tensor:
    """A real Gaussian field whose orthonormal spectrum has E|N(k)|² = power(|k|)."""
    w = torch.randn(d, d, d, generator=gen, dtype=F64)
    spec = torch.fft.fftn(w, norm="ortho") * torch.sqrt(power(_radius(d)))
    return torch.fft.ifftn(spec, norm="ortho").real


def test_half_map_noise_matches_the_true_noise_per_shell():
    d, gen = 64, torch.Generator().manual_seed(3)

    def power(r):  # each half's noise; the average's is half of it
        return 2.0 * (1.5 * torch.exp(-((r / 12.0) ** 2)) + 0.3)

    truth = torch.zeros(d, d, d, dtype=F64)
    truth[24:40, 20:44, 28:36] = 4.0
    h1, h2 = truth + _coloured(d, power, gen), truth + _coloured(d, power, gen)
    noise = half_map_noise(h1, h2, 1.2)
    shells = torch.arange(12, d // 2)
    ratio = noise.noise_power[shells] / (power(shells.to(F64)) / 2)
    assert float((ratio - 1).abs().max()) < 0.10
    # signal-free halves: FSC near 0 at every well-sampled shell
    pure = half_map_noise(_coloured(d, power, gen), _coloured(d, power, gen), 1.2)
    assert float(pure.fsc[8 : d // 2].abs().max()) < 0.15
    assert noise.frequency[d // 2] == pytest.approx(1 / 2.4)


def test_half_map_likelihood_adjoint_norm_and_exact_preconditioner():
    d, gen = 12, torch.Generator().manual_seed(0)
    h1 = torch.randn(d, d, d, generator=gen, dtype=F64)
    h2 = h1 + torch.randn(d, d, d, generator=gen, dtype=F64) * (1 + _radius(d) / 6)
    noise = half_map_noise(h1, h2, 1.0)
    op = HalfMapLikelihood((h1 + h2) / 2, noise)
    x = torch.randn(2, d, d, d, generator=gen, dtype=F64)
    y = torch.randn(2, *op.range_shape, generator=gen, dtype=F64)
    lhs, rhs = float((op.apply(x) * y).sum()), float((x * op.apply_adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)
    # ‖B x‖² = Σ over the whole spectrum of |X(k)|² / S(k)
    spec = torch.fft.fftn(x[0], norm="ortho")
    s = noise.noise_power[torch.round(_radius(d)).long()]
    assert float((op.apply(x[0]) ** 2).sum()) == pytest.approx(
        float((spec.abs() ** 2 / s).sum()), rel=1e-10
    )
    z = op.approx_normal_inverse(x, 0.7, 3.0)
    assert torch.allclose(0.7 * z + 3.0 * op.normal(z), x, atol=1e-10)
    assert rfft_shells(d).shape == (d, d, d // 2 + 1)
    assert rfft_multiplicity(d).tolist() == [1.0] + [2.0] * (d // 2 - 1) + [1.0]


def test_guinier_fit_recovers_a_known_bfactor_and_lowpass_cuts_there():
    d, px, b = 64, 1.0, 80.0
    gen = torch.Generator().manual_seed(1)
    s = _radius(d) / (d * px)

    def decay(r):
        return torch.exp(-b * (r / (d * px)) ** 2 / 2)  # power ∝ exp(−B s²/2)

    signal = _coloured(d, decay, gen)
    h1 = signal + 0.02 * torch.randn(d, d, d, generator=gen, dtype=F64)
    h2 = signal + 0.02 * torch.randn(d, d, d, generator=gen, dtype=F64)
    noise = half_map_noise(h1, h2, px)
    assert guinier_bfactor(noise, low=10.0, high=3.0) == pytest.approx(b, rel=0.1)
    low = fsc_lowpass((h1 + h2) / 2, noise)
    cut = 1.0 / noise.resolution(0.143)
    beyond = torch.fft.fftn(low).abs()[s > cut + 1.0 / (d * px)]
    assert float(beyond.max()) < 1e-8


def _halves(tmp_path, box=32, noise=0.5, origin=(10.0, -3.0, 4.5)):
    rec = next(r for r in shipped_records() if r.name == "5pti_A")
    xyz, el, _ = rec.atoms()
    truth = atoms_to_map(xyz - xyz.mean(0), el, box, 1.5, bfactors=np.full(len(el), 36.0))
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in (1, 2):
        h = truth + noise * float(truth.std()) * torch.randn(truth.shape, generator=gen)
        paths.append(tmp_path / f"half{i}.mrc")
        write_map(paths[-1], Volume(h.float(), 1.5), origin_angstrom=origin)
    return truth, paths


def test_cli_denoise_end_to_end_keeps_the_inputs_grid_and_origin(tmp_path):
    truth, (p1, p2) = _halves(tmp_path)
    out = tmp_path / "out"
    rc = cli_main(
        ["denoise", str(p1), str(p2), "--mass-kda", "6.5", "--steps", "3", "--samples", "2"]
        + ["--quiet", "-o", str(out)]
    )
    assert rc == 0
    for name in ("denoised", "denoised_std", "lowpass", "postprocess"):
        m = read_map(out / f"{name}.mrc")
        assert tuple(m.data.shape) == (32, 32, 32) and m.pixel_size == pytest.approx(1.5)
        assert read_map_origin(out / f"{name}.mrc") == pytest.approx((10.0, -3.0, 4.5))
    std = read_map(out / "denoised_std.mrc").data
    assert float(std.max()) > 0
    record = json.loads((out / "denoise.json").read_text())
    assert record["intensity_scale"]["source"] == "map integral / mass"
    assert record["halves_fsc"]["fsc0143"] > 0


def test_cli_denoise_protein_spectrum_is_used_and_recorded(tmp_path):
    """--prior-spectrum protein changes the samples (same seed) and the record says so."""
    _, (p1, p2) = _halves(tmp_path)
    maps = {}
    for spectrum in ("white", "protein"):
        out = tmp_path / spectrum
        args = ["denoise", str(p1), str(p2), "--mass-kda", "6.5", "--steps", "2"]
        args += ["--samples", "1", "--prior-spectrum", spectrum, "--quiet", "-o", str(out)]
        assert cli_main(args) == 0
        assert json.loads((out / "denoise.json").read_text())["spectrum"] == spectrum
        maps[spectrum] = read_map(out / "denoised.mrc").data
    assert not torch.allclose(maps["white"], maps["protein"], rtol=1e-3, atol=1e-6)


def test_cli_denoise_protein_spectrum_without_mass_is_refused(tmp_path, capsys):
    _, (p1, p2) = _halves(tmp_path)
    out = tmp_path / "out"
    args = ["denoise", str(p1), str(p2), "--intensity-scale", "1.0"]
    rc = cli_main(args + ["--prior-spectrum", "protein", "-o", str(out)])
    assert rc == 2
    assert "needs the molecule's mass" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["shape", "pixel", "nan", "noncubic", "identical"])
def test_cli_denoise_refuses_bad_inputs_without_output(tmp_path, capsys, bad):
    _, (p1, p2) = _halves(tmp_path)
    h2 = read_map(p2)
    if bad == "shape":
        write_map(p2, Volume(torch.zeros(20, 20, 20), 1.5))
    elif bad == "pixel":
        write_map(p2, Volume(h2.data, 1.7))
    elif bad == "nan":
        data = h2.data.clone()
        data[3, 4, 5] = float("nan")
        write_map(p2, Volume(data, 1.5))
    elif bad == "noncubic":
        for p in (p1, p2):
            write_map(p, Volume(torch.rand(32, 32, 36), 1.5))
    else:
        write_map(p2, read_map(p1))
    out = tmp_path / "out"
    rc = cli_main(["denoise", str(p1), str(p2), "--mass-kda", "6.5", "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    expected = {
        "shape": "halves of one refinement",
        "pixel": "Å/px",
        "nan": "NaN",
        "noncubic": "cube",
        "identical": "identical",
    }[bad]
    assert expected in err
    assert not out.exists()


def test_plug_and_play_on_half_maps_keeps_well_measured_data_at_its_scale():
    """Noise far below the signal, its power falling by orders of magnitude with frequency
    (as a Wiener half map's, whose filter damps both): the data-consistency solves must
    return the average itself, at its own scale. Unpreconditioned, CG stalls on that
    spread of weights and returns a map ~30× too weak in integral — which an FSC
    (scale-blind per shell) does not see."""
    from cryoprior.priors import load_prior
    from cryoprior.solvers.halfmap import HalfMapNoise
    from cryoprior.solvers.map_baselines import plug_and_play

    rec = next(r for r in shipped_records() if r.name == "5pti_A")
    xyz, el, _ = rec.atoms()
    truth = atoms_to_map(xyz - xyz.mean(0), el, 32, 1.5, bfactors=np.full(len(el), 36.0))
    truth = truth.to(F64)
    shells = torch.arange(60, dtype=F64)
    power = 1e-2 * float(truth.pow(2).mean()) * 10 ** (-shells / 4)  # falls 10⁸ to Nyquist
    noise = HalfMapNoise(power, power, torch.ones(60, dtype=F64), shells / 48.0, 32, 1.5)
    op = HalfMapLikelihood(truth, noise)
    prior = load_prior("volume_native")
    out = plug_and_play(prior, op, op.measurement(torch.float32), 1.0, 1.0, n_iter=2).map
    rel = float((out.double() - truth).norm() / truth.norm())
    assert rel < 0.02
    assert float(out.sum()) == pytest.approx(float(truth.sum()), rel=0.01)
