"""The masked FSC corrected by phase randomisation (Chen et al. 2013)."""

from __future__ import annotations

import numpy as np
import torch

from cryoprior.geometry.grids import shell_indices
from cryoprior.metrics import fsc, spherical_mask
from cryoprior.metrics.fsc_corrected import corrected_fsc, randomise_phases
from cryoprior.solvers.halfmap import shell_filter

D, PX = 32, 2.0


def shell_power(v: torch.Tensor) -> torch.Tensor:
    f = torch.fft.fftshift(torch.fft.fftn(v)).abs() ** 2
    return torch.zeros(D // 2 + 2, dtype=torch.float64).index_add_(
        0, shell_indices((D,) * 3).reshape(-1).clamp(max=D // 2 + 1), f.reshape(-1)
    )


def test_randomised_phases_keep_amplitudes_and_low_shells():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    r = randomise_phases(v, 5, seed=1)
    assert r.dtype == torch.float64 and r.shape == v.shape
    torch.testing.assert_close(shell_power(r), shell_power(v), rtol=1e-8, atol=1e-6)
    low = (torch.arange(D) <= 5).double()
    torch.testing.assert_close(shell_filter(r, low), shell_filter(v, low), rtol=0, atol=1e-9)
    high = fsc(r, v, PX).fsc[7:]
    assert np.abs(high).max() < 0.2  # the phases beyond are new


def test_identical_maps_stay_at_one():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    mask = spherical_mask((D,) * 3, 10, 3, dtype=torch.float64)
    c = corrected_fsc(v, v, PX, mask, randomise_from=4)
    np.testing.assert_allclose(c.fsc, 1.0, atol=1e-9)


def test_correction_removes_the_masks_leak_of_a_common_blob():
    # two halves: a common, large, smooth blob cut by the mask, plus independent noise at
    # every frequency: the plain masked FSC is raised far beyond the blob's band by the
    # mask's leak; the corrected one falls to ~0 there
    g = torch.Generator().manual_seed(2)
    low = (torch.arange(D) <= 3).double()  # band-limited: no content beyond shell 3
    blob = shell_filter(torch.randn(D, D, D, generator=g, dtype=torch.float64), low)
    blob = 5.0 * blob / blob.std()
    h1 = blob + torch.randn(D, D, D, generator=g, dtype=torch.float64)
    h2 = blob + torch.randn(D, D, D, generator=g, dtype=torch.float64)
    mask = spherical_mask((D,) * 3, 9, 2, dtype=torch.float64)
    plain = fsc(h1, h2, PX, mask=mask)
    corrected = corrected_fsc(h1, h2, PX, mask, randomise_from=3)
    assert plain.fsc[6:12].mean() > 0.7  # the leak
    assert plain.resolution_0143 < D * PX / 12  # read as detail that is not there
    assert np.abs(corrected.fsc[6:]).mean() < 0.15
    assert corrected.resolution_0143 >= D * PX / 6
    np.testing.assert_allclose(corrected.fsc[:4], plain.fsc[:4])  # unchanged up to s_r
