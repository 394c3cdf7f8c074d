"""End to end: `cryoprior superres points|map|images` on tiny inputs with tiny priors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest
import torch

from cryoprior.cli import superres
from cryoprior.core.containers import ImageStack, Volume
from cryoprior.core.errors import InputError
from cryoprior.data.molecules import ELEMENTS
from cryoprior.diffusion import CosineSchedule, Denoiser
from cryoprior.io.mrc import read_map, read_map_origin, read_stack, write_map, write_stack
from cryoprior.io.structure import read_xyz, write_pdb, write_xyz
from cryoprior.networks import EGNN, UNet
from cryoprior.physics.degrade import fourier_downsample, fourier_upsample
from cryoprior.physics.projection import gaussian_blobs
from cryoprior.priors import PriorMetadata, save_prior
from cryoprior.train.config import resolve_objective


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(argv: list) -> int:
    """Call `cryoprior superres ARGS` as the CLI would."""
    argv = [str(a) for a in argv]
    parser = argparse.ArgumentParser()
    superres.add_args(parser)
    saved = sys.argv
    sys.argv = ["cryoprior", "superres", *argv]
    try:
        return superres.main(parser.parse_args(argv))
    finally:
        sys.argv = saved


def _perturb(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def priors(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained priors of every super-resolution kind, saved with save_prior."""
    root = tmp_path_factory.mktemp("priors")
    out = {}
    for name, elements in (("molecule", True), ("calpha", False)):
        torch.manual_seed(0)
        net = _perturb(
            EGNN(8, 2, in_node_features=len(ELEMENTS) if elements else 0, checkpoint=False), 1
        )
        objective = {
            **resolve_objective({"kind": "heat_restoration", "max_radius": 3.0}),
            "node_features": "elements" if elements else "none",
            "atoms": "heavy" if elements else "calpha",
            "elements": list(ELEMENTS),
        }
        meta = PriorMetadata(
            "points",
            (10 if elements else 6, 3),
            normalisation={"scale": 1.7, "offset": 0.0},
            objective=objective,
        )
        out[name] = save_prior(root / name, net, meta)
    for kind in ("sr3", "regression"):
        for ndim, rep in ((2, "image"), (3, "volume")):
            torch.manual_seed(0)
            unet = UNet(
                ndim,
                1,
                1,
                base_channels=8,
                channel_mults=(1, 2),
                groups=4,
                cond_channels=1 if kind == "sr3" else 0,
                n_extra_scalars=2,
            )
            _perturb(unet, 2)
            meta = PriorMetadata(
                rep,
                (1, *(8,) * ndim),
                pixel_size=1.5,
                normalisation={"scale": 2.0, "offset": 0.1},
                objective=resolve_objective({"kind": kind, "factors": [2, 4]}),
            )
            model = Denoiser(unet, CosineSchedule(), "v") if kind == "sr3" else unet
            out[f"{kind}_{rep}"] = save_prior(root / f"{kind}_{rep}", model, meta)
    return out


# ----------------------------------------------------------------------------- points

MOLFILE = """ethanol
  cryoprior test

  5  4  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.5200    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    2.0000    1.3500    0.0000 O   0  0  0  0  0  0  0  0  0  0  0  0
   -0.3600   -1.0200    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
    2.9500    1.3900    0.1000 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  2  3  1  0
  1  4  1  0
  3  5  1  0
M  END
> <NAME>
ethanol

"""


def _sdf_coords(text: str) -> list[np.ndarray]:
    """Coordinates of each record (a record starts on the line after "$$$$")."""
    pieces = text.split("$$$$\n")
    out = []
    for record in [r for r in pieces if r.strip()]:
        lines = record.splitlines()
        atoms = lines[4 : 4 + int(lines[3][:3])]
        out.append(np.array([[float(v[0:10]), float(v[10:20]), float(v[20:30])] for v in atoms]))
    return out


def test_points_sdf_keeps_everything_but_the_coordinates(priors, tmp_path) -> None:
    src = tmp_path / "mol.sdf"
    second = MOLFILE.replace("ethanol\n", "\n", 1)  # a record with a blank name line
    src.write_text(MOLFILE + "$$$$\n" + second + "$$$$\n")
    assert run(["points", src, "--prior", priors["molecule"], "--t", 0.5, "--steps", 3]) == 0
    out = tmp_path / "mol_restored.sdf"
    before, after = src.read_text().splitlines(), out.read_text().splitlines()
    assert len(before) == len(after)
    for a, b in zip(before, after):  # only the coordinate columns of atom lines change
        assert a[30:] == b[30:] if a[:1] == " " and len(a) > 30 else a == b
    old, new = _sdf_coords(src.read_text()), _sdf_coords(out.read_text())
    assert len(new) == 2
    for x, y in zip(old, new):
        assert np.abs(y[:3] - x[:3]).max() > 1e-3  # heavy atoms restored
        # each hydrogen moved with its nearest heavy atom (bonded to it)
        for h, heavy in ((3, 0), (4, 2)):
            np.testing.assert_allclose(y[h] - y[heavy], x[h] - x[heavy], atol=2e-4)
    record = json.loads((tmp_path / "mol_restored.sdf.json").read_text())
    assert record["n_atoms"] == [3, 3] and record["sigma_angstrom"] == pytest.approx(1.5)


def test_points_xyz_and_sigma(priors, tmp_path) -> None:
    xyz = np.random.default_rng(0).normal(size=(7, 3)) * 2
    elements = ["C", "C", "N", "O", "S", "C", "H"]
    write_xyz(tmp_path / "m.xyz", xyz, elements, comment="test")
    argv = ["points", tmp_path / "m.xyz", "--prior", priors["molecule"], "--sigma", 1.5]
    assert run([*argv, "--sampler", "one-step", "-o", tmp_path / "a.xyz"]) == 0
    assert run([*argv[:4], "--t", 0.5, "--sampler", "one-step", "-o", tmp_path / "b.xyz"]) == 0
    a, els = read_xyz(tmp_path / "a.xyz")
    b, _ = read_xyz(tmp_path / "b.xyz")
    assert els == elements and np.array_equal(a, b)  # --sigma 1.5 Å is t = 0.5 of 3 Å
    # the centre of mass of the restored heavy atoms is the input's
    np.testing.assert_allclose(a[:6].mean(0), xyz[:6].mean(0), atol=1e-4)
    with pytest.raises(InputError, match="input's format"):
        run([*argv, "-o", tmp_path / "a.pdb"])
    with pytest.raises(InputError, match="exceeds the prior's blur range"):
        run([*argv[:4], "--sigma", 4.0])
    with pytest.raises(InputError, match="heat_restoration prior"):
        run([*argv[:3], priors["sr3_image"], "--t", 0.5])


@pytest.mark.parametrize("fmt", ["pdb", "cif"])
def test_points_calpha_chain_longer_than_the_prior_is_windowed(fmt, priors, tmp_path) -> None:
    n = 15  # the Cα prior holds 6 nodes: windows of 6 with stride 3
    t = np.linspace(0, 4 * np.pi, n)
    ca = np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * t], axis=1)
    pdb = tmp_path / "chain.pdb"
    write_pdb(pdb, ca, residue_names="GLY")
    st = gemmi.read_structure(str(pdb))
    res = st[0][0][0]
    extra = gemmi.Atom()
    extra.name, extra.element, extra.pos = "N", gemmi.Element("N"), gemmi.Position(9, 9, 9)
    res.add_atom(extra)  # a non-Cα atom: not part of the output
    src = tmp_path / f"chain.{fmt}"
    if fmt == "cif":
        st.setup_entities()
        st.make_mmcif_document().write_file(str(src))
    else:
        st.write_pdb(str(src))
    assert run(["points", src, "--prior", priors["calpha"], "--t", 0.8, "--steps", 2]) == 0
    out = gemmi.read_structure(str(tmp_path / f"chain_restored.{fmt}"))
    atoms = [a for ch in out[0] for r in ch for a in r]
    assert [a.name for a in atoms] == ["CA"] * n
    got = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms])
    assert 1e-3 < np.sqrt(((got - ca) ** 2).sum(1).mean()) < 5.0


# ----------------------------------------------------------------------------- maps, images


@pytest.mark.parametrize("kind", ["sr3", "regression"])
def test_map_end_to_end(kind, priors, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(4, 4, 4, generator=g)
    write_map(tmp_path / "low.mrc", Volume(low, 3.0), origin_angstrom=(10.0, -6.0, 0.0))
    args = ["map", tmp_path / "low.mrc", "--prior", priors[f"{kind}_volume"], "--quiet"]
    samples = ["--samples", 2, "--steps", 3] if kind == "sr3" else []
    assert run([*args, *samples, "-o", tmp_path / "high.mrc"]) == 0
    high = read_map(tmp_path / "high.mrc")
    assert high.data.shape == (8, 8, 8) and high.pixel_size == 1.5
    with mrcfile.open(tmp_path / "high.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(1.5)
    # the same physical grid: low index m at high index 2 (m - 2) + 4
    assert read_map_origin(tmp_path / "high.mrc") == pytest.approx((10.0, -6.0, 0.0))
    # --consistency final (default): Fourier cropping of the output gives the input back
    torch.testing.assert_close(fourier_downsample(high.data, 2), low, atol=1e-4, rtol=0)
    assert (tmp_path / "high_std.mrc").is_file() == (kind == "sr3")
    record = json.loads((tmp_path / "high.mrc.json").read_text())
    assert record["factor"] == 2 and record["output_pixel_size"] == 1.5
    with pytest.raises(InputError, match="expects 3 Å/px"):
        write_map(tmp_path / "bad.mrc", Volume(low, 2.0))
        run(["map", tmp_path / "bad.mrc", "--prior", priors[f"{kind}_volume"]])
    with pytest.raises(InputError, match="does not match the input"):
        run([*args, "--factor", 4])
    with pytest.raises(InputError, match="superres images"):
        run(["map", tmp_path / "low.mrc", "--prior", priors[f"{kind}_image"]])


def test_images_end_to_end(priors, tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(3, 2, 2, generator=g)  # factor 4: 2x2 at 6 Å/px -> 8x8 at 1.5 Å/px
    write_stack(tmp_path / "low.mrcs", ImageStack(low, 6.0))
    args = ["images", tmp_path / "low.mrcs", "--quiet", "--steps", 2]
    assert run([*args, "--prior", priors["sr3_image"], "--samples", 2]) == 0
    mean = read_stack(tmp_path / "low_sr.mrcs").read_all()
    std = read_stack(tmp_path / "low_sr_std.mrcs").read_all()
    assert mean.data.shape == (3, 8, 8) and mean.pixel_size == pytest.approx(1.5)
    assert std.pixel_size == pytest.approx(1.5) and float(std.data.min()) >= 0
    torch.testing.assert_close(fourier_downsample(mean.data, 4, ndim=2), low, atol=1e-4, rtol=0)
    # regression: deterministic; a second run gives the same stack
    reg = [*args, "--prior", priors["regression_image"], "--consistency", "none"]
    assert run([*reg, "-o", tmp_path / "r1.mrcs"]) == 0
    assert run([*reg, "-o", tmp_path / "r2.mrcs", "--seed", 5]) == 0
    r1 = read_stack(tmp_path / "r1.mrcs").read_all().data
    assert torch.equal(r1, read_stack(tmp_path / "r2.mrcs").read_all().data)
    with pytest.raises(InputError, match="deterministic"):
        run([*args, "--prior", priors["regression_image"], "--samples", 2])
    with pytest.raises(InputError, match="superres map"):
        run([*args, "--prior", priors["sr3_volume"]])


def test_shipped_residual_map_prior_adds_detail_and_keeps_the_input(tmp_path) -> None:
    """The shipped residual SR3 map prior, by name: 8³ at 12 Å/px -> 32³ at 3 Å/px; the
    output's low frequencies are the input's and it has detail the input lacks."""
    g = torch.Generator().manual_seed(2)
    # a compact cluster of 12 Gaussian "atom groups", σ = 1.5 px (4.5 Å)
    blobs = gaussian_blobs(6 * torch.randn(12, 3, generator=g), 1.5, 32, dtype=torch.float32)
    low = fourier_downsample(0.05 * blobs, 4)
    write_map(tmp_path / "low.mrc", Volume(low, 12.0))
    argv = ["map", tmp_path / "low.mrc", "--prior", "sr3_maps_residual", "--samples", 1]
    assert run([*argv, "--steps", 4, "--quiet", "-o", tmp_path / "high.mrc"]) == 0
    high = read_map(tmp_path / "high.mrc")
    assert high.data.shape == (32, 32, 32) and high.pixel_size == pytest.approx(3.0)
    assert torch.isfinite(high.data).all()
    torch.testing.assert_close(fourier_downsample(high.data, 4), low, atol=1e-4, rtol=0)
    detail = high.data - fourier_upsample(low, 4)
    assert float(detail.norm()) > 0.01 * float(high.data.norm())
