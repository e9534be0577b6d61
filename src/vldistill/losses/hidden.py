"""Layer-wise distillation of the towers' hidden states, and what the layer-wise losses share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from vldistill.losses.base import LOSSES, HIDDEN_STATES, DistillLoss, LossContext
from vldistill.models.inherit import uniform_layer_map
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec

TOWERS = ("vision", "text")
LAYER_MAPS = ("uniform", "last")
# Signals fields are named image_* / text_*.
OUTPUT_PREFIX = {"vision": "image", "text": "text"}


@dataclass
class LayerwiseParams:
    """Options of a layer-wise loss: the towers to distill, and which teacher layer each student layer
    learns from: "uniform" (every k-th teacher layer, as weight inheritance picks them), "last" (the
    teacher's last k layers, k = student layers) or a list of 1-based teacher layers, one per student
    layer. (`layer_map` is typed Any because it is a string or a list; `validate` checks it.)"""

    towers: list[str] = field(default_factory=lambda: list(TOWERS))
    layer_map: Any = "uniform"

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if not self.towers or any(t not in TOWERS for t in self.towers) or len(set(self.towers)) != len(self.towers):
            raise ValueError(
                f"{where}.towers must be a non-empty list of distinct {' / '.join(TOWERS)}, got {self.towers!r}"
            )
        if self.layer_map not in LAYER_MAPS and not is_layer_list(self.layer_map):
            raise ValueError(
                f"{where}.layer_map must be one of {', '.join(LAYER_MAPS)} or a non-empty list of 1-based "
                f"teacher layer indices, got {self.layer_map!r}"
            )


def is_layer_list(value: Any) -> bool:
    """True for a non-empty list of ints >= 1 (1-based layer indices)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in value)
    )


def layer_pairs(
    layer_map: Any, student_layers: int, teacher_layers: int, where: str, tower: str
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, both 1-based (= hidden_states indices), one per student layer."""
    if layer_map == "uniform":
        return [(i + 1, t + 1) for i, t in enumerate(uniform_layer_map(student_layers, teacher_layers))]
    if layer_map == "last":
        if student_layers > teacher_layers:
            raise ValueError(
                f"{where}.layer_map = 'last' maps the student's {student_layers} {tower} layers onto the teacher's "
                f"last {student_layers}, but the teacher has only {teacher_layers}"
            )
        offset = teacher_layers - student_layers
        return [(i + 1, offset + i + 1) for i in range(student_layers)]
    if len(layer_map) != student_layers:
        raise ValueError(
            f"{where}.layer_map has {len(layer_map)} entries but the student's {tower} tower has {student_layers} "
            "layers; give one teacher layer per student layer (or select towers with equal depth)"
        )
    if max(layer_map) > teacher_layers:
        raise ValueError(
            f"{where}.layer_map = {layer_map} names a teacher layer beyond the teacher's {tower} tower "
            f"({teacher_layers} layers, indices 1..{teacher_layers})"
        )
    return [(i + 1, t) for i, t in enumerate(layer_map)]


def text_token_mask(student: Signals, teacher: Signals) -> Optional[torch.Tensor]:
    """(B, N) 1 for real text tokens (the student's mask, else the teacher's; both see the same batch)."""
    mask = student.text_attention_mask if student.text_attention_mask is not None else teacher.text_attention_mask
    return None if mask is None else mask.float()


class LayerwiseLoss(DistillLoss):
    """Base of the layer-wise losses: checks the specs and maps each selected tower's layers at construction.

    `self.layer_pairs[tower]` lists (student layer, teacher layer), 1-based. Subclasses set `loss_name`
    (their registered name) and `_tower_loss`; the loss is the mean over the selected towers.
    """

    loss_name: ClassVar[str]

    def __init__(self, params: LayerwiseParams, context: LossContext) -> None:
        super().__init__(params, context)
        self.config_key = f"{context.config_key}.{self.loss_name}"
        self.student_spec, self.teacher_spec = self._specs(context)
        self.layer_pairs = {
            tower: layer_pairs(
                params.layer_map,
                getattr(self.student_spec, tower).layers,
                getattr(self.teacher_spec, tower).layers,
                self.config_key,
                tower,
            )
            for tower in params.towers
        }

    def _specs(self, context: LossContext) -> tuple[DualEncoderSpec, DualEncoderSpec]:
        if context.student_spec is None or context.teacher_spec is None:
            raise ValueError(
                f"{self.config_key} needs the student's and the teacher's tower specs (layers, widths, heads): "
                "build it with LossContext(student_spec=..., teacher_spec=...)"
            )
        return context.student_spec, context.teacher_spec

    def layer_outputs(self, output: Signals, tower: str, kind: str, role: str) -> tuple[torch.Tensor, ...]:
        """The per-layer `kind` ("hidden_states" or "attentions") of one tower; a ValueError if absent."""
        values = getattr(output, f"{OUTPUT_PREFIX[tower]}_{kind}")
        if values is None:
            raise ValueError(f"{self.config_key} needs the {role}'s {tower} {kind}; run it with output_{kind}=True")
        return values

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        parts = {f"{self.loss_name}_{tower}": self._tower_loss(tower, student, teacher) for tower in self.params.towers}
        loss = torch.stack(list(parts.values())).mean()
        return loss, {k: v.detach() for k, v in parts.items()}


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the features of the tokens where `mask` (B, N) is 1 (all when None)."""
    per_token = (student - teacher).pow(2).mean(dim=-1)
    return per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum()


@LOSSES.register("hidden")
class HiddenStateDistillation(LayerwiseLoss):
    """Hidden-representation distillation (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural
    Language Understanding"; for CLIP-style towers Kuang et al., 2023, "DLIP: Distilling
    Language-Image Pre-training"): per selected tower, the MSE between each student layer's output
    hidden states and those of its mapped teacher layer (hidden_states[i] is layer i's output;
    [0], the embeddings, is not distilled), averaged over layers, then over towers.

    When the widths differ, a learnable bias-free linear map per mapped layer and tower (student width
    -> teacher width, TinyBERT's W_h) maps the student's states first. Text: padded tokens are left out
    (text_attention_mask). Vision: if the token counts differ (another patch size), only the CLS token
    (index 0) is compared.
    """

    needs = HIDDEN_STATES
    loss_name = "hidden"

    @dataclass
    class Params(LayerwiseParams):
        """This loss's options: the YAML keys beside `weight`."""
        pass

    def __init__(self, params: "HiddenStateDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        self.maps = nn.ModuleDict({tower: self._tower_maps(tower) for tower in params.towers})

    def _tower_maps(self, tower: str) -> nn.ModuleList:
        s_width, t_width = getattr(self.student_spec, tower).width, getattr(self.teacher_spec, tower).width
        return nn.ModuleList(
            nn.Identity() if s_width == t_width else nn.Linear(s_width, t_width, bias=False)
            for _ in self.layer_pairs[tower]
        )

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        s_states = self.layer_outputs(student, tower, "hidden_states", "student")
        t_states = self.layer_outputs(teacher, tower, "hidden_states", "teacher")
        mask = text_token_mask(student, teacher) if tower == "text" else None
        losses = []
        for (s_layer, t_layer), layer_map in zip(self.layer_pairs[tower], self.maps[tower]):
            s, t = s_states[s_layer], t_states[t_layer].detach()
            if tower == "vision" and s.shape[1] != t.shape[1]:
                s, t = s[:, :1], t[:, :1]
            losses.append(masked_mse(layer_map(s), t, mask))
        return torch.stack(losses).mean()
