"""Training objectives: config, tiny end-to-end runs, prior files that record the objective,
and the physical-unit wrappers (heat restoration in Å, super-resolution with consistency)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from cryoprior.core.errors import InputError
from cryoprior.data.molecules import (
    ELEMENTS,
    Conformer,
    ConformerDataset,
    bonded_pairs,
    select_ccd_conformers,
)
from cryoprior.diffusion import CosineSchedule, Denoiser
from cryoprior.geometry.rotations import random_rotations
from cryoprior.metrics.structure import kabsch_rmsd
from cryoprior.networks import EGNN, UNet
from cryoprior.physics.degrade import fourier_downsample
from cryoprior.physics.heat_kernel import HeatKernelProcess
from cryoprior.priors import (
    NetworkPrior,
    Prior,
    PriorMetadata,
    load_prior,
    read_prior_metadata,
    save_prior,
)
from cryoprior.train.config import (
    OBJECTIVE_DEFAULTS,
    complete_network_config,
    complete_objective,
    resolve_config,
    resolve_objective,
    synthetic_chains,
    synthetic_gaussian_images,
)
from cryoprior.train.objectives import (
    PointRestorer,
    check_superres_input,
    heat_process,
    make_loss,
    sr_degrade,
    super_resolve,
)
from cryoprior.train.trainer import train_prior

HAVE_BIOTITE = importlib.util.find_spec("biotite") is not None


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TRAIN = dict(
    steps=4,
    batch_size=4,
    lr=2e-3,
    warmup_steps=1,
    log_every=2,
    val_every=4,
    ckpt_every=2,
    threads=1,
    device="cpu",
    progress=False,
)
SMALL_UNET = {"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "groups": 4}
CONFIGS = {
    "heat_restoration": {
        "data": {"kind": "synthetic-chains", "n_train": 8, "n_val": 4, "max_nodes": 8},
        "network": {"name": "egnn", "hidden_features": 8, "num_layers": 2},
        "objective": {"kind": "heat_restoration", "max_radius": 6.0},
    },
    "sr3": {
        "data": {"kind": "synthetic-gaussian-images", "n_train": 8, "n_val": 4, "size": 8},
        "network": SMALL_UNET,
        "objective": {"kind": "sr3", "factors": [2, 4]},
    },
    "regression": {
        "data": {"kind": "synthetic-gaussian-volumes", "n_train": 8, "n_val": 4, "size": 8},
        "network": SMALL_UNET,
        "objective": {"kind": "regression", "factors": 2, "residual": True},
    },
    "denoising": {
        "data": {"kind": "synthetic-gaussian-images", "n_train": 8, "n_val": 0, "size": 8},
        "network": SMALL_UNET,
    },
}


# ----------------------------------------------------------------------------- config


def test_objective_section_defaults_and_errors() -> None:
    assert resolve_objective({}) == {"kind": "denoising"}
    obj = resolve_objective({"kind": "sr3", "factors": 4})
    assert obj["factors"] == [4] and obj["upsample"] == "fourier" and obj["blur"] is None
    assert set(obj) == {"kind", *OBJECTIVE_DEFAULTS["sr3"]}
    heat = resolve_objective({"kind": "heat_restoration", "max_radius": 2})
    assert heat["max_radius"] == 2 and heat["process"] == "gaussian"
    with pytest.raises(InputError, match="unknown objective.kind"):
        resolve_objective({"kind": "superres"})
    assert resolve_objective({"kind": "sr3", "residual": True})["residual"] is True
    with pytest.raises(InputError, match="residual"):
        resolve_objective({"kind": "sr3", "residual": "yes"})
    with pytest.raises(InputError, match="factors"):
        resolve_objective({"kind": "sr3", "factors": [1]})
    with pytest.raises(InputError, match="max_radius"):
        resolve_objective({"kind": "heat_restoration", "max_radius": 0})
    with pytest.raises(InputError, match="blur"):
        resolve_objective({"kind": "regression", "blur": "half"})
    # a config without [objective] trains the denoising prior, as before
    cfg = resolve_config({"data": {"kind": "synthetic-chains"}, "network": {"name": "egnn"}})
    assert cfg["objective"] == {"kind": "denoising"}


def test_objective_completion_against_the_data() -> None:
    chains = synthetic_chains(0, n_train=4, n_val=0, max_nodes=6)
    images = synthetic_gaussian_images(0, n_train=4, n_val=0, size=12)
    heat = complete_objective(resolve_objective({"kind": "heat_restoration"}), chains)
    assert heat["node_features"] == "none"
    with pytest.raises(InputError, match="elements"):
        complete_objective(
            resolve_objective({"kind": "heat_restoration", "node_features": "elements"}), chains
        )
    with pytest.raises(InputError, match="point-cloud"):
        complete_objective(resolve_objective({"kind": "heat_restoration"}), images)
    with pytest.raises(InputError, match="size-12 axis cannot be downsampled by 8"):
        complete_objective(resolve_objective({"kind": "sr3", "factors": [2, 8]}), images)
    sr3 = complete_objective(resolve_objective({"kind": "sr3"}), images)
    net = complete_network_config({"name": "unet"}, images, sr3)
    assert net["cond_channels"] == 1 and net["n_extra_scalars"] == 2
    net = complete_network_config(
        {"name": "unet"}, images, resolve_objective({"kind": "regression"})
    )
    assert "cond_channels" not in net and net["n_extra_scalars"] == 2
    with pytest.raises(InputError, match='needs network.name = "egnn"'):
        complete_network_config({"name": "mlp"}, chains, heat)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["heat_restoration", "sr3", "regression", "denoising"])
def test_train_save_load_and_resume(kind, tmp_path) -> None:
    cfg = {**CONFIGS[kind], "train": TRAIN}
    run = train_prior(cfg, tmp_path / "run", command="pytest")
    record = json.loads((run.prior_dir / "prior.json").read_text())
    assert record["objective"]["kind"] == kind
    assert record["format_version"] == (1 if kind == "denoising" else 2)
    prior = load_prior(run.prior_dir)
    assert isinstance(prior, Prior if kind in ("sr3", "denoising") else NetworkPrior)
    assert prior.metadata.objective_kind == kind
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["objective"]["kind"] == kind
    if kind == "heat_restoration":
        assert record["objective"]["atoms"] == "calpha" and record["diffusion"] == {}
        assert record["network"]["in_node_features"] == 0
    if kind == "sr3":
        assert record["network"]["cond_channels"] == 1 and record["diffusion"]["schedule"]
        # a run saved before objective.residual existed resumes with its default (False)
        path = tmp_path / "run" / "config.json"
        old = json.loads(path.read_text())
        del old["config"]["objective"]["residual"]
        path.write_text(json.dumps(old))
    # the same config resumes; a different objective does not
    more = {**cfg, "train": {**TRAIN, "steps": 6}}
    assert train_prior(more, tmp_path / "run", resume=True, command="pytest").summary.step == 6
    if kind != "denoising":
        other = {**more, "objective": {**cfg["objective"], "noise_std": 0.5}}
        with pytest.raises(InputError, match="objective.noise_std"):
            train_prior(other, tmp_path / "run", resume=True, command="pytest")


def test_old_runs_and_old_prior_files_read_as_denoising(tmp_path) -> None:
    cfg = {**CONFIGS["denoising"], "train": TRAIN}
    run = train_prior(cfg, tmp_path / "run", command="pytest")
    # a run folder written before [objective] existed still resumes
    path = tmp_path / "run" / "config.json"
    record = json.loads(path.read_text())
    del record["config"]["objective"]
    path.write_text(json.dumps(record))
    more = {**cfg, "train": {**TRAIN, "steps": 6}}
    assert train_prior(more, tmp_path / "run", resume=True, command="pytest").resumed
    # a prior file without "objective" (format 1) loads as a denoising prior
    meta_path = run.prior_dir / "prior.json"
    meta = json.loads(meta_path.read_text())
    del meta["objective"]
    meta_path.write_text(json.dumps(meta))
    prior = load_prior(run.prior_dir)
    assert isinstance(prior, Prior) and prior.metadata.objective_kind == "denoising"
    assert prior.sample(1, steps=2, generator=torch.Generator().manual_seed(0)).shape == (
        1,
        1,
        8,
        8,
    )


def test_metadata_checks_the_objective() -> None:
    with pytest.raises(InputError, match="must represent points"):
        PriorMetadata("image", (1, 8, 8), pixel_size=1.0, objective={"kind": "heat_restoration"})
    with pytest.raises(InputError, match="objective must be one of"):
        PriorMetadata("image", (1, 8, 8), pixel_size=1.0, objective={"kind": "magic"})


def test_non_denoising_priors_refuse_unconditional_sampling(tmp_path) -> None:
    net = EGNN(hidden_features=8, num_layers=1, checkpoint=False)
    meta = PriorMetadata("points", (5, 3), objective={"kind": "heat_restoration"})
    folder = save_prior(tmp_path / "p", net, meta)
    assert read_prior_metadata(folder).objective_kind == "heat_restoration"
    prior = load_prior(folder)
    with pytest.raises(InputError, match="superres points"):
        prior.sample(2)
    with pytest.raises(InputError, match="not a denoising prior"):
        prior.denoiser  # noqa: B018
    unet = UNet(2, 1, 1, base_channels=8, channel_mults=(1, 2), groups=4, cond_channels=1)
    sr3 = PriorMetadata("image", (1, 8, 8), pixel_size=1.0, objective={"kind": "sr3"})
    folder = save_prior(tmp_path / "s", Denoiser(unet, CosineSchedule()), sr3)
    with pytest.raises(InputError, match="superres images"):
        load_prior(folder).sample(1)


# ----------------------------------------------------------------------------- heat restoration


def test_heat_loss_works_in_network_units() -> None:
    """The process in network units is the Å process scaled: D(x/s; σ/s) = D(x; σ)/s."""
    obj = resolve_objective({"kind": "heat_restoration", "max_radius": 4.0})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64) * 4.0
    s = 2.5
    t = torch.tensor([0.4, 0.9], dtype=torch.float64)
    ang = heat_process(obj).degrade(x, t)
    net = heat_process(obj, s).degrade(x / s, t)
    torch.testing.assert_close(net * s, ang)
    semi = {**obj, "process": "semigroup", "length_scale": 3.0}
    torch.testing.assert_close(
        heat_process(semi, s).degrade(x / s, t) * s, heat_process(semi).degrade(x, t)
    )
    # the trainer's loss: a restorer returning X0 itself scores 0
    data = synthetic_chains(0, n_train=4, n_val=0, max_nodes=7)
    loss_fn = make_loss(complete_objective(obj, data), {}, data)
    batch = {k: torch.stack([data.train[i][k] for i in range(4)]) for k in ("x", "mask")}

    def oracle(x_t, t, mask, h=None):
        return batch["x"]

    assert float(loss_fn(oracle, batch, torch.Generator().manual_seed(1))) < 1e-10


def _heat_prior(tmp_path, elements: bool = True) -> NetworkPrior:
    torch.manual_seed(0)
    net = EGNN(
        hidden_features=8,
        num_layers=2,
        in_node_features=len(ELEMENTS) if elements else 0,
        checkpoint=False,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    objective = {
        **resolve_objective({"kind": "heat_restoration", "max_radius": 3.0}),
        "node_features": "elements" if elements else "none",
        "atoms": "heavy" if elements else "calpha",
        "elements": list(ELEMENTS),
    }
    meta = PriorMetadata(
        "points", (12, 3), normalisation={"scale": 2.0, "offset": 0.0}, objective=objective
    )
    return load_prior(save_prior(tmp_path / "heat", net, meta))  # type: ignore[return-value]


@pytest.mark.parametrize("sampler", ["one-step", "naive", "improved"])
def test_point_restoration_pipeline_is_equivariant(sampler, tmp_path) -> None:
    restorer = PointRestorer(_heat_prior(tmp_path))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 10, 3, generator=g, dtype=torch.float64) * 2.0
    mask = torch.ones(2, 10, dtype=torch.float64)
    mask[1, 7:] = 0
    x0 = x0 * mask[..., None]
    els = [["C"] * 6 + ["N", "O", "S", "CL"], ["C", "C", "O", "N", "C", "C", "P"]]
    xt = restorer.process.degrade(x0, 0.6, mask)
    out = restorer.restore(xt, 0.6, mask, els, sampler, steps=4)
    R = random_rotations(1, g, torch.float64)[0]
    shift = torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64)
    moved = (xt @ R.T + shift) * mask[..., None]
    out2 = restorer.restore(moved, 0.6, mask, els, sampler, steps=4)
    torch.testing.assert_close(out2, (out @ R.T + shift) * mask[..., None], atol=2e-4, rtol=0)
    assert float(out[1, 7:].abs().max()) == 0.0
    # the restorer changes the cloud (it is not the identity) and keeps its COM
    assert float((out - xt).abs().max()) > 1e-3
    com = lambda y: (y * mask[..., None]).sum(1) / mask.sum(1)[:, None]  # noqa: E731
    torch.testing.assert_close(com(out), com(xt))


def test_point_restorer_refuses_wrong_inputs(tmp_path) -> None:
    restorer = PointRestorer(_heat_prior(tmp_path))
    x = torch.zeros(1, 13, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="up to 12 points"):
        restorer.restore(x, 0.5, elements=[["C"] * 13])
    with pytest.raises(InputError, match="elements"):
        restorer.restore(x[:, :5], 0.5)


# ----------------------------------------------------------------------------- super-resolution


def _sr_prior(tmp_path, kind: str, ndim: int = 2) -> Prior | NetworkPrior:
    torch.manual_seed(0)
    net = UNet(
        ndim,
        1,
        1,
        base_channels=8,
        channel_mults=(1, 2),
        groups=4,
        cond_channels=1 if kind == "sr3" else 0,
        n_extra_scalars=2,
    )
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
    objective = resolve_objective({"kind": kind, "factors": [2, 4]})
    shape = (1, *(8,) * ndim)
    meta = PriorMetadata(
        "image" if ndim == 2 else "volume",
        shape,
        pixel_size=1.5,
        normalisation={"scale": 2.0, "offset": 0.3},
        objective=objective,
    )
    model = Denoiser(net, CosineSchedule(), "v") if kind == "sr3" else net
    return load_prior(save_prior(tmp_path / kind, model, meta))


@pytest.mark.parametrize("kind", ["sr3", "regression"])
@pytest.mark.parametrize("factor", [2, 4])
def test_super_resolution_consistency_reproduces_the_input(kind, factor, tmp_path) -> None:
    prior = _sr_prior(tmp_path, kind)
    g = torch.Generator().manual_seed(4)
    low = torch.randn(8 // factor, 8 // factor, generator=g)
    kw = dict(n_samples=2, steps=3) if kind == "sr3" else {}
    loose = super_resolve(prior, low, 1.5 * factor, generator=g, **kw)
    tight = super_resolve(prior, low, 1.5 * factor, generator=g, data_consistency="final", **kw)
    assert tight.mean.shape == (8, 8) and tight.pixel_size == 1.5
    torch.testing.assert_close(fourier_downsample(tight.mean, factor), low, atol=1e-5, rtol=0)
    assert float((fourier_downsample(loose.mean, factor) - low).abs().max()) > 1e-3
    if kind == "sr3":
        assert tight.samples.shape == (2, 8, 8) and float(tight.std.max()) > 0


def test_super_resolution_checks_box_factor_and_pixel_size(tmp_path) -> None:
    prior = _sr_prior(tmp_path, "regression", ndim=3)
    assert check_superres_input(prior, (4, 4, 4), 3.0) == 2.0
    assert check_superres_input(prior, (2, 2, 2), 6.0, factor=4) == 4.0
    with pytest.raises(InputError, match="expects 3 Å/px"):
        check_superres_input(prior, (4, 4, 4), 2.0)
    with pytest.raises(InputError, match="does not match the input"):
        check_superres_input(prior, (4, 4, 4), 3.0, factor=4)
    with pytest.raises(InputError, match="crop, pad or resample"):
        check_superres_input(prior, (4, 4, 2), 3.0)
    with pytest.raises(InputError, match="trained for factors 2, 4, not 8"):
        check_superres_input(prior, (1, 1, 1), 12.0)
    with pytest.raises(InputError, match="3-D maps"):
        check_superres_input(prior, (4, 4), 3.0)


def test_sr_degrade_matches_training_pairs() -> None:
    obj = resolve_objective({"kind": "sr3", "blur": "nyquist", "noise_std": 0.0})
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    low = sr_degrade(obj, x, 1.5, 2, ndim=2)
    assert low.data.shape == (2, 1, 4, 4) and low.pixel_size == 3.0
    sharp = sr_degrade(resolve_objective({"kind": "sr3"}), x, 1.5, 2, ndim=2)
    torch.testing.assert_close(sharp.data, fourier_downsample(x, 2, ndim=2))
    # the blur to the low-resolution Nyquist (6 Å) damps the kept frequencies
    assert float(low.data.std()) < float(sharp.data.std())
    noisy = sr_degrade({**obj, "noise_std": 0.5}, x, 1.5, 2, 2, torch.Generator(), noise_scale=2.0)
    assert 0.5 < float((noisy.data - low.data).std()) < 1.6  # σ = 0.5 · 2 = 1


# ----------------------------------------------------------------------------- molecules


def test_bonded_pairs_and_trimmed_batches() -> None:
    # ethanol heavy atoms: C-C 1.52 Å, C-O 1.43 Å, the O...C distance 2.4 Å is no bond
    xyz = np.array([[0.0, 0, 0], [1.52, 0, 0], [2.0, 1.35, 0]])
    assert bonded_pairs(xyz, ["C", "C", "O"]).tolist() == [[0, 1], [1, 2]]
    small = Conformer("A", xyz - xyz.mean(0), ("C", "C", "O"))
    big = Conformer("B", np.random.default_rng(0).normal(size=(5, 3)), ("C",) * 5)
    ds = ConformerDataset([small, big], max_atoms=9, seed=1)
    batch = ds.collate([ds[0], ds[0]])
    assert batch["x"].shape == (2, 3, 3) and batch["types"].shape == (2, 3)
    assert ds.collate([ds[0], ds[1]])["mask"].shape == (2, 5)


@pytest.mark.skipif(not HAVE_BIOTITE, reason="biotite not installed")
def test_ccd_selection_is_stable_and_split_by_molecule() -> None:
    names = ["ATP", "HEM", "NAG", "BEN", "GOL", "IMD", "SAM", "FAD", "PLP", "TRP", "ZN", "EDO"]
    a = select_ccd_conformers({"train": 3, "validation": 1, "test": 1}, names=names)
    b = select_ccd_conformers({"train": 3, "validation": 1, "test": 1}, names=names)
    assert {s: [c.name for c in v] for s, v in a.items()} == {
        s: [c.name for c in v] for s, v in b.items()
    }
    chosen = [c.name for v in a.values() for c in v]
    assert len(chosen) == len(set(chosen)) and "HEM" not in chosen and "ZN" not in chosen
    assert all(set(c.elements) <= set(ELEMENTS[:-1]) for v in a.values() for c in v)


@pytest.mark.skipif(not HAVE_BIOTITE, reason="biotite not installed")
def test_molecule_data_kind_records_its_split(tmp_path) -> None:
    cfg = {
        "data": {"kind": "molecules", "n_train": 4, "n_val": 2, "n_test": 2, "max_atoms": 16},
        "network": {"name": "egnn", "hidden_features": 8, "num_layers": 1},
        "objective": {"kind": "heat_restoration", "max_radius": 3.0},
        "train": {**TRAIN, "steps": 2, "val_every": 2},
    }
    run = train_prior(cfg, tmp_path / "mol", command="pytest")
    meta = read_prior_metadata(run.prior_dir)
    split = meta.data["split"]
    assert [len(split[s]) for s in ("train", "validation", "test")] == [4, 2, 2]
    assert not set(split["train"]) & (set(split["validation"]) | set(split["test"]))
    assert meta.objective["node_features"] == "elements" and meta.objective["atoms"] == "heavy"
    assert meta.network["in_node_features"] == len(ELEMENTS)
    assert math.isclose(meta.normalisation["scale"], meta.data["summary"]["scale"])


def test_blurred_rmsd_grows_with_t() -> None:
    """Sanity of the forward process the objective trains on (σ = 3 Å · t, Å units)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 3, generator=g, dtype=torch.float64) * 2.5
    p = HeatKernelProcess(3.0)
    r = [float(kabsch_rmsd(p.degrade(x, t)[0], x[0])) for t in (0.25, 0.5, 1.0)]
    assert r[0] < r[1] < r[2]
