"""Base-to-novel zero-shot evaluation (CoCoOp, Zhou et al., 2022; PromptKD, Li et al., 2024): the classes are
split into base classes, whose images a model may be trained on, and novel classes, never seen in training.
Images of base classes are classified among the base classes only, images of novel classes among the novel
classes only; the figure is the harmonic mean of the two accuracies, which rewards a model only when it is good
on both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vldistill.eval.zeroshot import classification_metrics


@dataclass(frozen=True)
class ClassSplit:
    """Class indices (into the data's class names, ascending) of the base and the novel classes."""

    base: tuple[int, ...]
    novel: tuple[int, ...]

    def record(self, classnames: Sequence[str]) -> dict[str, list[str]]:
        """The split as JSON data: the names of the base and the novel classes."""
        return {"base": [classnames[i] for i in self.base], "novel": [classnames[i] for i in self.novel]}


def split_classes(n_classes: int, base_share: float = 0.5, seed: int = 0) -> ClassSplit:
    """A seeded random split of `n_classes` classes: round(base_share x n) base classes (at least one, and at
    least one novel class left), the rest novel."""
    if n_classes < 2:
        raise ValueError(f"a base-to-novel split needs at least 2 classes, got {n_classes}")
    if not 0 < base_share < 1:
        raise ValueError(f"the base share must be in (0, 1), got {base_share}")
    count = min(max(round(base_share * n_classes), 1), n_classes - 1)
    order = np.random.default_rng(seed).permutation(n_classes)
    return ClassSplit(tuple(sorted(order[:count].tolist())), tuple(sorted(order[count:].tolist())))


def harmonic_mean(base: float, novel: float) -> float:
    """2 b n / (b + n), the base-to-novel summary (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def images_of(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Indices of the images whose label is one of `classes`."""
    return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(classes)))


def accuracy_within(logits: torch.Tensor, labels: np.ndarray, classes: Sequence[int]) -> float:
    """Top-1 accuracy of the images of `classes` when each is classified among `classes` only (the columns of
    the (N, C) `logits` of the other classes left out); ValueError when no image belongs to `classes`."""
    rows = images_of(labels, classes)
    if len(rows) == 0:
        raise ValueError("no test image belongs to these classes: the split leaves one side without images")
    position = {label: k for k, label in enumerate(classes)}
    local = torch.tensor([position[int(label)] for label in np.asarray(labels)[rows]], dtype=torch.long)
    within = logits[torch.as_tensor(rows)][:, list(classes)]
    return classification_metrics(within, local, ks=(1,))["acc1"]


def base_novel_accuracy(logits: torch.Tensor, labels: np.ndarray, split: ClassSplit) -> dict[str, float]:
    """`base_acc1`, `novel_acc1` and their harmonic mean `hm` from (N, C) class logits of every test image over
    every class (see the module docstring for which columns each image is classified among)."""
    base = accuracy_within(logits, labels, split.base)
    novel = accuracy_within(logits, labels, split.novel)
    return {"base_acc1": base, "novel_acc1": novel, "hm": harmonic_mean(base, novel)}
