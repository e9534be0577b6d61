"""Cascade inference for zero-shot classification: the student answers when it is confident, the teacher
answers the rest. Each model classifies against its own class embeddings, built once from the class
prompts with its own tokenizer; only the rows the student is unsure of go through the teacher's image tower,
in one batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.data.preprocess import model_pixel_values
from vldistill.data.tokenizer import make_tokenize
from vldistill.eval.zeroshot import zero_shot_classifier

CRITERIA = ("max_prob", "margin", "entropy")


def check_criterion(criterion: str) -> None:
    """Raise a ValueError naming `criterion` when it is not one of CRITERIA."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown cascade criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")


def confidence(probabilities: torch.Tensor, criterion: str) -> torch.Tensor:
    """(N,) confidence in [0, 1] of each row of class probabilities (N, C), computed in float64:

    max_prob: the largest probability;
    margin: the largest minus the second largest probability (1 with a single class);
    entropy: negative entropy rescaled to [0, 1], 1 - H(p) / ln C (1 for a one-hot row, 0 for the uniform
    one; 1 with a single class).
    """
    check_criterion(criterion)
    if probabilities.ndim != 2 or probabilities.shape[1] == 0:
        raise ValueError(f"need class probabilities (N, C) with C > 0, got shape {tuple(probabilities.shape)}")
    p = probabilities.double()
    classes = p.shape[1]
    if criterion == "max_prob":
        return p.max(dim=1).values
    if classes == 1:
        return torch.ones(p.shape[0], dtype=torch.float64)
    if criterion == "margin":
        top = p.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    entropy = -torch.special.xlogy(p, p).sum(dim=1)
    return (1.0 - entropy / math.log(classes)).clamp(0.0, 1.0)


def as_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) as a tensor (shares a numpy array's memory)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class ZeroShotModel:
    """A dual encoder ready to classify images among fixed classes: its class embeddings (C, D) and its own
    image preparation (size, mean/std from its `input_spec`) and logit scale (read once). The model is put in
    eval mode."""

    def __init__(self, model: nn.Module, class_embeds: torch.Tensor) -> None:
        if class_embeds.ndim != 2 or class_embeds.shape[0] == 0:
            raise ValueError(f"need class embeddings (C, D) with C > 0, got shape {tuple(class_embeds.shape)}")
        self.model = model.eval()
        self.device = _device(model)
        self.class_embeds = class_embeds.to(self.device)
        with torch.no_grad():
            self.logit_scale = float(model.logit_scale)
        spec = model.input_spec
        self._image = (spec.image_size, tuple(spec.image_mean), tuple(spec.image_std))

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        classnames: list[str],
        templates: list[str],
        batch_size: int = 256,
    ) -> "ZeroShotModel":
        """`model` with the prompt-ensembled embeddings of `classnames` (see eval.zeroshot.zero_shot_classifier),
        tokenized with `tokenizer` at the model's text length and padding."""
        spec = model.input_spec
        tokenize = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)
        return cls(model, zero_shot_classifier(model, tokenize, classnames, templates, batch_size, progress=False))

    @property
    def classes(self) -> int:
        """Number of classes."""
        return self.class_embeds.shape[0]

    @torch.inference_mode()
    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, C) float32 logits of uint8 images (N, H, W, 3): logit scale times the cosine similarity of each
        image to each class (a SigLIP bias would shift every class alike, so it is left out)."""
        pixels = model_pixel_values(as_images(images), *self._image).to(self.device)
        embeds = self.model.encode_image(pixels)
        return (self.logit_scale * embeds @ self.class_embeds.T).float().cpu()

    def batched_logits(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """`logits` of many images, `batch_size` at a time."""
        images = as_images(images)
        return torch.cat([self.logits(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


@dataclass(frozen=True)
class CascadeOutput:
    """What a cascade answered: the class of each row (N,), which rows the teacher answered (N,) bool, and
    the student's confidence in each row (N,) float64."""

    predictions: torch.Tensor
    teacher_rows: torch.Tensor
    confidence: torch.Tensor

    @property
    def teacher_call_rate(self) -> float:
        """The fraction of rows the teacher answered."""
        return self.teacher_rows.double().mean().item()


class CascadeClassifier:
    """Zero-shot classification by a student and, below a confidence `threshold`, a teacher.

    The student classifies every row; a row whose `confidence(criterion)` is below `threshold` is answered by
    the teacher instead; those rows go through the teacher in one batch. Confidences lie in [0, 1]: a
    threshold of 0 never calls the teacher, one above 1 always does. Both models must know the same classes
    in the same order.
    """

    def __init__(
        self, student: ZeroShotModel, teacher: ZeroShotModel, threshold: float, criterion: str = "max_prob"
    ) -> None:
        check_criterion(criterion)
        if student.classes != teacher.classes:
            raise ValueError(
                f"the student knows {student.classes} classes and the teacher {teacher.classes}: they must share one class list"
            )
        if not math.isfinite(threshold):
            raise ValueError(f"cascade threshold must be a finite number, got {threshold}")
        self.student, self.teacher = student, teacher
        self.threshold, self.criterion = float(threshold), criterion

    def __call__(self, images: np.ndarray | torch.Tensor) -> CascadeOutput:
        """Classify uint8 images (N, H, W, 3): the merged predictions and the rows the teacher answered."""
        images = as_images(images)
        student_logits = self.student.logits(images)
        confident = confidence(student_logits.double().softmax(dim=1), self.criterion)
        predictions = student_logits.argmax(dim=1)
        uncertain = confident < self.threshold
        if uncertain.any():
            predictions[uncertain] = self.teacher.logits(images[uncertain]).argmax(dim=1)
        return CascadeOutput(predictions, uncertain, confident)
