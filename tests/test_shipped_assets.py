"""The assets shipped inside the package load and work."""

from __future__ import annotations

from importlib.resources import files

import torch

from cryoprior.priors import load_prior


def test_shipped_mnist_prior_loads_and_samples():
    prior = load_prior(files("cryoprior") / "assets" / "priors" / "mnist")
    meta = prior.metadata
    assert meta.representation == "image"
    assert tuple(meta.shape) == (1, 28, 28)
    assert meta.data["split"]  # the training split is recorded
    x = prior.sample(2, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


def test_shipped_volume_prior_loads_and_checks_compatibility():
    import pytest

    from cryoprior.core.errors import InputError

    prior = load_prior(files("cryoprior") / "assets" / "priors" / "volume_32")
    assert prior.metadata.representation == "volume"
    assert tuple(prior.metadata.shape) == (1, 32, 32, 32)
    prior.check_compatible(box=32, pixel_size=3.0)
    with pytest.raises(InputError):
        prior.check_compatible(box=32, pixel_size=1.5)
    assert "1fki_A" in prior.metadata.data["split"]["test"]
    assert "1fki_A" not in prior.metadata.data["split"]["train"]
