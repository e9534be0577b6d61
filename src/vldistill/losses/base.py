"""What every distillation loss is: a small registered module that declares what it needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec
from vldistill.registry import Registry

# The teacher signals (models/signals.py) each family of losses reads; a loss may name any registered signal.
EMBEDDINGS = frozenset({"image_embeds", "text_embeds", "logit_scale"})
HIDDEN_STATES = frozenset({"image_hidden_states", "text_hidden_states", "text_attention_mask"})
ATTENTIONS = frozenset({"image_attentions", "text_attentions", "text_attention_mask"})


@dataclass
class LossContext:
    """Facts about the student and teacher a loss may need at construction (e.g. for projections).

    student_spec / teacher_spec: the towers' depths, widths and heads, needed by the layer-wise
    losses (`hidden`, `attention`) to map layers and size their projections.
    config_key: where the losses' options live in the config, for error messages.
    class_embeddings: the teacher's (C, D) normalized text embeddings of the class names, computed once and
    stored (prompt distillation, `class_kd`); None for a run on captioned pairs.
    """

    student_embed_dim: int
    teacher_embed_dim: Optional[int] = None
    student_spec: Optional[DualEncoderSpec] = None
    teacher_spec: Optional[DualEncoderSpec] = None
    config_key: str = "losses"
    class_embeddings: Optional[torch.Tensor] = None


@dataclass
class TemperatureParams:
    """Options of a loss with a softmax temperature (a number here; a schedule in YAML, see schedules.py)."""

    temperature: float = 1.0

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.temperature <= 0:
            raise ValueError(f"{where}.temperature must be > 0, got {self.temperature}")


class DistillLoss(nn.Module):
    """Base class: `forward(student, teacher)` returns a scalar and named parts for logging.

    Subclasses set `needs`, the names of the teacher signals they read (registered in
    models/signals.py, e.g. `EMBEDDINGS`; empty for a task loss that ignores the teacher; the student is
    asked for the same signals), or override `needs_for` when their options decide them, and may define a
    dataclass `Params` of their YAML options. A loss with a `temperature` option reads `self.temperature`,
    so that a temperature schedule can override it.
    """

    # What the loss reads with its default options; an instance's `needs` are those of its own options
    # (`needs_for`), e.g. the hidden states of the towers a layer-wise loss selects.
    needs: frozenset[str] = frozenset()
    # Student signals read beyond `needs` (a task loss's own inputs, e.g. ITM logits): ask the student for both.
    student_needs: ClassVar[frozenset[str]] = frozenset()

    @dataclass
    class Params:
        """This loss's options: the YAML keys beside `weight`."""
        pass

    @classmethod
    def needs_for(cls, params: "DistillLoss.Params") -> frozenset[str]:
        """The teacher signals this loss reads with options `params` (by default the class's `needs`)."""
        return cls.needs

    def __init__(self, params: "DistillLoss.Params", context: LossContext) -> None:
        super().__init__()
        self.params = params
        self.needs = self.needs_for(params)
        self.scheduled_temperature: Optional[float] = None

    @property
    def temperature(self) -> Optional[float]:
        """The temperature in use: the value its schedule last set (`scheduled_temperature`), else
        `params.temperature`; None for a loss without a temperature."""
        if self.scheduled_temperature is not None:
            return self.scheduled_temperature
        return getattr(self.params, "temperature", None)

    def forward(
        self, student: Signals, teacher: Optional[Signals]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        raise NotImplementedError


LOSSES: Registry[type[DistillLoss]] = Registry("loss")
