"""Rank-agnostic diffusion engine: noise schedules, the denoiser contract, DSM losses,
samplers and zero-centre-of-mass helpers for point clouds.

Works unchanged for images (B,C,H,W), volumes (B,C,D,H,W) and point clouds (B,N,D) with an
optional node mask (B,N).
"""

from cryoprior.diffusion.denoiser import (
    AnalyticGaussianDenoiser,
    AnalyticGMMDenoiser,
    Denoiser,
    DenoiserLike,
    DenoiserOutput,
    per_sample_time,
    v_from_x0_eps,
    x0_eps_from_prediction,
)
from cryoprior.diffusion.losses import dsm_loss, loss_weight, per_sample_mean, sample_time
from cryoprior.diffusion.pointcloud import (
    assert_zero_com,
    draw_noise,
    remove_mean,
    sample_zero_com_noise,
)
from cryoprior.diffusion.samplers import (
    SAMPLERS,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    langevin_step,
    ode_sample,
    pc_sample,
    pf_ode_drift,
    pf_ode_step,
    reverse_diffusion_step,
    reverse_sde_sample,
    reverse_sde_step,
)
from cryoprior.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    NoiseSchedule,
    Polynomial2Schedule,
    VESchedule,
    make_schedule,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "AnalyticGMMDenoiser",
    "AnalyticGaussianDenoiser",
    "CosineSchedule",
    "Denoiser",
    "DenoiserLike",
    "DenoiserOutput",
    "LinearSchedule",
    "NoiseSchedule",
    "Polynomial2Schedule",
    "VESchedule",
    "assert_zero_com",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "draw_noise",
    "dsm_loss",
    "langevin_step",
    "loss_weight",
    "make_schedule",
    "ode_sample",
    "pc_sample",
    "per_sample_mean",
    "per_sample_time",
    "pf_ode_drift",
    "pf_ode_step",
    "remove_mean",
    "reverse_diffusion_step",
    "reverse_sde_sample",
    "reverse_sde_step",
    "sample_time",
    "sample_zero_com_noise",
    "v_from_x0_eps",
    "x0_eps_from_prediction",
]
