"""Relational distillation: match how the student and the teacher relate the samples of a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vldistill.losses.base import LOSSES, EMBEDDINGS, DistillLoss, TemperatureParams
from vldistill.losses.logits import soft_target_kl


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, B') cosine similarities between the rows of `a` and the rows of `b`."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The (B, B - 1) entries of a square (B, B) matrix without its diagonal, row by row."""
    n = matrix.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=matrix.device)
    return matrix[keep].view(n, n - 1)


@LOSSES.register("crd")
class ContrastiveRelationalDistillation(DistillLoss):
    """In-batch contrastive relational distillation, in the relational/contrastive distillation family
    studied for CLIP by CLIP-KD (Yang et al., 2024, "CLIP-KD: An Empirical Study of CLIP Model
    Distillation") and introduced as CRD by Tian et al., 2020 ("Contrastive Representation
    Distillation"). It is not Tian et al.'s memory-bank NCE objective; it computes exactly:

    with T = `temperature` and S(a, b) the (B, B) cosine similarities of rows of a and b,
      image: KL(teacher || student) of the row softmaxes of S(img, img) / T, diagonal removed;
      text:  the same on S(txt, txt) / T, diagonal removed;
      cross: the same on S(img, txt) / T, all entries (the diagonal holds the true pairs);
    each averaged over rows, the loss the mean of the three. Each model uses its own embeddings, so
    the sizes may differ and nothing is learned here.
    """

    needs = EMBEDDINGS

    @dataclass
    class Params(TemperatureParams):
        """This loss's options: the YAML keys beside `weight`."""
        temperature: float = 0.1

    def _relation_kl(self, student: torch.Tensor, teacher: torch.Tensor, drop_diagonal: bool) -> torch.Tensor:
        t = self.temperature
        if drop_diagonal:
            student, teacher = off_diagonal(student), off_diagonal(teacher)
        return soft_target_kl(student / t, teacher.detach() / t, temperature=1.0)

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        s_img, s_txt = student.image_embeds, student.text_embeds
        t_img, t_txt = teacher.image_embeds, teacher.text_embeds
        image = self._relation_kl(cosine_matrix(s_img, s_img), cosine_matrix(t_img, t_img), drop_diagonal=True)
        text = self._relation_kl(cosine_matrix(s_txt, s_txt), cosine_matrix(t_txt, t_txt), drop_diagonal=True)
        cross = self._relation_kl(cosine_matrix(s_img, s_txt), cosine_matrix(t_img, t_txt), drop_diagonal=False)
        loss = (image + text + cross) / 3
        return loss, {"crd_image": image.detach(), "crd_text": text.detach(), "crd_cross": cross.detach()}
