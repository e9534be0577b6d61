"""Turn the YAML `losses:` mapping into registered loss modules and one weighted objective."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from vldistill.binding import build_dataclass

# Importing the families registers their losses.
from vldistill.losses import (  # noqa: F401
    attention, blip, classes, contrastive, cross_attention, features, hidden, logits, regions, relational,
)
from vldistill.losses.base import LOSSES, LossContext
from vldistill.losses.gradients import GRADIENT_KEYS, GradientControl, parse_gradient_options
from vldistill.models.signals import Signals
from vldistill.losses.schedules import (
    Schedule,
    WeightingConfig,
    gap_weights,
    parse_schedule,
    training_progress,
    uncertainty_weighted,
)


@dataclass
class LossSpec:
    """One selected loss: its registered name, weight schedule (a constant for a plain number), validated
    parameters, when its temperature is a schedule mapping that schedule, and its own gradient control
    (losses/gradients.py): a gradient scale schedule and a gradient clipping limit, None when not given."""

    name: str
    weight: Schedule
    params: Any
    temperature: Optional[Schedule] = None
    grad_scale: Optional[Schedule] = None
    grad_clip: Optional[float] = None

    @property
    def needs(self) -> frozenset[str]:
        """The teacher signals this loss reads with its options (empty: a task loss)."""
        return LOSSES.get(self.name).needs_for(self.params)


def parse_loss_specs(losses: Mapping[str, Mapping[str, Any]], where: str = "losses") -> list[LossSpec]:
    """Validate a `{name: {weight: w, **params}}` mapping against the registry and each loss's Params.

    `weight`, and a `temperature` parameter, may be a number or a schedule mapping (see
    `vldistill.losses.schedules`); a scheduled temperature's Params hold its start value. Every loss also
    takes `grad_scale` and `grad_clip` (see `vldistill.losses.gradients`)."""
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
        if isinstance(weight, Mapping):
            weight = parse_schedule(weight, f"{where}.{name}.weight")
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{where}.{name}.weight must be a number >= 0 or a schedule mapping, got {weight!r}")
        else:
            weight = Schedule(kind="constant", value=float(weight))
        grad_scale, grad_clip = parse_gradient_options(options, f"{where}.{name}")
        params_cls = LOSSES.get(name).Params
        allowed = [f.name for f in dataclasses.fields(params_cls)]
        for key in options:
            if key not in allowed:
                raise ValueError(
                    f"unknown config key {where}.{name}.{key}; allowed keys: {', '.join(['weight', *allowed, *GRADIENT_KEYS])}"
                )
        temperature = None
        if isinstance(options.get("temperature"), Mapping):
            temperature = parse_schedule(options["temperature"], f"{where}.{name}.temperature", positive=True)
            options["temperature"] = temperature.at(0.0)
        params = build_dataclass(params_cls, options, f"{where}.{name}")
        specs.append(LossSpec(name, weight, params, temperature, grad_scale, grad_clip))
    return specs


class DistillationObjective(nn.Module):
    """A weighted sum of registered losses; knows whether (and what) it needs from the teacher.

    Weights and temperatures may follow schedules, moved by `set_progress` before each step. `weighting`
    may adapt the weights further: `gap` rebalances the teacher-needing losses' weights (`gap_weights`)
    from their values on a held-out batch (`refresh_gap`); `uncertainty` adds a learnable log-variance
    s_i per loss (`uncertainty_weighted`), trained with the rest of the objective's parameters.
    A loss's own `grad_scale` and `grad_clip` act on its weighted term through `gradients` (losses/gradients.py).
    """

    def __init__(self, specs: list[LossSpec], context: LossContext, weighting: Optional[WeightingConfig] = None) -> None:
        super().__init__()
        self.weighting = weighting or WeightingConfig()
        self.weight_schedules = {spec.name: spec.weight for spec in specs}
        self.temperature_schedules = {spec.name: spec.temperature for spec in specs if spec.temperature is not None}
        self.gradients = GradientControl(
            {spec.name: spec.grad_scale for spec in specs if spec.grad_scale is not None},
            {spec.name: spec.grad_clip for spec in specs if spec.grad_clip is not None},
        )
        self.losses = nn.ModuleDict({spec.name: LOSSES.get(spec.name)(spec.params, context) for spec in specs})
        self.progress = 0.0
        gap = self.weighting.kind == "gap"
        self.gap_ratios = {name: 1.0 for name, loss in self.losses.items() if gap and loss.needs}
        self.gap_reference: dict[str, float] = {}
        if self.weighting.kind == "uncertainty":
            self.log_variances = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.losses})

    @property
    def needs(self) -> frozenset[str]:
        """Union of what the selected losses need from the teacher (empty: no teacher at all)."""
        return frozenset().union(*(loss.needs for loss in self.losses.values()))

    @property
    def student_needs(self) -> frozenset[str]:
        """What the selected losses read from the student beyond `needs` (ask the student for both)."""
        return frozenset().union(*(loss.student_needs for loss in self.losses.values()))

    @property
    def weights(self) -> dict[str, float]:
        """Each loss's current weight: its schedule at the current progress, rebalanced by gap weighting
        (uncertainty weighting further multiplies it by exp(-s_i) in `forward`)."""
        scheduled = {name: schedule.at(self.progress) for name, schedule in self.weight_schedules.items()}
        return gap_weights(scheduled, self.gap_ratios) if self.gap_ratios else scheduled

    @property
    def needs_held_out(self) -> bool:
        """Whether training must feed `refresh_gap` a held-out batch (gap weighting of teacher-needing losses)."""
        return bool(self.gap_ratios)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Move every weight and temperature schedule to 0-based `step` of `total_steps`."""
        self.progress = training_progress(step, total_steps)
        for name, schedule in self.temperature_schedules.items():
            self.losses[name].scheduled_temperature = schedule.at(self.progress)

    def gap_due(self, step: int) -> bool:
        """Whether gap weighting re-measures its ratios before 0-based `step` (every `weighting.every` steps)."""
        return self.needs_held_out and step % self.weighting.every == 0

    @torch.no_grad()
    def refresh_gap(self, student: Signals, teacher: Signals) -> None:
        """Gap weighting: evaluate each teacher-needing loss L_i on the held-out batch's outputs; the first
        call records L_i(start), every call sets r_i = L_i / L_i(start) (1 while L_i(start) is 0)."""
        for name in self.gap_ratios:
            value = float(self.losses[name](student, teacher)[0])
            reference = self.gap_reference.setdefault(name, value)
            self.gap_ratios[name] = value / reference if reference > 0 else 1.0

    def weighting_state(self) -> dict[str, dict[str, float]]:
        """Gap weighting's measured ratios and reference losses, for checkpoints (learned weights such as
        uncertainty's log-variances are parameters, saved with the weights)."""
        return {"gap_ratios": dict(self.gap_ratios), "gap_reference": dict(self.gap_reference)}

    def load_weighting_state(self, state: dict[str, dict[str, float]]) -> None:
        """Restore gap weighting's ratios and references saved by `weighting_state` for the same losses."""
        if set(state["gap_ratios"]) != set(self.gap_ratios):
            raise ValueError(
                f"the checkpoint's gap weighting covers {sorted(state['gap_ratios'])}, this objective "
                f"{sorted(self.gap_ratios)}: it comes from another configuration"
            )
        self.gap_ratios = dict(state["gap_ratios"])
        self.gap_reference = dict(state["gap_reference"])

    def forward(
        self, student: Signals, teacher: Optional[Signals]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total weighted loss and a flat dict of every loss and its named parts, for logging. Each loss's term
        carries its gradient scale; the terms of losses with `grad_clip` are also recorded in `gradients`, whose
        `backward` and `finish` the training loop uses to clip them (a plain `backward()` of the total does not)."""
        total = torch.zeros((), device=next(v for v in student.values() if isinstance(v, torch.Tensor)).device)
        parts: dict[str, torch.Tensor] = {}
        weights = self.weights
        for name, loss_fn in self.losses.items():
            if loss_fn.needs and teacher is None:
                raise ValueError(f"loss {name!r} needs a teacher, but none was given")
            value, named = loss_fn(student, teacher)
            if self.weighting.kind == "uncertainty":
                term = uncertainty_weighted(value, self.log_variances[name], weights[name])
            else:
                term = weights[name] * value
            total = total + self.gradients.term(name, term, self.progress)
            parts[f"loss/{name}"] = value.detach()
            parts.update({f"part/{k}": v for k, v in named.items()})
        parts["loss/total"] = total.detach()
        return total, parts

    def settings(self) -> dict[str, float]:
        """The current weighting, for logging: `weight/<loss>` (what multiplies the loss in the total:
        w_i, or w_i exp(-s_i) under uncertainty weighting), `temperature/<loss>` for each loss with one,
        `gap_ratio/<loss>` (r_i) or `log_variance/<loss>` (s_i) under those weightings, and `grad_scale/<loss>`
        for each loss with a gradient scale."""
        values: dict[str, float] = {}
        for name, weight in self.weights.items():
            if self.weighting.kind == "uncertainty":
                log_variance = self.log_variances[name].item()
                values[f"log_variance/{name}"] = log_variance
                weight *= math.exp(-log_variance)
            values[f"weight/{name}"] = weight
            if self.losses[name].temperature is not None:
                values[f"temperature/{name}"] = float(self.losses[name].temperature)
        values.update({f"gap_ratio/{name}": ratio for name, ratio in self.gap_ratios.items()})
        values.update({f"grad_scale/{name}": self.gradients.scale_at(name, self.progress) for name in self.gradients.scales})
        return values


def specs_need(specs: Sequence[LossSpec]) -> frozenset[str]:
    """The teacher signals the selected losses read (empty: none of them uses a teacher)."""
    return frozenset().union(*(spec.needs for spec in specs))


def build_objective(
    losses: Union[Mapping[str, Mapping[str, Any]], Sequence[LossSpec]],
    context: LossContext,
    where: str = "losses",
    weighting: Optional[WeightingConfig] = None,
) -> DistillationObjective:
    """The objective for a YAML `losses:` mapping (validated here; errors name `where`.name.key) or for
    specs already parsed from one (`parse_loss_specs`), weighted as `weighting` says (default: fixed)."""
    specs = parse_loss_specs(losses, where) if isinstance(losses, Mapping) else list(losses)
    return DistillationObjective(specs, dataclasses.replace(context, config_key=where), weighting)
