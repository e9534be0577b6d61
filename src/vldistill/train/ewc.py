"""Elastic weight consolidation (EWC; Kirkpatrick et al., 2017, PNAS "Overcoming catastrophic forgetting in
neural networks") for continual re-distillation: a student distilled on one domain and then on another keeps
what it learned first by a quadratic penalty pulling each parameter back to its old value, weighted by how much
the old domain's objective depends on it.

- Fisher information (diagonal, empirical): F_i = mean over n batches b of the previous domain of
  (d L_b / d theta_i)^2, L_b the training objective (the distillation losses) on batch b, taken at the previous
  domain's student theta*. It is the squared gradient of whole batches (not of single samples), so its scale
  depends on the batch size; the strength `lambda` absorbs that.
- Penalty on the new domain: lambda / 2 * sum_i F_i (theta_i - theta*_i)^2, over the parameters the Fisher
  holds (the student's trainable ones when it was estimated).

The Fisher and the anchor theta* are saved together in one safetensors file (`FISHER_FILE`), keys
`fisher.<name>` and `anchor.<name>`, written atomically; reading it for a model checks that it holds exactly
that model's parameter names and shapes, and (for the anchor model) the same weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError
from torch import nn

from vldistill.fileio import read_safetensors, write_safetensors_atomic
from vldistill.losses.registry import DistillationObjective
from vldistill.teachers.cache.cached import CachedTeacher
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.loop import StudentWithObjective

FISHER_FILE = "fisher.safetensors"
FISHER_FORMAT = "vldistill-ewc-1"


class FisherMismatchError(ValueError):
    """A saved Fisher information does not belong to the model it is applied to."""


@dataclass
class FisherInformation:
    """The diagonal Fisher information of a model's parameters on a domain, with the parameters it was estimated
    at (the anchor), by parameter name, and how many batches it averages."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    batches: int

    def check_matches(self, model: nn.Module, source: str, same_weights: bool = False) -> None:
        """Raise FisherMismatchError (naming `source`) unless every parameter the Fisher holds is one of `model`'s,
        with the same shape; with `same_weights`, also unless `model`'s weights are still the anchor (a Fisher
        estimated before the model was trained further is stale)."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.fisher) - set(params))
        if missing:
            raise FisherMismatchError(
                f"{source}: holds Fisher information of parameters this model does not have ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}; {len(missing)} in all): it was estimated for another model"
            )
        for name, value in self.fisher.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise FisherMismatchError(
                    f"{source}: parameter {name} has shape {tuple(params[name].shape)} in the model but "
                    f"{tuple(value.shape)} in the Fisher information: it was estimated for another model"
                )
        if same_weights:
            changed = [n for n, a in self.anchor.items() if not torch.equal(a, params[n].detach().cpu().to(a.dtype))]
            if changed:
                raise FisherMismatchError(
                    f"{source}: stale: the model's weights differ from those the Fisher information was estimated at "
                    f"({len(changed)} parameters, e.g. {changed[0]}); estimate it again"
                )


def estimate_fisher(
    student: nn.Module,
    objective: DistillationObjective,
    batches: Iterable[dict[str, torch.Tensor]],
    count: int,
    teacher: Optional[nn.Module] = None,
) -> FisherInformation:
    """The diagonal empirical Fisher information of `student`'s trainable parameters under `objective` (with the
    `teacher`'s outputs when the objective needs them): the mean of the squared gradient of the objective over the
    first `count` of `batches` (each one micro-batch), the student in eval mode (no dropout); the anchor is the
    student's current weights. The student's and objective's gradients are left untouched."""
    if count < 1:
        raise ValueError(f"the Fisher information needs at least one batch, got {count}")
    if objective.needs and teacher is None:
        raise ValueError(f"the objective needs a teacher ({', '.join(sorted(objective.needs))}), but none was given")
    if teacher is not None and objective.needs and not isinstance(teacher, (TeacherEnsemble, CachedTeacher)):
        teacher = TeacherEnsemble([teacher])
    module = StudentWithObjective(student, objective)
    named = {name: p for name, p in student.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    was_training = student.training
    student.eval()
    if teacher is not None:
        teacher.eval()
    seen = 0
    try:
        for batch in batches:
            if seen == count:
                break
            teacher_output = teacher_output_over(teacher, [batch], objective.needs) if objective.needs else None
            loss, _ = module(batch, teacher_output)
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True, materialize_grads=True)
            for name, grad in zip(named, grads):
                sums[name] += grad.detach().float() ** 2
            seen += 1
    finally:
        student.train(was_training)
    if seen < count:
        raise ValueError(f"the Fisher information needs {count} batches, but the data gave {seen}")
    return FisherInformation(
        fisher={name: (total / seen).cpu() for name, total in sums.items()},
        anchor={name: p.detach().float().cpu().clone() for name, p in named.items()},
        batches=seen,
    )


class EWCPenalty(nn.Module):
    """lambda / 2 * sum_i F_i (theta_i - theta*_i)^2 of a model's parameters (called with the model)."""

    def __init__(self, info: FisherInformation, strength: float) -> None:
        super().__init__()
        if not strength >= 0:
            raise ValueError(f"the EWC strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.names = sorted(info.fisher)
        self.fisher = {name: info.fisher[name] for name in self.names}
        self.anchor = {name: info.anchor[name] for name in self.names}

    def forward(self, model: nn.Module) -> torch.Tensor:
        """The penalty of `model`'s current parameters (differentiable in them)."""
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        total = torch.zeros((), device=device)
        for name in self.names:
            param = params[name]
            if self.fisher[name].device != param.device:  # moved once, kept where the model is
                self.fisher[name], self.anchor[name] = self.fisher[name].to(param.device), self.anchor[name].to(param.device)
            fisher, anchor = self.fisher[name], self.anchor[name]
            total = total + (fisher * (param.float() - anchor) ** 2).sum()
        return 0.5 * self.strength * total


def save_fisher(path: str | os.PathLike, info: FisherInformation) -> Path:
    """Write `info` to the safetensors file `path` atomically (keys `fisher.<name>`, `anchor.<name>`)."""
    tensors = {f"fisher.{n}": t.contiguous() for n, t in info.fisher.items()}
    tensors.update({f"anchor.{n}": t.contiguous() for n, t in info.anchor.items()})
    metadata = {"format": FISHER_FORMAT, "batches": str(info.batches), "names": json.dumps(sorted(info.fisher))}
    return write_safetensors_atomic(path, tensors, metadata)


def load_fisher(path: str | os.PathLike, model: Optional[nn.Module] = None, same_weights: bool = False) -> FisherInformation:
    """Read a Fisher information `save_fisher` wrote; with `model`, check it belongs to it (`check_matches`)."""
    path = Path(path)
    try:
        tensors, metadata = read_safetensors(path)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{path}: not a readable Fisher information file ({error})") from None
    if metadata.get("format") != FISHER_FORMAT:
        raise ValueError(f"{path}: not a vldistill Fisher information file (format {metadata.get('format')!r})")
    names = json.loads(metadata["names"])
    missing = [n for n in names if f"fisher.{n}" not in tensors or f"anchor.{n}" not in tensors]
    if missing:
        raise ValueError(f"{path}: damaged: no tensors for {missing[0]}")
    info = FisherInformation(
        fisher={n: tensors[f"fisher.{n}"] for n in names},
        anchor={n: tensors[f"anchor.{n}"] for n in names},
        batches=int(metadata["batches"]),
    )
    if model is not None:
        info.check_matches(model, str(path), same_weights)
    return info
