"""Staged training (`distill.stages`): a run split into stages that each train only some parameters, at their
own learning rate, with their own optimizer and warmup-cosine schedule (PromptKD's "prompts first, then the
student with them" is two stages). A run without stages is one unnamed stage training every parameter that
requires a gradient, exactly as before.

A stage's `trainable` selectors name parameter groups of the trained module (loop.StudentWithObjective):
- `student`: every student parameter; `objective`: the losses' own parameters (projections, uncertainty
  weights; there may be none);
- `prompts` / `projector`: the student's parameters named `prompts.*` / `projector.*` (learnable prompts and
  their projector); an error when the student has none;
- any group the student names itself (its `parameter_groups()`, models/groups.py): `vision`, `text`,
  `vision.layers.N`, `text.layers.N`, and family-specific ones (BLIP: `itm_head`; a captioner: `decoder`...).
Frozen parameters get requires_grad False (no gradient) and are left out of the stage's optimizer (no state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from vldistill.config import OptimConfig, StageConfig

STUDENT, OBJECTIVE = "student", "objective"  # the attributes of loop.StudentWithObjective
PREFIX_SELECTORS = ("prompts", "projector")  # student parameters found by their name prefix


@dataclass(frozen=True)
class Stage:
    """One resolved stage: its place in the run (`index`, steps `start` to `end`), learning rate, warmup, and
    the names (in loop.StudentWithObjective) of the parameters it trains; `trainable` None for the single
    stage of a run without stages, which leaves every parameter's requires_grad as it is."""

    index: int
    name: Optional[str]
    start: int
    steps: int
    lr: float
    warmup_steps: int
    trainable: Optional[frozenset[str]] = None

    @property
    def end(self) -> int:
        """The step count when this stage is done."""
        return self.start + self.steps

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of the stage (a resumed run must have the same stage there)."""
        return {"index": self.index, "name": self.name, "start": self.start, "steps": self.steps}

    def label(self, desc: str) -> str:
        """The progress bar's description during this stage: `desc`, and the stage's name when it has one."""
        return desc if self.name is None else f"{desc} [stage {self.index + 1} {self.name}]"


def single_stage(optim: OptimConfig) -> Stage:
    """The one stage of a run without `distill.stages`: all of `optim`'s steps, its lr and warmup, every
    parameter as it is."""
    return Stage(0, None, 0, optim.steps, optim.lr, optim.warmup_steps)


def parameter_groups_of(student: nn.Module) -> dict[str, tuple[str, ...]]:
    """The groups `student` names (its `parameter_groups()`), empty for a model that names none."""
    groups = getattr(student, "parameter_groups", None)
    return dict(groups()) if callable(groups) else {}


def known_selectors(student: nn.Module) -> list[str]:
    """Every selector `student` can be trained by: the fixed ones and the groups it names."""
    return [STUDENT, OBJECTIVE, *PREFIX_SELECTORS, *parameter_groups_of(student)]


def selected_names(selector: str, student: nn.Module, objective: nn.Module, where: str) -> frozenset[str]:
    """The names (in loop.StudentWithObjective) of the parameters `selector` names; ValueError naming `where`
    for a selector the student lacks (listing the known ones) or a prompts/projector selector matching none."""
    student_names = [name for name, _ in student.named_parameters()]
    if selector == STUDENT:
        chosen = student_names
    elif selector == OBJECTIVE:
        return frozenset(f"{OBJECTIVE}.{name}" for name, _ in objective.named_parameters())
    elif selector in PREFIX_SELECTORS:
        chosen = [name for name in student_names if name.startswith(f"{selector}.")]
        if not chosen:
            raise ValueError(
                f"{where}: {selector!r} selects the student's {selector}.* parameters, but this "
                f"{type(student).__name__} has none (add learnable prompts to the student first)"
            )
    else:
        groups = parameter_groups_of(student)
        if selector not in groups:
            raise ValueError(
                f"{where}: {type(student).__name__} has no parameter group {selector!r}; known: "
                f"{', '.join(known_selectors(student))}"
            )
        chosen = [name for name in student_names if name.startswith(groups[selector])]
        if not chosen:
            raise ValueError(f"{where}: the group {selector!r} of {type(student).__name__} holds no parameters")
    return frozenset(f"{STUDENT}.{name}" for name in chosen)


def plan_stages(
    configs: Sequence[StageConfig], optim: OptimConfig, student: nn.Module, objective: nn.Module,
    where: str = "distill.stages",
) -> list[Stage]:
    """The run's stages, resolved against `student` and `objective`: each configured stage's steps, lr (default
    `optim.lr`), warmup (default `optim.warmup_steps` for the first stage, 0 after) and trained parameters;
    `single_stage(optim)` when none are configured. ValueError naming `where`[i] for a selector the model
    lacks, a stage that trains nothing, or stages whose steps do not sum to `optim.steps`."""
    if not configs:
        return [single_stage(optim)]
    total = sum(config.steps for config in configs)
    if total != optim.steps:
        raise ValueError(f"{where}: the stages' steps sum to {total}, but the run trains {optim.steps} steps")
    stages, start = [], 0
    for index, config in enumerate(configs):
        key = f"{where}[{index}]"
        trainable = frozenset().union(*(
            selected_names(selector, student, objective, f"{key}.trainable[{k}]")
            for k, selector in enumerate(config.trainable)
        ))
        if not trainable:
            raise ValueError(f"{key}.trainable ({', '.join(config.trainable)}) selects no parameters")
        warmup = config.warmup_steps if config.warmup_steps is not None else (optim.warmup_steps if index == 0 else 0)
        lr = config.lr if config.lr is not None else optim.lr
        stages.append(Stage(index, config.name, start, config.steps, lr, warmup, trainable))
        start += config.steps
    return stages


def stage_after(stages: Sequence[Stage], step: int) -> Stage:
    """The stage that takes the step after `step` steps (the last stage once every step is done)."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def freeze_for(module: nn.Module, stage: Stage) -> None:
    """Let exactly the parameters `stage` trains require a gradient (nothing changes for a stage that keeps
    the flags as they are)."""
    if stage.trainable is None:
        return
    for name, param in module.named_parameters():
        param.requires_grad_(name in stage.trainable)
