"""The student's own task losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vldistill.losses.base import LOSSES, DistillLoss, LossContext


def clip_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) logit matrix whose diagonal holds the true pairs."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


@LOSSES.register("clip")
class CLIPLoss(DistillLoss):
    """Symmetric image-text InfoNCE (Radford et al., 2021, "Learning Transferable Visual Models
    From Natural Language Supervision"). Needs no teacher."""

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        loss = clip_contrastive_loss(student.logits_per_image())
        return loss, {"clip": loss.detach()}


def sigmoid_pairwise_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP loss over a (B, B) logit matrix: -(1/B) sum_ij log sigmoid(z_ij logits_ij), z = +1 on the
    diagonal (true pairs) and -1 elsewhere."""
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


@LOSSES.register("siglip")
class SigLIPLoss(DistillLoss):
    """Sigmoid pairwise image-text loss (Zhai et al., 2023, "Sigmoid Loss for Language Image
    Pre-Training"): every (image, text) pair of the batch is an independent binary problem on
    t * x_i.y_j + b, with t the student's logit scale and b a learnable scalar bias owned by this loss
    (initialized to `init_bias`, -10 as in the paper, so that the many negatives start near zero loss).
    Needs no teacher."""

    @dataclass
    class Params:
        """This loss's options: the YAML keys beside `weight`."""
        init_bias: float = -10.0

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            if not math.isfinite(self.init_bias):
                raise ValueError(f"{where}.init_bias must be a finite number, got {self.init_bias}")

    def __init__(self, params: "SigLIPLoss.Params", context: LossContext) -> None:
        super().__init__(params, context)
        self.bias = nn.Parameter(torch.tensor(float(params.init_bias)))

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        loss = sigmoid_pairwise_loss(student.logits_per_image() + self.bias)
        return loss, {"siglip": loss.detach(), "siglip_bias": self.bias.detach()}
