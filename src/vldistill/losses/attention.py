"""Layer-wise distillation of the modules' self-attention maps, and the attention-map distances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vldistill.losses.base import LOSSES, ATTENTIONS, LossContext
from vldistill.losses.hidden import TEXT_TOKEN_MODULES, LayerwiseLoss, LayerwiseParams, text_token_mask
from vldistill.models.signals import Signals

ATTENTION_DISTANCES = ("kl", "mse")
HEAD_MODES = ("average", "match")


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Entrywise terms of KL(teacher || student) over the keys of each query row, (B, H, N, N); entries
    where the teacher puts no mass (masked keys) contribute 0."""
    tiny = torch.finfo(student.dtype).tiny
    return torch.xlogy(teacher, teacher) - torch.xlogy(teacher, student.clamp_min(tiny))


@dataclass
class AttentionMapParams:
    """How attention maps are compared: `distance` "kl" or "mse", `heads` "average" or "match"."""

    distance: str = "kl"
    heads: str = "average"

    def validate_maps(self, where: str) -> None:
        """Raise an error naming `where`.<field> when distance or heads is impossible."""
        if self.distance not in ATTENTION_DISTANCES:
            raise ValueError(f"{where}.distance must be one of {', '.join(ATTENTION_DISTANCES)}, got {self.distance!r}")
        if self.heads not in HEAD_MODES:
            raise ValueError(f"{where}.heads must be one of {', '.join(HEAD_MODES)}, got {self.heads!r}")


def check_heads(loss: LayerwiseLoss, module: str) -> None:
    """Raise an error naming `<loss key>.heads` when heads = "match" but the module's head counts differ."""
    student, teacher = loss.module_spec(module, "student"), loss.module_spec(module, "teacher")
    if loss.params.heads == "match" and student.heads != teacher.heads:
        raise ValueError(
            f"{loss.config_key}.heads = 'match' needs equal head counts, but the student's {module} module has "
            f"{student.heads} and the teacher's {teacher.heads}; use heads: average"
        )


def attention_map_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    params: AttentionMapParams,
    query_mask: Optional[torch.Tensor],
    key_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """`masked_attention_distance` of one mapped layer's maps, averaged over heads first when
    `params.heads` is "average"; the teacher's maps get no gradient."""
    if params.heads == "average":
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    return masked_attention_distance(student, teacher.detach(), params.distance, query_mask, key_mask)


def masked_attention_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance: str,
    query_mask: Optional[torch.Tensor],
    key_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Distance between (B, H, N_query, N_key) attention maps over the real query rows of a (B, N_query)
    mask and the real key columns of a (B, N_key) mask (all when None): KL summed over keys and averaged
    over rows and heads, or the squared error averaged over the real (query, key) entries and heads."""
    rows = torch.ones(student.shape[:-1], dtype=student.dtype, device=student.device)  # (B, H, N_query)
    if query_mask is not None:
        rows = rows * query_mask[:, None, :]
    keys = torch.ones_like(student[..., :1, :])  # (B, H, 1, N_key)
    if key_mask is not None:
        keys = keys * key_mask[:, None, None, :]
    if distance == "kl":
        per_row = (attention_kl(student, teacher) * keys).sum(dim=-1)
        return (per_row * rows).sum() / rows.sum()
    pair_weights = rows[..., :, None] * keys
    return ((student - teacher).pow(2) * pair_weights).sum() / pair_weights.sum()


@LOSSES.register("attention")
class AttentionDistillation(LayerwiseLoss):
    """Attention-map distillation (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers"; MiniLMv2, Wang et al., 2021, distils
    self-attention relations and decouples the head counts): per selected module (vision, text, BLIP's
    fusion encoder and captioning decoder) and mapped layer, the distance between the student's and the
    teacher's self-attention probabilities, averaged over layers, then over modules.

    distance: "kl" (MiniLM): KL(teacher || student) of each query row, averaged over rows; "mse": the
    squared error of the probabilities. heads: "average" averages the maps over heads on both sides
    first (works for any head counts); "match" compares head h with head h (equal head counts needed).
    Text, fusion and decoder: padded query rows and key columns are left out. A real query gives padded
    keys zero probability in both models, so its masked row is still a distribution and needs no
    renormalization. Vision: the token counts must match (same patch size and image size).
    """

    needs = ATTENTIONS
    loss_name = "attention"
    signal_kind = "attentions"

    @dataclass
    class Params(AttentionMapParams, LayerwiseParams):
        """This loss's options: the YAML keys beside `weight`."""

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            LayerwiseParams.validate(self, where)
            self.validate_maps(where)

    def __init__(self, params: "AttentionDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        for tower in params.modules:
            check_heads(self, tower)
        student, teacher = self.student_spec.vision, self.teacher_spec.vision
        if "vision" in params.modules and student.patch_size != teacher.patch_size:
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
        return attention_map_loss(student, teacher, self.params, mask, mask)

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        s_maps = self.layer_outputs(student, tower, "student")
        t_maps = self.layer_outputs(teacher, tower, "teacher")
        mask = text_token_mask(student, teacher) if tower in TEXT_TOKEN_MODULES else None
        return torch.stack(
            [self._layer_loss(s_maps[s - 1], t_maps[t - 1], mask) for s, t in self.layer_pairs[tower]]
        ).mean()
