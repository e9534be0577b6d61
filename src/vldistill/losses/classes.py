"""Distillation on class logits computed against stored class-name embeddings (prompt distillation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from vldistill.losses.base import LOSSES, DistillLoss, LossContext
from vldistill.losses.logits import soft_target_kl
from vldistill.models.prompts import PROJECTED_IMAGE_EMBEDS

STUDENT_EMBEDDINGS = ("projected", "own")


@LOSSES.register("class_kd")
class ClassLogitKD(DistillLoss):
    """Class-logit distillation of PromptKD (Li et al., 2024, "PromptKD: Unsupervised Prompt Distillation for
    Vision-Language Models"): the teacher's text embeddings of the class names W (C, D) are computed once and
    stored; on unlabeled images, teacher logits s_t W^T and student logits f(x) W^T, both scaled by the teacher's
    (fixed) logit scale, give T^2 KL(softmax(teacher/T) || softmax(student/T)) per image, batch-mean.

    `student: projected` (PromptKD) reads the student's image embeddings mapped into the teacher's space by its
    learnable projector (`student.prompts.projector_dim: teacher`); `own` reads its own image embeddings, which
    then must have the teacher's size. The class embeddings come from the run (`LossContext.class_embeddings`)."""

    needs = frozenset({"image_embeds", "logit_scale"})
    student_needs = frozenset({PROJECTED_IMAGE_EMBEDS.name})  # with the default `student: projected`

    @dataclass
    class Params:
        """This loss's options: the YAML keys beside `weight`."""

        temperature: float = 1.0
        student: str = "projected"

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            if self.temperature <= 0:
                raise ValueError(f"{where}.temperature must be > 0, got {self.temperature}")
            if self.student not in STUDENT_EMBEDDINGS:
                raise ValueError(f"{where}.student must be one of {', '.join(STUDENT_EMBEDDINGS)}, got {self.student!r}")

    def __init__(self, params: "ClassLogitKD.Params", context: LossContext) -> None:
        super().__init__(params, context)
        where = f"{context.config_key}.class_kd"
        if context.class_embeddings is None:
            raise ValueError(
                f"{where} needs the teacher's class-name embeddings: it runs under `vldistill prompt-distill`, which "
                "computes and stores them"
            )
        if params.student == "own" and context.student_embed_dim != context.class_embeddings.shape[1]:
            raise ValueError(
                f"{where}.student own: the student's {context.student_embed_dim}-d embeddings cannot be compared with "
                f"the teacher's {context.class_embeddings.shape[1]}-d class embeddings; use student: projected with "
                "student.prompts.projector_dim: teacher"
            )
        self.student_needs = frozenset({PROJECTED_IMAGE_EMBEDS.name}) if params.student == "projected" else frozenset()
        self.register_buffer("class_embeddings", F.normalize(context.class_embeddings.float(), dim=-1), persistent=False)

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        embeds = student.projected_image_embeds if self.params.student == "projected" else student.image_embeds
        if embeds is None:
            raise ValueError("class_kd with student: projected needs a prompted student with a projector")
        scale = teacher.logit_scale.detach()
        classes = self.class_embeddings.to(embeds.dtype)
        s_logits = scale * F.normalize(embeds, dim=-1) @ classes.T
        t_logits = scale * teacher.image_embeds.detach() @ classes.T
        loss = soft_target_kl(s_logits, t_logits, self.temperature)
        agreement = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
        return loss, {"class_kd": loss.detach(), "class_agreement": agreement.detach()}
