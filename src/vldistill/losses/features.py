"""Distillation on embeddings (features)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vldistill.losses.base import LOSSES, EMBEDDINGS, DistillLoss, LossContext

FEATURE_DISTANCES = ("cosine", "mse")
FEATURE_TOWERS = ("image", "text")


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean distance between row vectors: 1 - cosine similarity, or squared error summed over dims."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if distance == "mse":
        return (student - teacher).pow(2).sum(dim=-1).mean()
    raise ValueError(f"unknown feature distance {distance!r}; known: {', '.join(FEATURE_DISTANCES)}")


def student_to_teacher_projection(context: LossContext, adapter: bool = False) -> nn.Module:
    """Identity when the embedding sizes agree (unless `adapter`), else a learnable bias-free linear map
    student -> teacher; with `adapter` and equal sizes, a learnable map that starts as the identity."""
    student_dim = context.student_embed_dim
    teacher_dim = context.teacher_embed_dim or student_dim
    if student_dim != teacher_dim:
        return nn.Linear(student_dim, teacher_dim, bias=False)
    if not adapter:
        return nn.Identity()
    projection = nn.Linear(student_dim, teacher_dim, bias=False)
    nn.init.eye_(projection.weight)
    return projection


@LOSSES.register("feature")
class FeatureDistillation(DistillLoss):
    """Feature distillation (CLIP-KD's FD, Yang et al., 2024, "CLIP-KD: An Empirical Study of CLIP
    Model Distillation"): pull the student's image and text embeddings toward the teacher's, by
    cosine distance or MSE on L2-normalized vectors. When the embedding sizes differ, a learnable
    linear map (trained with the student, saved in checkpoints) projects the student's embeddings to
    the teacher's size first."""

    needs = EMBEDDINGS

    @dataclass
    class Params:
        """This loss's options: the YAML keys beside `weight`. `towers`: the embeddings pulled (image, text or
        both; image alone for training on images without captions, as prompt distillation does). `adapter`: a
        learnable matrix even when the embedding sizes agree (PromptKD's feature alignment; starts as the identity)."""
        distance: str = "cosine"
        towers: list[str] = field(default_factory=lambda: list(FEATURE_TOWERS))
        adapter: bool = False

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            if self.distance not in FEATURE_DISTANCES:
                raise ValueError(f"{where}.distance must be one of {', '.join(FEATURE_DISTANCES)}, got {self.distance!r}")
            unknown = [tower for tower in self.towers if tower not in FEATURE_TOWERS]
            if not self.towers or unknown or len(set(self.towers)) != len(self.towers):
                raise ValueError(f"{where}.towers must list distinct towers of {', '.join(FEATURE_TOWERS)}, got {self.towers!r}")

    @classmethod
    def needs_for(cls, params: "FeatureDistillation.Params") -> frozenset[str]:
        """The embeddings of the selected towers (and the logit scale, as every embedding loss lists it)."""
        return frozenset({*(f"{tower}_embeds" for tower in params.towers), "logit_scale"})

    def __init__(self, params: "FeatureDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        for tower in params.towers:  # image_projection / text_projection: the names checkpoints hold
            setattr(self, f"{tower}_projection", student_to_teacher_projection(context, params.adapter))

    def _distance(self, projection: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(projection(student), dim=-1)
        return feature_distance(projected, teacher.detach(), self.params.distance)

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        parts = {
            f"feature_{tower}": self._distance(projection, student[f"{tower}_embeds"], teacher[f"{tower}_embeds"])
            for tower, projection in ((tower, getattr(self, f"{tower}_projection")) for tower in self.params.towers)
        }
        loss = torch.stack(list(parts.values())).mean()
        return loss, {name: value.detach() for name, value in parts.items()}


def diagonal_infonce(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise InfoNCE over a (B, B) logit matrix whose diagonal holds the positives."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


@LOSSES.register("icl")
class InteractiveContrastiveLearning(DistillLoss):
    """Interactive contrastive learning (CLIP-KD's ICL, Yang et al., 2024, "CLIP-KD: An Empirical Study
    of CLIP Model Distillation"): InfoNCE of the student's image embeddings against the teacher's text
    embeddings, and of the student's text embeddings against the teacher's image embeddings (true pairs
    on the diagonal, the teacher's other embeddings as negatives), averaged over the two directions.

    The student's embeddings are mapped into the teacher's space (a learnable bias-free linear map per
    modality when the sizes differ) and L2-normalized. The logits are scaled by the teacher's (fixed,
    detached) logit scale rather than the student's: the similarities live in the teacher's space, whose
    scale the teacher has calibrated, and the student's own scale stays trained by its task loss alone.
    """

    needs = EMBEDDINGS

    def __init__(self, params: "DistillLoss.Params", context: LossContext) -> None:
        super().__init__(params, context)
        self.image_projection = student_to_teacher_projection(context)
        self.text_projection = student_to_teacher_projection(context)

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        scale = teacher.logit_scale.detach()
        image = F.normalize(self.image_projection(student.image_embeds), dim=-1)
        text = F.normalize(self.text_projection(student.text_embeds), dim=-1)
        image_to_text = diagonal_infonce(scale * image @ teacher.text_embeds.detach().t())
        text_to_image = diagonal_infonce(scale * text @ teacher.image_embeds.detach().t())
        loss = (image_to_text + text_to_image) / 2
        return loss, {"icl_i2t": image_to_text.detach(), "icl_t2i": text_to_image.detach()}
