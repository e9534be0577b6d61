"""Distillation on similarity logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vldistill.losses.base import LOSSES, EMBEDDINGS, DistillLoss, TemperatureParams


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), rows are distributions, batch-mean."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@LOSSES.register("kd")
class SoftTargetKD(DistillLoss):
    """Soft-target KD with temperature T and the T^2 factor (Hinton et al., 2015, "Distilling the
    Knowledge in a Neural Network"), on the image->text and text->image similarity logits of a batch
    (as in CLIP-KD, Yang et al., 2024), averaged over both directions. Each model uses its own
    logit scale."""

    needs = EMBEDDINGS

    Params = TemperatureParams

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        t = self.temperature
        s_logits, t_logits = student.logits_per_image(), teacher.logits_per_image().detach()
        image_to_text = soft_target_kl(s_logits, t_logits, t)
        text_to_image = soft_target_kl(student.logits_per_text(), teacher.logits_per_text().detach(), t)
        loss = (image_to_text + text_to_image) / 2
        return loss, {"kd_i2t": image_to_text.detach(), "kd_t2i": text_to_image.detach()}


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-sum_j softmax(teacher)_ij log softmax(student)_ij, averaged over rows i."""
    return -(F.softmax(teacher_logits, dim=-1) * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


@LOSSES.register("affinity")
class AffinityMimicking(DistillLoss):
    """Affinity mimicking (Wu et al., 2023, "TinyCLIP: CLIP Distillation via Affinity Mimicking and
    Weight Inheritance"): the soft cross-entropy between the teacher's and the student's image->text
    affinities (row softmax of each model's own scaled logits divided by `temperature`) and likewise
    text->image, averaged over the two directions. Unlike `kd` it is a cross-entropy (the KL plus the
    teacher's constant entropy) and has no T^2 factor."""

    needs = EMBEDDINGS

    Params = TemperatureParams

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        t = self.temperature
        s_logits, t_logits = student.logits_per_image() / t, teacher.logits_per_image().detach() / t
        image_to_text = soft_cross_entropy(s_logits, t_logits)
        text_to_image = soft_cross_entropy(student.logits_per_text() / t, teacher.logits_per_text().detach() / t)
        loss = (image_to_text + text_to_image) / 2
        return loss, {"affinity_i2t": image_to_text.detach(), "affinity_t2i": text_to_image.detach()}
