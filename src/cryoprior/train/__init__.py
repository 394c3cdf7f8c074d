"""Layer 9: one trainer for every prior (EMA, checkpoints, exact resume, logging, DDP) and
the declarative run config of ``cryoprior train``."""

from cryoprior.train.config import (
    DATA_KINDS,
    PriorData,
    TrainConfig,
    build_data,
    load_run_config,
    register_data_kind,
    resolve_config,
)
from cryoprior.train.ema import EMA
from cryoprior.train.trainer import (
    FitSummary,
    Trainer,
    TrainRun,
    lr_factor,
    make_dsm_loss,
    train_prior,
)

__all__ = [
    "DATA_KINDS",
    "EMA",
    "FitSummary",
    "PriorData",
    "TrainConfig",
    "TrainRun",
    "Trainer",
    "build_data",
    "load_run_config",
    "lr_factor",
    "make_dsm_loss",
    "register_data_kind",
    "resolve_config",
    "train_prior",
]
