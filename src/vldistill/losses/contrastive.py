"""The student's own task loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vldistill.losses.base import LOSSES, DistillLoss


def clip_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) logit matrix whose diagonal holds the true pairs."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


@LOSSES.register("clip")
class CLIPLoss(DistillLoss):
    """Symmetric image-text InfoNCE (Radford et al., 2021, "Learning Transferable Visual Models
    From Natural Language Supervision"). Needs no teacher."""

    def forward(self, student, teacher):
        loss = clip_contrastive_loss(student.logits_per_image())
        return loss, {"clip": loss.detach()}
