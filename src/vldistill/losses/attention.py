"""Layer-wise distillation of the towers' self-attention maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vldistill.losses.base import LOSSES, ATTENTIONS, LossContext
from vldistill.losses.hidden import LayerwiseLoss, LayerwiseParams, text_token_mask
from vldistill.models.signals import Signals

ATTENTION_DISTANCES = ("kl", "mse")
HEAD_MODES = ("average", "match")


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Entrywise terms of KL(teacher || student) over the keys of each query row, (B, H, N, N); entries
    where the teacher puts no mass (masked keys) contribute 0."""
    tiny = torch.finfo(student.dtype).tiny
    return torch.xlogy(teacher, teacher) - torch.xlogy(teacher, student.clamp_min(tiny))


def masked_attention_distance(
    student: torch.Tensor, teacher: torch.Tensor, distance: str, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Distance between (B, H, N, N) attention maps over the real query rows and key columns of a
    (B, N) token mask (all when None): KL summed over keys and averaged over rows and heads, or the
    squared error averaged over the real (query, key) entries and heads."""
    rows = torch.ones(student.shape[:-1], dtype=student.dtype, device=student.device)  # (B, H, N)
    if mask is not None:
        rows = rows * mask[:, None, :]
    keys = rows[..., None, :]  # the real keys are the real tokens: (B, H, 1, N)
    if distance == "kl":
        per_row = (attention_kl(student, teacher) * keys).sum(dim=-1)
        return (per_row * rows).sum() / rows.sum()
    pair_weights = rows[..., :, None] * keys
    return ((student - teacher).pow(2) * pair_weights).sum() / pair_weights.sum()


@LOSSES.register("attention")
class AttentionDistillation(LayerwiseLoss):
    """Attention-map distillation (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers"; MiniLMv2, Wang et al., 2021, distils
    self-attention relations and decouples the head counts): per selected tower and mapped layer, the
    distance between the student's and the teacher's attention probabilities, averaged over layers,
    then over towers.

    distance: "kl" (MiniLM): KL(teacher || student) of each query row, averaged over rows; "mse": the
    squared error of the probabilities. heads: "average" averages the maps over heads on both sides
    first (works for any head counts); "match" compares head h with head h (equal head counts needed).
    Text: padded query rows and key columns are left out. A real query gives padded keys zero
    probability in both models, so its masked row is still a distribution and needs no
    renormalization. Vision: the token counts must match (same patch size and image size).
    """

    needs = ATTENTIONS
    loss_name = "attention"

    @dataclass
    class Params(LayerwiseParams):
        """This loss's options: the YAML keys beside `weight`."""
        distance: str = "kl"
        heads: str = "average"

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            super().validate(where)
            if self.distance not in ATTENTION_DISTANCES:
                raise ValueError(
                    f"{where}.distance must be one of {', '.join(ATTENTION_DISTANCES)}, got {self.distance!r}"
                )
            if self.heads not in HEAD_MODES:
                raise ValueError(f"{where}.heads must be one of {', '.join(HEAD_MODES)}, got {self.heads!r}")

    def __init__(self, params: "AttentionDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        for tower in params.towers:
            self._check_tower(tower)

    def _check_tower(self, tower: str) -> None:
        student, teacher = getattr(self.student_spec, tower), getattr(self.teacher_spec, tower)
        if self.params.heads == "match" and student.heads != teacher.heads:
            raise ValueError(
                f"{self.config_key}.heads = 'match' needs equal head counts, but the student's {tower} tower has "
                f"{student.heads} and the teacher's {teacher.heads}; use heads: average"
            )
        if tower == "vision" and student.patch_size != teacher.patch_size:
            raise ValueError(
                f"{self.config_key}.towers includes vision, but the student's patch size {student.patch_size} differs "
                f"from the teacher's {teacher.patch_size}: their attention maps have different sizes"
            )

    def _layer_loss(self, student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"{self.config_key}: the student attends over {student.shape[-1]} tokens but the teacher over "
                f"{teacher.shape[-1]}; attention maps need the same patch size and image size"
            )
        if self.params.heads == "average":
            student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
        return masked_attention_distance(student, teacher.detach(), self.params.distance, mask)

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        s_maps = self.layer_outputs(student, tower, "attentions", "student")
        t_maps = self.layer_outputs(teacher, tower, "attentions", "teacher")
        mask = text_token_mask(student, teacher) if tower == "text" else None
        return torch.stack(
            [self._layer_loss(s_maps[s - 1], t_maps[t - 1], mask) for s, t in self.layer_pairs[tower]]
        ).mean()
