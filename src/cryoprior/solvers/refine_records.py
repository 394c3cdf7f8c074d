"""A refinement's record on disk: what each iteration did and measured
(:class:`IterationRecord`), and the per-iteration files that let a killed run resume
(:class:`RefineRecorder`). Used by :func:`cryoprior.solvers.refine.refine`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cryoprior.core.containers import Volume
from cryoprior.core.errors import InputError
from cryoprior.core.files import write_text_atomic
from cryoprior.io.mrc import read_map, write_map
from cryoprior.io.star import Particles, write_particles
from cryoprior.physics.source import ParticleSource
from cryoprior.solvers.backprojection import SourceReconstruction
from cryoprior.solvers.distributed_recon import process_layout

if TYPE_CHECKING:
    from cryoprior.solvers.refine import RefineConfig


@dataclass
class IterationRecord:
    """What one iteration did and measured (JSON-ready)."""

    iteration: int
    search: str
    band: float
    step: float
    fsc0143: float
    fsc05: float
    pose_change_deg: float | None
    shift_change: float | None
    seconds: float
    prior: bool = False
    fsc_curve: list[float] = field(default_factory=list)
    fsc0143_unmasked: float | None = None


class RefineRecorder:
    """Writes and reads a refinement's iterations in ``out`` (only rank 0 writes):
    ``iter_NNN/`` with half1/half2.mrc, ref1/ref2.mrc, poses.npz, particles.star, and
    ``refine_state.json`` (the config and every finished iteration's record)."""

    def __init__(self, out: Path, source: ParticleSource, config: RefineConfig) -> None:
        self.out = Path(out)
        self.source = source
        self.config = config
        self.writes = process_layout()[0] == 0

    @property
    def state_path(self) -> Path:
        return self.out / "refine_state.json"

    def folder(self, iteration: int) -> Path:
        return self.out / f"iter_{iteration:03d}"

    def save(
        self,
        record: IterationRecord,
        history: list[IterationRecord],
        rec: SourceReconstruction,
        refs: list[torch.Tensor],
        particles: Particles,
        rotations: torch.Tensor,
    ) -> None:
        if not self.writes:
            return
        px = self.source.pixel_size
        folder = self.folder(record.iteration)
        folder.mkdir(parents=True, exist_ok=True)
        for name, vol in (("half1", rec.half1), ("half2", rec.half2)):
            write_map(folder / f"{name}.mrc", Volume(vol.float(), px))
        for h, ref in enumerate(refs):
            write_map(folder / f"ref{h + 1}.mrc", Volume(ref.float(), px))
        np.savez(
            folder / "poses.npz",
            rotations=rotations.numpy(),  # exact, not through the STAR's Euler angles
            shifts=np.asarray(particles.shifts),
        )
        write_particles(folder / "particles.star", particles)
        state = {
            "config": dataclasses.asdict(self.config),
            "n_particles": len(self.source),
            "history": [dataclasses.asdict(r) for r in history],
        }
        write_text_atomic(self.state_path, json.dumps(state, indent=1))

    def load(
        self,
    ) -> tuple[list[IterationRecord], list[torch.Tensor], torch.Tensor, torch.Tensor] | None:
        """(history, references, rotations, shifts) of the last finished iteration, or None."""
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("n_particles") != len(self.source):
            raise InputError(
                f"{self.out} holds a refinement of {state.get('n_particles')} particles, not "
                f"{len(self.source)}: choose another output folder (-o)"
            )
        saved = {k: v for k, v in state["config"].items() if k not in ("iterations", "patience")}
        now = {k: v for k, v in dataclasses.asdict(self.config).items() if k in saved}
        if saved != now:
            diff = sorted(k for k in saved if saved[k] != now.get(k))
            raise InputError(
                f"{self.out} holds a refinement with other settings ({', '.join(diff)}): "
                "repeat its command to resume, or choose another output folder (-o)"
            )
        history = [IterationRecord(**r) for r in state["history"]]
        if not history:
            return None
        folder = self.folder(history[-1].iteration)
        refs = [read_map(folder / f"ref{h}.mrc").data.double() for h in (1, 2)]
        poses = np.load(folder / "poses.npz")
        return (
            history,
            refs,
            torch.from_numpy(poses["rotations"]),
            torch.from_numpy(poses["shifts"]),
        )


__all__ = ["IterationRecord", "RefineRecorder"]
