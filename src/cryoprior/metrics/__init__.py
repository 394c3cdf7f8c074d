"""cryoprior.metrics: FSC/FRC and resolution, correlation, structure and image metrics."""

from cryoprior.metrics.calibration import expected_coverage, spread_calibration
from cryoprior.metrics.correlation import masked_correlation
from cryoprior.metrics.fsc import (
    FSCResult,
    cone_fsc,
    cone_mask,
    fsc,
    plot_fsc,
    resolution_from_curve,
    spherical_mask,
)
from cryoprior.metrics.images import psnr, rotation_invariant_error, ssim
from cryoprior.metrics.structure import kabsch_rmsd, radius_of_gyration, rmsd

__all__ = [
    "FSCResult",
    "cone_fsc",
    "cone_mask",
    "expected_coverage",
    "fsc",
    "kabsch_rmsd",
    "masked_correlation",
    "plot_fsc",
    "psnr",
    "radius_of_gyration",
    "resolution_from_curve",
    "rmsd",
    "rotation_invariant_error",
    "spherical_mask",
    "spread_calibration",
    "ssim",
]
