"""Layer 7: trained priors: denoiser + normalisation + physical metadata, saved as
safetensors weights and JSON (never pickle)."""

from cryoprior.priors.io import (
    load_prior,
    read_prior_metadata,
    resolve_prior,
    save_prior,
    shipped_priors,
)
from cryoprior.priors.prior import (
    DIFFUSION_OBJECTIVES,
    OBJECTIVES,
    NetworkPrior,
    Prior,
    PriorMetadata,
    build_denoiser,
    denoiser_config,
)

__all__ = [
    "DIFFUSION_OBJECTIVES",
    "OBJECTIVES",
    "NetworkPrior",
    "Prior",
    "PriorMetadata",
    "build_denoiser",
    "denoiser_config",
    "load_prior",
    "read_prior_metadata",
    "resolve_prior",
    "save_prior",
    "shipped_priors",
]
