"""Distillation on embeddings (features)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vldistill.losses.base import LOSSES, TEACHER_EMBEDDINGS, DistillLoss, LossContext

FEATURE_DISTANCES = ("cosine", "mse")


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean distance between row vectors: 1 - cosine similarity, or squared error summed over dims."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if distance == "mse":
        return (student - teacher).pow(2).sum(dim=-1).mean()
    raise ValueError(f"unknown feature distance {distance!r}; known: {', '.join(FEATURE_DISTANCES)}")


@LOSSES.register("feature")
class FeatureDistillation(DistillLoss):
    """Feature distillation (CLIP-KD's FD, Yang et al., 2024, "CLIP-KD: An Empirical Study of CLIP
    Model Distillation"): pull the student's image and text embeddings toward the teacher's, by
    cosine distance or MSE on L2-normalized vectors. When the embedding sizes differ, a learnable
    linear map (trained with the student, saved in checkpoints) projects the student's embeddings to
    the teacher's size first."""

    needs = frozenset({TEACHER_EMBEDDINGS})

    @dataclass
    class Params:
        distance: str = "cosine"

        def validate(self, where: str) -> None:
            if self.distance not in FEATURE_DISTANCES:
                raise ValueError(f"{where}.distance must be one of {', '.join(FEATURE_DISTANCES)}, got {self.distance!r}")

    def __init__(self, params: "FeatureDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        teacher_dim = context.teacher_embed_dim or context.student_embed_dim
        self.image_projection = self._projection(context.student_embed_dim, teacher_dim)
        self.text_projection = self._projection(context.student_embed_dim, teacher_dim)

    @staticmethod
    def _projection(student_dim: int, teacher_dim: int) -> nn.Module:
        return nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)

    def _distance(self, projection: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(projection(student), dim=-1)
        return feature_distance(projected, teacher.detach(), self.params.distance)

    def forward(self, student, teacher):
        image = self._distance(self.image_projection, student.image_embeds, teacher.image_embeds)
        text = self._distance(self.text_projection, student.text_embeds, teacher.text_embeds)
        return (image + text) / 2, {"feature_image": image.detach(), "feature_text": text.detach()}
