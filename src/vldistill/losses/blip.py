"""Losses of BLIP-style models (signal contract: models/blip_signals.py): the image-text matching and
captioning task losses of BLIP, and their distillation with soft targets as in DLIP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vldistill.losses.base import LOSSES, DistillLoss, TemperatureParams
from vldistill.losses.logits import soft_target_kl
from vldistill.models.blip_signals import IGNORE_INDEX, ITM_BLOCKS
from vldistill.models.signals import Signals

ITM = frozenset({"itm_logits", "itm_negatives"})
CAPTION = frozenset({"token_logits", "caption_labels"})


def _require(signals: Optional[Signals], names: frozenset[str], loss: str, model: str) -> None:
    missing = sorted(name for name in names if signals is None or signals.get(name) is None)
    if missing:
        raise ValueError(f"loss {loss!r} needs the {model}'s {', '.join(missing)}, which its forward pass did not return")


def itm_labels(rows: int, device: torch.device) -> torch.Tensor:
    """(3B,) ITM targets of `itm_logits`' three blocks: 1 (match) for the B positive pairs, 0 for the 2B negatives."""
    if rows % ITM_BLOCKS:
        raise ValueError(f"itm_logits has {rows} rows, not a multiple of {ITM_BLOCKS} (positives and two negative blocks)")
    labels = torch.zeros(rows, dtype=torch.long, device=device)
    labels[: rows // ITM_BLOCKS] = 1
    return labels


@LOSSES.register("itm")
class ImageTextMatching(DistillLoss):
    """Image-text matching (Li et al., 2022, "BLIP: Bootstrapping Language-Image Pre-training for Unified
    Vision-Language Understanding and Generation"): the cross-entropy of the student's 2-way `itm_logits`
    against label 1 for the batch's pairs and 0 for the hard negatives (a text per image and an image per
    text, sampled from in-batch similarity), averaged over the 3B rows. A task loss: no teacher."""

    student_needs = frozenset({"itm_logits"})

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        _require(student, frozenset({"itm_logits"}), "itm", "student")
        logits = student.itm_logits
        loss = F.cross_entropy(logits, itm_labels(logits.shape[0], logits.device))
        return loss, {"itm": loss.detach()}


@dataclass
class CaptionParams:
    """Options of the captioning cross-entropy."""

    label_smoothing: float = 0.1  # BLIP's (its text decoder's CrossEntropyLoss)

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{where}.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def _real_token_count(labels: torch.Tensor, loss: str) -> int:
    count = int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError(f"loss {loss!r}: the batch's caption_labels hold no token to predict (all -100)")
    return count


@LOSSES.register("lm")
class CaptioningLM(DistillLoss):
    """Captioning language modelling (BLIP, Li et al., 2022): the cross-entropy of the decoder's
    `token_logits` against `caption_labels` (the next token of the caption), positions labelled -100
    (padding, BOS, prompt) ignored, the mean over the batch's real tokens, with BLIP's label smoothing
    (0.1 by default, as its decoder's loss). A task loss: no teacher."""

    student_needs = CAPTION

    Params = CaptionParams

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        _require(student, CAPTION, "lm", "student")
        logits, labels = student.token_logits, student.caption_labels
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"loss 'lm': token_logits {tuple(logits.shape)} and caption_labels {tuple(labels.shape)} differ in (B, T)")
        _real_token_count(labels, "lm")
        loss = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=self.params.label_smoothing
        )
        return loss, {"lm": loss.detach()}


@LOSSES.register("itm_kd")
class ITMDistillation(DistillLoss):
    """ITM distillation with soft targets (DLIP, Kuang et al., 2023, "DLIP: Distilling Language-Image
    Pre-training"; Hinton et al., 2015): T^2 KL(softmax(teacher / T) || softmax(student / T)) over the 2
    ITM classes of every row of `itm_logits`, averaged over the 3B rows. Teacher and student must score the
    same pairs: the student is given the teacher's `itm_negatives` (an error if its own differ)."""

    needs = ITM

    Params = TemperatureParams

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        _require(student, frozenset({"itm_logits"}), "itm_kd", "student")
        _require(teacher, frozenset({"itm_logits"}), "itm_kd", "teacher")
        s_logits, t_logits = student.itm_logits, teacher.itm_logits.detach()
        if s_logits.shape != t_logits.shape:
            raise ValueError(f"loss 'itm_kd': student itm_logits {tuple(s_logits.shape)} vs teacher {tuple(t_logits.shape)}")
        negatives = (student.itm_negatives, teacher.itm_negatives)
        if all(n is not None for n in negatives) and not torch.equal(negatives[0].cpu(), negatives[1].cpu()):
            raise ValueError("loss 'itm_kd': the student scored other ITM negatives than the teacher; pass it the teacher's itm_negatives")
        loss = soft_target_kl(s_logits, t_logits, self.temperature)
        return loss, {"itm_kd": loss.detach()}


@LOSSES.register("lm_kd")
class CaptionDistillation(DistillLoss):
    """Captioning distillation with soft targets (DLIP, Kuang et al., 2023; Hinton et al., 2015): at every
    real caption position (`caption_labels` != -100), T^2 KL(softmax(teacher / T) || softmax(student / T))
    over the vocabulary of the decoders' `token_logits`, averaged over those positions; padding, BOS and
    prompt positions are ignored. Teacher and student share the vocabulary and the teacher-forced caption."""

    needs = frozenset({"token_logits"})
    student_needs = CAPTION

    Params = TemperatureParams

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        _require(student, CAPTION, "lm_kd", "student")
        _require(teacher, self.needs, "lm_kd", "teacher")
        s_logits, t_logits = student.token_logits, teacher.token_logits.detach()
        if s_logits.shape != t_logits.shape:
            raise ValueError(
                f"loss 'lm_kd': student token_logits {tuple(s_logits.shape)} vs teacher {tuple(t_logits.shape)}: "
                "one vocabulary and the same captions are needed"
            )
        real = student.caption_labels != IGNORE_INDEX
        _real_token_count(student.caption_labels, "lm_kd")
        loss = soft_target_kl(s_logits[real], t_logits[real], self.temperature)
        return loss, {"lm_kd": loss.detach()}
