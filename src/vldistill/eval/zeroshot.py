"""Zero-shot classification: prompt-ensembled class embeddings, top-k accuracy, mean per-class recall and\nthe accuracy of every class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vldistill.eval.embed import Images, Tokenize, embed_images, embed_texts
from vldistill.eval.retrieval import top_k_indices


def format_prompt(template: str, classname: str) -> str:
    """`template` with its `{}` or `{c}` placeholder replaced by `classname`."""
    if "{}" not in template and "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")
    return template.format(classname, c=classname)


def zero_shot_classifier(
    model: nn.Module,
    tokenize: Tokenize,
    classnames: list[str],
    templates: list[str],
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(C, D) class embeddings: per class, the re-normalized mean of its normalized prompt embeddings."""
    if not templates:
        raise ValueError("need at least one template")
    prompts = [format_prompt(template, name) for name in classnames for template in templates]
    embeds = embed_texts(model, tokenize, prompts, batch_size, progress)
    per_template = F.normalize(embeds, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def _check_classification_inputs(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        shapes = f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"need logits (N, C) and labels (N,) with N > 0; got {shapes}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")


def _mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    totals = torch.bincount(labels, minlength=n_classes)
    hits = torch.bincount(labels[predictions == labels], minlength=n_classes)
    present = totals > 0
    return (hits[present] / totals[present]).mean().item()


def reported_top_k(ks: Sequence[int], n_classes: int) -> list[int]:
    """The k of `ks` whose top-k accuracy is reported: 1, and each k below the class count (with k or
    fewer classes every label is among the top k, so acc{k} would be 1 whatever the model)."""
    return [k for k in ks if k == 1 or k < n_classes]


def unreported_note(ks: Sequence[int], n_classes: int) -> Optional[str]:
    """A result record's note naming the accuracies of `ks` left out for `n_classes` classes (None: none)."""
    left_out = [k for k in ks if k not in reported_top_k(ks, n_classes)]
    if not left_out:
        return None
    names = ", ".join(f"acc{k}" for k in left_out)
    return f"{names} not reported: only {n_classes} classes (top-k accuracy is reported when there are more than k)"


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """`acc{k}` top-k accuracy for each k of `ks` that `reported_top_k` keeps (acc1, and acc{k} only
    with more than k classes) and `mean_per_class_recall`.

    mean_per_class_recall averages, over the classes present in `labels`, the fraction of each
    class's samples whose top-1 prediction is right. Ties go to the lower class index.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    logits = logits.float().cpu()
    _check_classification_inputs(logits, labels)
    ks = reported_top_k(ks, logits.shape[1])
    ranked = top_k_indices(logits, max(ks, default=1))
    hits = ranked == labels[:, None]
    metrics = {f"acc{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}
    metrics["mean_per_class_recall"] = _mean_per_class_recall(ranked[:, 0], labels, logits.shape[1])
    return metrics


def per_class_accuracy(
    logits: torch.Tensor, labels: Sequence[int] | torch.Tensor, classnames: Sequence[str]
) -> list[dict[str, object]]:
    """Per class, in class order: `{"class": name, "samples": n, "acc1": share of its n samples whose top-1
    prediction is right}` (acc1 None for a class without samples). Ties go to the lower class index."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    logits = logits.float().cpu()
    _check_classification_inputs(logits, labels)
    if logits.shape[1] != len(classnames):
        raise ValueError(f"{logits.shape[1]} classes of logits but {len(classnames)} class names")
    predictions = top_k_indices(logits, 1)[:, 0]
    totals = torch.bincount(labels, minlength=len(classnames)).tolist()
    hits = torch.bincount(labels[predictions == labels], minlength=len(classnames)).tolist()
    return [
        {"class": name, "samples": total, "acc1": hit / total if total else None}
        for name, total, hit in zip(classnames, totals, hits)
    ]


def zero_shot_logits(
    model: nn.Module,
    tokenize: Tokenize,
    images: Images,
    classnames: list[str],
    templates: list[str],
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(N, C) cosine similarities of each image to each class's prompt-ensembled embedding."""
    classifier = zero_shot_classifier(model, tokenize, classnames, templates, batch_size, progress)
    image_embeds = embed_images(model, images, batch_size, progress)
    return image_embeds @ classifier.T


def evaluate_zero_shot(
    model: nn.Module,
    tokenize: Tokenize,
    images: Images,
    labels: Sequence[int] | torch.Tensor,
    classnames: list[str],
    templates: list[str],
    batch_size: int = 256,
    progress: bool = True,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Classify `images` against prompt-ensembled `classnames` and return `classification_metrics`."""
    logits = zero_shot_logits(model, tokenize, images, classnames, templates, batch_size, progress)
    return classification_metrics(logits, torch.as_tensor(labels), ks)
