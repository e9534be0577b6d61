"""Turn the YAML `losses:` mapping into registered loss modules and one weighted objective."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

# Importing the families registers their losses.
from vldistill.losses import attention, contrastive, features, hidden, logits, relational  # noqa: F401
from vldistill.losses.base import LOSSES, DistillLoss, LossContext
from vldistill.models.outputs import DualEncoderOutput


@dataclass
class LossSpec:
    """One selected loss: its registered name, weight and validated parameters."""

    name: str
    weight: float
    params: Any


def parse_loss_specs(losses: Mapping[str, Mapping[str, Any]], where: str = "losses") -> list[LossSpec]:
    """Validate a `{name: {weight: w, **params}}` mapping against the registry and each loss's Params."""
    if not losses:
        raise ValueError(f"{where} is empty; choose at least one of: {', '.join(LOSSES.names())}")
    specs = []
    for name, options in losses.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {where}.{name}; known losses: {', '.join(LOSSES.names())}")
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"{where}.{name} must be a mapping of weight and parameters, got {options!r}")
        options = dict(options or {})
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{where}.{name}.weight must be a number >= 0, got {weight!r}")
        params_cls = LOSSES.get(name).Params
        allowed = [f.name for f in dataclasses.fields(params_cls)]
        for key in options:
            if key not in allowed:
                raise ValueError(
                    f"unknown config key {where}.{name}.{key}; allowed keys: {', '.join(['weight', *allowed])}"
                )
        from vldistill.config import build_dataclass  # late import: config imports this module

        params = build_dataclass(params_cls, options, f"{where}.{name}")
        specs.append(LossSpec(name=name, weight=float(weight), params=params))
    return specs


class DistillationObjective(nn.Module):
    """A weighted sum of registered losses; knows whether (and what) it needs from the teacher."""

    def __init__(self, specs: list[LossSpec], context: LossContext) -> None:
        super().__init__()
        self.weights = {spec.name: spec.weight for spec in specs}
        self.losses = nn.ModuleDict({spec.name: LOSSES.get(spec.name)(spec.params, context) for spec in specs})

    @property
    def needs(self) -> frozenset[str]:
        """Union of what the selected losses need from the teacher (empty: no teacher at all)."""
        return frozenset().union(*(loss.needs for loss in self.losses.values()))

    def forward(
        self, student: DualEncoderOutput, teacher: Optional[DualEncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total weighted loss and a flat dict of every loss and its named parts, for logging."""
        total = torch.zeros((), device=student.image_embeds.device)
        parts: dict[str, torch.Tensor] = {}
        for name, loss_fn in self.losses.items():
            if loss_fn.needs and teacher is None:
                raise ValueError(f"loss {name!r} needs a teacher, but none was given")
            value, named = loss_fn(student, teacher)
            total = total + self.weights[name] * value
            parts[f"loss/{name}"] = value.detach()
            parts.update({f"part/{k}": v for k, v in named.items()})
        parts["loss/total"] = total.detach()
        return total, parts


def build_objective(
    losses: Mapping[str, Mapping[str, Any]], context: LossContext, where: str = "losses"
) -> DistillationObjective:
    """The objective for a YAML `losses:` mapping (validated here; errors name `where`.name.key)."""
    return DistillationObjective(parse_loss_specs(losses, where), dataclasses.replace(context, config_key=where))
