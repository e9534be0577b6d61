"""The plan of one student run, resolved once before training: where the teacher's outputs come from (the
online teachers, the teacher cache, or none), the student, the objective, the batches (from the resume step on),
the held-out batch of gap weighting, checkpointing and the state to resume from. `train.runs.plan_student_run`
builds it; `DistillPlan.train` hands it to the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from vldistill.config import OptimConfig
from vldistill.data.bundle import DataBundle
from vldistill.losses.registry import DistillationObjective
from vldistill.models.clip import CLIPDualEncoder
from vldistill.train.checkpoint import TrainState
from vldistill.train.loop import Checkpointer, train
from vldistill.train.stages import Stage
from vldistill.train.trackers import Trackers
from vldistill.trained import TrainResult


@dataclass
class DistillPlan:
    """Everything a student run trains with, resolved from its config."""

    losses: Mapping[str, Mapping[str, Any]]
    """The selected losses (`distill.losses` unless the caller chose others)."""
    inherit: bool
    """Whether the student started from the teacher's weights."""
    from_cache: bool
    """Whether `teachers` reads the teacher cache (`cache.path`) instead of running the teachers."""
    student: CLIPDualEncoder
    teachers: Optional[nn.Module]
    """The online teacher ensemble, the cached teacher, or None when no loss needs a teacher."""
    objective: DistillationObjective
    data: DataBundle
    """The data the student trains on (the first `distill.train_pairs` training pairs when set)."""
    batches: Iterable[dict[str, torch.Tensor]]
    """The training micro-batches from the resume step on."""
    optim: OptimConfig
    held_out: Optional[dict[str, torch.Tensor]]
    """The held-out batch gap weighting measures on, None without gap weighting."""
    checkpointer: Optional[Checkpointer]
    """Where checkpoints go, None when `distill.checkpoint.every` is 0."""
    resume: Optional[TrainState]
    """The checkpoint the run continues from, None for a fresh run."""
    stages: Sequence[Stage] = ()
    """The training stages (`distill.stages` resolved against the student, train/stages.py); empty: one stage."""
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None
    """A term of the student's parameters added to every step's loss (continual re-distillation's EWC penalty)."""

    @property
    def start_step(self) -> int:
        """The step the run starts from: that of the resumed checkpoint, else 0."""
        return self.resume.step if self.resume is not None else 0

    def train(
        self, desc: str, log_path: Optional[Path] = None, progress: bool = True, trackers: Optional[Trackers] = None
    ) -> TrainResult:
        """Run the training loop on this plan (see `train.loop.train`)."""
        return train(
            self.student, self.objective, self.batches, self.optim, teacher=self.teachers, desc=desc, log_path=log_path,
            held_out_batch=self.held_out, checkpointer=self.checkpointer, resume=self.resume, progress=progress,
            trackers=trackers, stages=self.stages, penalty=self.penalty,
        )
