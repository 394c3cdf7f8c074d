"""One trainer for every prior: AdamW, warm-up + cosine LR, clipping, EMA, validation,
atomic checkpoints with exact resume, metrics log, loss curve, single process or DDP.

The trainer knows nothing about diffusion: it minimises ``loss_fn(model, batch, generator)``
(a per-sample loss of shape (B,) or a scalar; the mean is minimised) over an indexable
dataset. A diffusion prior passes a denoising-score-matching loss; any other model works
the same way.

Determinism. Every random choice comes from a seed: the epoch permutation from
``(seed, epoch)``, the loss's noise from the trainer's own ``torch.Generator``, the global
torch / NumPy / Python generators from ``(seed, rank)``. A checkpoint stores the model, the
EMA, the optimiser and LR-scheduler state, the step, the data position and every random
generator's state (of every process under DDP), so a run killed and resumed from its last
checkpoint reaches the same weights as one that was never interrupted (pinned by
tests/test_trainer.py on CPU).

Files (written by rank 0 only, each atomically)::

    out_dir/checkpoints/last.pt   resume state (torch.save; loaded with weights_only=True)
    out_dir/metrics.jsonl         one JSON record per log/validation step
    out_dir/loss.png              train and validation loss against step
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from cryoprior import __version__
from cryoprior.core.errors import InputError
from cryoprior.core.files import atomic_path, write_text_atomic
from cryoprior.core.runtime import progress, seed_everything, set_threads
from cryoprior.networks import build_network, network_config
from cryoprior.priors import DIFFUSION_OBJECTIVES, PriorMetadata, save_prior
from cryoprior.train import distributed as ddp
from cryoprior.train.config import (
    OBJECTIVE_DEFAULTS,
    TrainConfig,
    build_data,
    command_line,
    complete_network_config,
    complete_objective,
    config_differences,
    resolve_config,
    save_run_config,
)
from cryoprior.train.ema import EMA
from cryoprior.train.objectives import (
    build_model,
    make_dsm_loss,  # noqa: F401  (re-exported: it used to live here)
    make_loss,
    objective_metadata,
    trained_network,
)
from cryoprior.train.plots import plot_loss_curve, read_metrics

LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]

CHECKPOINT_FORMAT = "cryoprior-checkpoint"
CHECKPOINT_VERSION = 1

# Tags that make the derived seeds of different random streams independent.
_TAG_PERMUTATION, _TAG_NOISE, _TAG_VALIDATION, _TAG_GLOBAL, _TAG_LOADER = 1, 2, 3, 4, 5


def derive_seed(seed: int, *tags: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``tags`` (NumPy SeedSequence), so that
    streams for different purposes, epochs and ranks are independent and reproducible."""
    entropy = [int(seed) % 2**64, *(int(t) % 2**64 for t in tags)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a
    half cosine from 1 down to ``min_lr_ratio`` at ``total_steps`` (SGDR, Loshchilov & Hutter
    2017, eq. 5, one cycle): ``r + (1 - r) (1 + cos(π p)) / 2`` with
    ``p = (step - warmup) / (total - warmup)``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (inside dicts, lists and tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


@dataclass(frozen=True)
class FitSummary:
    """What :meth:`Trainer.fit` returns: final step, last losses and wall time (s)."""

    step: int
    train_loss: float | None
    val_loss: float | None
    elapsed: float


class _LossModule(nn.Module):
    """``model`` plus the loss: DDP wraps this so that ``loss_fn`` receives the model
    itself (all its attributes) while the forward pass still runs inside DDP."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        return self.loss_fn(self.model, batch, generator)


class Trainer:
    """Train ``model`` by minimising the mean of ``loss_fn(model, batch, generator)``.

    Parameters
    ----------
    model:
        the module to train (e.g. a :class:`cryoprior.diffusion` denoiser). Seed before
        building it: its initial weights are the caller's.
    loss_fn:
        ``(model, batch, generator) -> Tensor`` of shape (B,) or a scalar. ``batch`` is the
        collated batch on the training device; ``generator`` is the trainer's own generator
        (on the training device) and must be the only source of randomness in the loss.
    train_set, val_set:
        indexable datasets (``len`` and ``[i]``). Items are collated with the dataset's
        ``collate`` attribute when it has one (e.g. padded point clouds), else
        ``torch.utils.data.default_collate``.
    config:
        :class:`TrainConfig`.
    out_dir:
        run folder for checkpoints, metrics and the loss curve.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_set: Any,
        val_set: Any | None = None,
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike = "run",
    ) -> None:
        self.config = config if config is not None else TrainConfig()
        self.config.validate()
        cfg = self.config
        self.out_dir = Path(out_dir)
        self.loss_fn = loss_fn
        self.train_set = train_set
        self.val_set = val_set
        set_threads(cfg.threads)

        env = ddp.detect()
        self.device = ddp.training_device(cfg.device, env)
        self.env = ddp.setup(self.device)
        if cfg.batch_size % self.env.world_size != 0:
            raise InputError(
                f"train.batch_size ({cfg.batch_size}) must be a multiple of the number of "
                f"processes ({self.env.world_size})"
            )
        self.local_batch_size = cfg.batch_size // self.env.world_size
        self.n_train = _length(train_set, "training set")
        self.batches_per_epoch = (self.n_train // self.env.world_size) // self.local_batch_size
        if self.batches_per_epoch < 1:
            raise InputError(
                f"the training set has {self.n_train} items, fewer than train.batch_size "
                f"({cfg.batch_size}); lower the batch size or add data"
            )
        if val_set is not None:
            _length(val_set, "validation set")

        seed_everything(derive_seed(cfg.seed, _TAG_GLOBAL, self.env.rank))
        self.model = model.to(self.device)
        self._train_module = ddp.wrap_model(_LossModule(self.model, loss_fn), self.env, self.device)
        # After wrapping: DDP has broadcast rank 0's weights, so every EMA starts equal.
        self.ema = EMA(self.model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio),
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed(cfg.seed, _TAG_NOISE, self.env.rank))
        self.step = 0
        self._elapsed_before = 0.0
        self.last_train_loss: float | None = None
        self.last_val_loss: float | None = None

    # ------------------------------------------------------------------ paths and state

    @property
    def checkpoint_path(self) -> Path:
        """Where the latest checkpoint lives: ``out_dir/checkpoints/last.pt``."""
        return self.out_dir / "checkpoints" / "last.pt"

    @property
    def metrics_path(self) -> Path:
        """The metrics log: ``out_dir/metrics.jsonl``."""
        return self.out_dir / "metrics.jsonl"

    @property
    def plot_path(self) -> Path:
        """The loss curve: ``out_dir/loss.png``."""
        return self.out_dir / "loss.png"

    @property
    def ema_model(self) -> nn.Module:
        """The EMA copy of the model (what validation uses and a prior should save)."""
        return self.ema.model

    # ------------------------------------------------------------------ data

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches (lists of item indices) for ``epoch``.

        Every process draws the same permutation from ``(seed, epoch)`` and keeps its share
        (:func:`~cryoprior.train.distributed.shard`); the incomplete last batch is dropped.
        """
        g = torch.Generator()
        g.manual_seed(derive_seed(self.config.seed, _TAG_PERMUTATION, epoch))
        mine = ddp.shard(torch.randperm(self.n_train, generator=g).tolist(), self.env)
        b = self.local_batch_size
        return [mine[i * b : (i + 1) * b] for i in range(self.batches_per_epoch)]

    def _load_batches(self, dataset: Any, batches: Sequence[Sequence[int]], tag: int) -> Iterator:
        collate = getattr(dataset, "collate", None) or default_collate
        workers = self.config.num_workers
        if workers == 0:
            for idx in batches:
                yield collate([dataset[i] for i in idx])
            return
        g = torch.Generator()
        g.manual_seed(derive_seed(self.config.seed, _TAG_LOADER, tag, self.env.rank))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=list(batches),
            collate_fn=collate,
            num_workers=workers,
            generator=g,
            pin_memory=self.device.type == "cuda",
        )
        yield from loader

    def _batch_stream(self, step: int) -> Iterator[Any]:
        """Training batches from optimiser step ``step`` on (one batch per step)."""
        epoch, start = divmod(step, self.batches_per_epoch)
        while True:
            yield from self._load_batches(
                self.train_set, self.epoch_batches(epoch)[start:], tag=epoch
            )
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ training

    def fit(self) -> FitSummary:
        """Train from the current step up to ``config.steps``; returns a summary."""
        cfg = self.config
        main = self.env.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        stream = self._batch_stream(self.step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.grad_clip if cfg.grad_clip else math.inf
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        norm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        window = 0
        bar = progress(
            range(self.step, cfg.steps),
            total=cfg.steps - self.step,
            desc="train",
            enabled=main and cfg.progress,
        )
        for _ in bar:
            batch = move_to(next(stream), self.device)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._train_module(batch, self.generator)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
            loss = loss.mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(self.model)
            self.step += 1
            loss_sum += loss.detach().double()
            norm_sum += grad_norm.detach().double()
            window += 1

            record: dict[str, Any] = {}
            last = self.step == cfg.steps
            if _due(self.step, cfg.log_every) or last:
                train_loss = ddp.all_mean(loss_sum.item() / window, self.env, self.device)
                if not math.isfinite(train_loss):
                    raise InputError(
                        f"the training loss became {train_loss} at step {self.step}; "
                        f"lower train.lr ({cfg.lr}) or set train.grad_clip"
                    )
                record.update(
                    lr=lr,
                    train_loss=train_loss,
                    grad_norm=ddp.all_mean(norm_sum.item() / window, self.env, self.device),
                )
                self.last_train_loss = train_loss
                loss_sum.zero_()
                norm_sum.zero_()
                window = 0
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{train_loss:.4g}", lr=f"{lr:.2e}")
            if self.val_set is not None and (_due(self.step, cfg.val_every) or last):
                record["val_loss"] = self.validate()
            if record and main:
                record = {"step": self.step, **record}
                record["time"] = round(self._elapsed_before + time.perf_counter() - t0, 3)
                self._append_metrics(record)
            if _due(self.step, cfg.ckpt_every) or last:
                self.save_checkpoint(elapsed=self._elapsed_before + time.perf_counter() - t0)
                if main:
                    plot_loss_curve(read_metrics(self.metrics_path), self.plot_path)
        self._elapsed_before += time.perf_counter() - t0
        ddp.barrier(self.env)
        return FitSummary(self.step, self.last_train_loss, self.last_val_loss, self._elapsed_before)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean per-item loss of the EMA model over the validation set (rank 0 computes it,
        the other processes return None).

        The noise generator is re-seeded from ``(seed, "validation")`` each time and the
        items are taken in order, so values from different steps are comparable.
        """
        if self.val_set is None or not self.env.is_main:
            return None
        n = _length(self.val_set, "validation set")
        if self.config.val_max_items is not None:
            n = min(n, self.config.val_max_items)
        b = self.config.batch_size
        batches = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.config.seed, _TAG_VALIDATION))
        model = self.ema.model
        total, count = 0.0, 0
        for idx, batch in zip(batches, self._load_batches(self.val_set, batches, tag=-1)):
            loss = self.loss_fn(model, move_to(batch, self.device), g)
            total += float(loss.sum()) if loss.ndim else float(loss) * len(idx)
            count += len(idx)
        self.last_val_loss = total / max(count, 1)
        return self.last_val_loss

    def _append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict[str, Any]:
        # the legacy global NumPy generator is what third-party code draws from
        name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "numpy": {
                "name": name,
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": [version, list(internal), gauss_next],
            "generator": self.generator.get_state(),
        }

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
        npst = state["numpy"]
        np.random.set_state(  # noqa: NPY002
            (
                npst["name"],
                npst["keys"].numpy().astype(np.uint32),
                npst["pos"],
                npst["has_gauss"],
                npst["cached_gaussian"],
            )
        )
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        self.generator.set_state(state["generator"])

    def state_dict(self, elapsed: float | None = None) -> dict[str, Any]:
        """Everything needed to resume (this process's RNG state only; see
        :meth:`save_checkpoint` for every process's)."""
        epoch, batch = divmod(self.step, self.batches_per_epoch)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": {
                "epoch": epoch,
                "batch_in_epoch": batch,
                "batches_per_epoch": self.batches_per_epoch,
                "n_train": self.n_train,
                "batch_size": self.config.batch_size,
                "seed": self.config.seed,
            },
            "rng": [self._rng_state()],
            "elapsed": float(self._elapsed_before if elapsed is None else elapsed),
            "last_val_loss": self.last_val_loss,
            "config": self.config.to_dict(),
        }

    def save_checkpoint(
        self, path: str | os.PathLike | None = None, elapsed: float | None = None
    ) -> Path:
        """Write the resume state atomically (rank 0; every process must call it, since the
        random-generator states of all processes are gathered). Returns the path."""
        path = Path(path) if path is not None else self.checkpoint_path
        rng_states = ddp.gather_objects(self._rng_state(), self.env)
        if self.env.is_main:
            state = self.state_dict(elapsed)
            state["rng"] = rng_states
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns its step.

        Loads with ``weights_only=True`` (no arbitrary unpickling). The data order depends
        on the seed, the batch size and the training-set size, so those must match.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"checkpoint {path} cannot be read ({e}); delete it to restart") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not a cryoprior checkpoint")
        data = state["data"]
        for key, now in (
            ("seed", self.config.seed),
            ("batch_size", self.config.batch_size),
            ("n_train", self.n_train),
        ):
            if data[key] != now:
                raise InputError(
                    f"checkpoint {path} was written with {key} = {data[key]}, this run has "
                    f"{now}; resume with the same value or start a new run folder"
                )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._elapsed_before = float(state["elapsed"])
        self.last_val_loss = state.get("last_val_loss")
        rng = state["rng"]
        if self.env.rank < len(rng):
            self._set_rng_state(rng[self.env.rank])
        if self.env.is_main:
            self._truncate_metrics(self.step)
        ddp.barrier(self.env)
        return self.step

    def resume(self) -> bool:
        """Load ``out_dir/checkpoints/last.pt`` if it exists; returns whether it did."""
        if not self.checkpoint_path.is_file():
            return False
        self.load_checkpoint(self.checkpoint_path)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric records written after ``step`` (by the run that was interrupted)."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= step]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Leave the process group if this trainer joined it."""
        ddp.cleanup(self.env)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _length(dataset: Any, what: str) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise InputError(f"the {what} must be indexable (have len() and [i])") from None
    if n < 1:
        raise InputError(f"the {what} is empty")
    return n


# ----------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class TrainRun:
    """What :func:`train_prior` returns: the run folder, the prior folder (None on
    processes other than rank 0), whether it resumed, and the fit summary."""

    out_dir: Path
    prior_dir: Path | None
    resumed: bool
    summary: FitSummary


def train_prior(
    config: Mapping[str, Any],
    out_dir: str | os.PathLike,
    resume: bool = False,
    command: str | None = None,
) -> TrainRun:
    """Train a prior described by a run config and write it as a prior folder.

    Builds the data (``[data]``), the objective (``[objective]``, default "denoising", see
    :mod:`cryoprior.train.objectives`; completed from the data), the network
    (``[network]``, completed from the data's shape and the objective), the trained model
    (a denoiser for the diffusion objectives, with ``[diffusion]``) and its loss, trains
    with :class:`Trainer` (``[train]``) in ``out_dir`` and saves the EMA model with
    :func:`cryoprior.priors.save_prior` to ``out_dir / output.prior``, its objective
    recorded in ``prior.json``. The resolved config (with the objective and network
    completed) is saved as ``out_dir/config.json`` first.

    ``resume=True`` continues from ``out_dir/checkpoints/last.pt`` (if present); the data,
    network, diffusion and objective sections must equal the saved ones (``train`` may
    differ, e.g. more steps; a saved config without an objective was a denoising run).
    Without ``resume`` a folder that already holds a checkpoint is refused.
    """
    cfg = resolve_config(config)
    tc = TrainConfig.from_dict(cfg["train"])
    out_dir = Path(out_dir)
    cfg["output"]["dir"] = str(out_dir)
    main = ddp.detect().is_main
    checkpoint = out_dir / "checkpoints" / "last.pt"
    if checkpoint.is_file() and not resume:
        raise InputError(
            f"{out_dir} already holds a training run; pass --resume to continue it or choose "
            "another output folder"
        )

    data = build_data(cfg["data"], tc.seed)
    cfg["objective"] = complete_objective(cfg["objective"], data)
    cfg["network"] = complete_network_config(cfg["network"], data, cfg["objective"])
    saved_path = out_dir / "config.json"
    if resume and saved_path.is_file():
        saved = json.loads(saved_path.read_text())["config"]
        saved.setdefault("objective", {"kind": "denoising"})
        # keys added to an objective since the run was saved take their defaults
        for key, value in OBJECTIVE_DEFAULTS.get(saved["objective"].get("kind"), {}).items():
            saved["objective"].setdefault(key, value)
        diffs = [
            d
            for section in ("data", "network", "diffusion", "objective")
            for d in config_differences(saved.get(section, {}), cfg[section], section + ".")
        ]
        if diffs:
            raise InputError(
                f"cannot resume {out_dir}: the config differs from the saved one in "
                f"{', '.join(diffs)}; use the saved config ({saved_path}) or a new folder"
            )
    if main:
        save_run_config(out_dir, cfg, command if command is not None else command_line())

    seed_everything(tc.seed)
    net = build_network(dict(cfg["network"]))
    diffusion, objective = cfg["diffusion"], cfg["objective"]
    model = build_model(objective, net, diffusion, data)
    loss_fn = make_loss(objective, diffusion, data)
    trainer = Trainer(model, loss_fn, data.train, data.val, tc, out_dir)
    is_diffusion = objective["kind"] in DIFFUSION_OBJECTIVES
    try:
        resumed = trainer.resume() if resume else False
        summary = trainer.fit()
        prior_dir = None
        if main:
            meta = PriorMetadata(
                representation=data.representation,
                shape=data.shape,
                pixel_size=data.pixel_size,
                normalisation=data.normalisation,
                network=network_config(trained_network(trainer.ema_model)),
                data={"summary": data.summary, "split": data.split},
                training={
                    "steps": summary.step,
                    "final_train_loss": summary.train_loss,
                    "final_val_loss": summary.val_loss,
                    "wall_time_s": round(summary.elapsed, 1),
                    "world_size": trainer.env.world_size,
                    "loss": (
                        {k: diffusion[k] for k in ("weighting", "target", "t_sampling", "t_min")}
                        if is_diffusion
                        else {"objective": objective["kind"]}
                    ),
                    "run_dir": str(out_dir),
                    "config": cfg,
                },
                cryoprior_version=__version__,
                command=command if command is not None else command_line(),
                objective=objective_metadata(objective, data),
            )
            prior_dir = save_prior(out_dir / cfg["output"]["prior"], trainer.ema_model, meta)
        ddp.barrier(trainer.env)
    finally:
        trainer.close()
    return TrainRun(out_dir, prior_dir, resumed, summary)
