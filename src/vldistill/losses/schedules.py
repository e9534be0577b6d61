"""Loss-weight and temperature schedules over training, and adaptive loss weighting.

A schedule is plain data: a number (constant) or a mapping with a `kind`, e.g.
`{kind: cosine, start: 5.0, end: 1.0}`. It is evaluated at the training progress
p = step / (total_steps - 1) of the 0-based step being taken, so the first step uses `start` and the
last step uses `end` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

import torch

from vldistill.binding import build_dataclass

# Each kind and the keys it takes (all of them required).
SCHEDULE_KINDS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "linear": ("start", "end"),
    "cosine": ("start", "end"),
    "step": ("start", "gamma", "milestones"),
}
WEIGHTING_KINDS = ("fixed", "gap", "uncertainty")


@dataclass
class Schedule:
    """A value over training progress p in [0, 1]: `constant` (value), `linear` ((1 - p) start + p end),
    `cosine` (start -> end along a half cosine: w = (1 - cos(pi p)) / 2, (1 - w) start + w end) or `step`
    (start * gamma^k, k the number of `milestones`, fractions of training in (0, 1), with p >= milestone)."""

    kind: str = ""
    value: Optional[float] = None
    start: Optional[float] = None
    end: Optional[float] = None
    gamma: Optional[float] = None
    milestones: Optional[list[float]] = None

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.kind not in SCHEDULE_KINDS:
            got = "it is missing" if not self.kind else f"got {self.kind!r}"
            raise ValueError(f"{where}.kind must be one of {', '.join(SCHEDULE_KINDS)}; {got}")
        takes = SCHEDULE_KINDS[self.kind]
        for name in (f.name for f in fields(self) if f.name != "kind"):
            given = getattr(self, name) is not None
            if name in takes and not given:
                raise ValueError(f"{where}.{name} is required by kind {self.kind} (it takes {', '.join(takes)})")
            if given and name not in takes:
                raise ValueError(f"{where}.{name} is not used by kind {self.kind} (it takes {', '.join(takes)})")
        for name in ("value", "start", "end", "gamma"):
            number = getattr(self, name)
            if number is not None and not math.isfinite(number):
                raise ValueError(f"{where}.{name} must be a finite number, got {number}")
        if self.gamma is not None and self.gamma <= 0:
            raise ValueError(f"{where}.gamma must be > 0, got {self.gamma}")
        if self.milestones is not None:
            points = self.milestones
            if not points or not all(0 < m < 1 for m in points) or any(b <= a for a, b in zip(points, points[1:])):
                raise ValueError(
                    f"{where}.milestones must be a non-empty increasing list of fractions of training in (0, 1), "
                    f"got {points}"
                )

    def at(self, progress: float) -> float:
        """The value at `progress` in [0, 1] of training."""
        if self.kind == "constant":
            return self.value
        if self.kind == "step":
            return self.start * self.gamma ** sum(progress >= m for m in self.milestones)
        w = progress if self.kind == "linear" else (1 - math.cos(math.pi * progress)) / 2
        return (1 - w) * self.start + w * self.end


def parse_schedule(spec: Any, where: str, *, positive: bool = False) -> Schedule:
    """A validated Schedule from plain data (a number means `constant`); every value it takes must be
    >= 0 (> 0 when `positive`). Errors name `where` and the offending key."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        schedule, keys = Schedule(kind="constant", value=float(spec)), {"value": where}
    elif isinstance(spec, Mapping):
        schedule = build_dataclass(Schedule, spec, where)
        keys = {name: f"{where}.{name}" for name in ("value", "start", "end")}
    else:
        raise ValueError(
            f"{where} must be a number or a schedule mapping with kind one of {', '.join(SCHEDULE_KINDS)}, got {spec!r}"
        )
    for name, key in keys.items():
        number = getattr(schedule, name)
        if number is not None and not (math.isfinite(number) and (number > 0 if positive else number >= 0)):
            raise ValueError(f"{key} must be a finite number {'>' if positive else '>='} 0, got {number!r}")
    return schedule


def training_progress(step: int, total_steps: int) -> float:
    """Fraction of training done at 0-based `step` of `total_steps`: step / (total_steps - 1), at most 1
    (0 for a single step)."""
    if total_steps < 1 or step < 0:
        raise ValueError(f"need 0 <= step and total_steps >= 1, got step={step}, total_steps={total_steps}")
    return min(step / (total_steps - 1), 1.0) if total_steps > 1 else 0.0


def schedule_value(spec: Union[Schedule, float, Mapping[str, Any]], step: int, total_steps: int) -> float:
    """The value of a schedule (a Schedule or its plain-data spec) at 0-based `step` of `total_steps`."""
    schedule = spec if isinstance(spec, Schedule) else parse_schedule(spec, "schedule")
    return schedule.at(training_progress(step, total_steps))


@dataclass
class WeightingConfig:
    """How the objective weighs its losses beyond their (scheduled) weights: `fixed` (not at all), `gap`
    (distillation weights rebalanced every `every` steps by `gap_weights`) or `uncertainty` (learned
    homoscedastic uncertainty, `uncertainty_weighted`)."""

    kind: str = "fixed"
    every: int = 50

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.kind not in WEIGHTING_KINDS:
            raise ValueError(f"{where}.kind must be one of {', '.join(WEIGHTING_KINDS)}, got {self.kind!r}")
        if self.every < 1:
            raise ValueError(f"{where}.every must be >= 1, got {self.every}")


def gap_weights(weights: Mapping[str, float], ratios: Mapping[str, float]) -> dict[str, float]:
    """Loss-ratio balancing of the distillation losses (the keys of `ratios`):

        a_i = w_i r_i * (sum_j w_j) / (sum_j w_j r_j)        for i, j in `ratios`,

    with w_i the configured (scheduled) weight and r_i = L_i(now) / L_i(start) the loss's value on a fixed
    held-out batch relative to its value there at the start of training. A loss the student has closed
    less of its gap on gets more weight; the distillation weights keep their configured sum; with equal
    ratios the weights are unchanged, as they are when sum_j w_j r_j is 0. Losses not in `ratios` (task
    losses) keep w_i. This is GradNorm's inverse training rate L_i(t) / L_i(0) (Chen et al., 2018,
    "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks") applied to
    the weights directly, as Dynamic Weight Average does with a loss ratio (Liu, Johns & Davison, 2019,
    "End-to-End Multi-Task Learning with Attention"), normalized to a fixed sum."""
    scaled = sum(weights[name] * ratio for name, ratio in ratios.items())
    if scaled == 0:
        return dict(weights)
    budget = sum(weights[name] for name in ratios)
    return {name: w * ratios[name] * budget / scaled if name in ratios else w for name, w in weights.items()}


def uncertainty_weighted(loss: torch.Tensor, log_variance: torch.Tensor, weight: float) -> torch.Tensor:
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, 2018, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics"): weight * (exp(-s) L + s), with s the
    learned log-variance of the loss; the s term keeps s from growing without bound."""
    return weight * (torch.exp(-log_variance) * loss + log_variance)


def describe_schedule(spec: Any) -> str:
    """A short human description of a number or a schedule mapping, e.g. "2", "cosine 5 -> 1"."""
    if not isinstance(spec, Mapping):
        return f"{spec:g}"
    kind = spec.get("kind", "")
    if kind == "constant":
        return f"{spec.get('value'):g}"
    if kind == "step":
        return f"step {spec.get('start'):g} x{spec.get('gamma'):g} at {spec.get('milestones')}"
    return f"{kind} {spec.get('start'):g} -> {spec.get('end'):g}"
