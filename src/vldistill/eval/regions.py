"""Open-vocabulary region evaluation (ViLD, Gu et al., ICLR 2022, "Open-vocabulary Object Detection via Vision
and Language Knowledge Distillation"): how well a model recognizes objects in boxes, on the base classes it was
trained on and on held-out novel classes it knows only by name.

Two protocols, both without a learned box proposer, so they measure recognition alone:

- Region classification with given boxes: every ground-truth box is one region; its (C,) scores over all classes
  are ranked. As in base-to-novel evaluation (eval/base_novel.py), regions of base classes are classified among
  the base classes only, regions of novel classes among the novel classes only, and every region among all
  classes; the figures are top-1 accuracy and mean per-class recall (which weighs a rare class like a common one).
- Box-level AP50: the proposals are all ground-truth boxes plus random background boxes, and each proposal's score
  for each class is one detection of that class. A detection is a true positive when it overlaps a not yet
  matched ground-truth box of its class in its image with IoU >= 0.5, else a false positive, so AP50 measures
  whether background proposals (and objects of other classes) score below the real objects. AP is COCO's
  (Lin et al., 2014, "Microsoft COCO: Common Objects in Context"; the reference cocoapi COCOeval): greedy matching in
  descending score order to the highest-IoU unmatched ground truth, 101-point interpolated precision. Unlike
  COCOeval no per-image cap of 100 detections is applied (every proposal's score counts) and there are no
  crowd or area ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vldistill.eval.base_novel import ClassSplit, images_of
from vldistill.eval.zeroshot import classification_metrics

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's recall points 0, 0.01, ..., 1


def _check_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) boxes (x0, y0, x1, y1), got shape {boxes.shape}")
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union (float64) of boxes `a` (N, 4) and `b` (M, 4), each (x0, y0, x1, y1); a box
    with x1 < x0 or y1 < y0 has zero area, and a pair whose union has zero area gets IoU 0."""
    a, b = _check_boxes(a, "a"), _check_boxes(b, "b")
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _figures_within(logits: torch.Tensor, labels: np.ndarray, classes: Sequence[int], side: str) -> tuple[float, float]:
    """Top-1 accuracy and mean per-class recall of the regions of `classes`, each classified among `classes`."""
    rows = images_of(labels, classes)
    if len(rows) == 0:
        raise ValueError(f"no region belongs to the {side} classes: the split leaves that side without regions")
    position = {label: k for k, label in enumerate(classes)}
    local = torch.tensor([position[int(label)] for label in labels[rows]], dtype=torch.long)
    metrics = classification_metrics(logits[torch.as_tensor(rows)][:, list(classes)], local, ks=(1,))
    return metrics["acc1"], metrics["mean_per_class_recall"]


def classification_figures(logits: torch.Tensor, labels: np.ndarray, split: ClassSplit) -> dict[str, float]:
    """Region classification with given boxes from (N, C) `logits` of N regions over all C classes and their (N,)
    class `labels`: `{base,novel,all}_acc1` top-1 accuracy and `{base,novel,all}_recall` mean per-class recall
    (over the classes of that side with at least one region), base regions among the base classes only, novel
    among the novel only, all among every class. Ties go to the lower class index."""
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"need logits (N, C) and labels (N,), got {tuple(logits.shape)} and {labels.shape}")
    figures: dict[str, float] = {}
    for side, classes in (("base", split.base), ("novel", split.novel), ("all", tuple(range(logits.shape[1])))):
        figures[f"{side}_acc1"], figures[f"{side}_recall"] = _figures_within(logits, labels, classes, side)
    return figures


def average_precision(scores: np.ndarray, true_positive: np.ndarray, n_ground_truth: int) -> float:
    """COCO's 101-point interpolated average precision of detections with (D,) `scores`, (D,) bool
    `true_positive` flags, of a class with `n_ground_truth` boxes: detections ranked by score descending (ties
    keep their order), precision made monotone (the best precision at any higher recall), read at recall 0, 0.01,
    ..., 1 (0 past the highest recall reached) and averaged."""
    scores = np.asarray(scores, dtype=np.float64)
    true_positive = np.asarray(true_positive, dtype=bool)
    if scores.ndim != 1 or true_positive.shape != scores.shape:
        raise ValueError(f"need scores (D,) and true_positive (D,), got {scores.shape} and {true_positive.shape}")
    if n_ground_truth <= 0:
        raise ValueError(f"average precision needs at least one ground-truth box, got {n_ground_truth}")
    hits = true_positive[np.argsort(-scores, kind="stable")]
    if hits.sum() > n_ground_truth:
        raise ValueError(f"{int(hits.sum())} true positives but only {n_ground_truth} ground-truth boxes")
    tp = np.cumsum(hits)
    recall = tp / n_ground_truth
    precision = np.append(np.maximum.accumulate((tp / np.arange(1, len(hits) + 1))[::-1])[::-1], 0.0)
    index = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")  # len(hits) (precision 0) past the top recall
    return float(precision[index].mean())


def _match_image(scores: np.ndarray, ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """(P,) true-positive flags of one image's P detections of one class with (P,) `scores`, greedily matched in
    descending score order to the unmatched ground truth (columns of `ious` (P, G)) of highest IoU >= threshold."""
    hits = np.zeros(len(scores), dtype=bool)
    matched = np.zeros(ious.shape[1], dtype=bool)
    for detection in np.argsort(-scores, kind="stable"):
        candidates = np.where(matched, -1.0, ious[detection])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou_threshold:
            matched[best] = hits[detection] = True
    return hits


def ap50_per_class(
    scores: np.ndarray,
    boxes: np.ndarray,
    image_index: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_image: np.ndarray,
    classes: Sequence[int],
    iou_threshold: float = 0.5,
) -> dict[int, float]:
    """{class: AP at `iou_threshold`} for each of `classes` with at least one ground-truth box: every proposal
    (`boxes` (P, 4) in images `image_index` (P,)) is one detection of class c with score `scores[:, c]` (P, C);
    ground truth `gt_boxes` (G, 4) of classes `gt_labels` (G,) in images `gt_image` (G,). See the module
    docstring for the matching."""
    scores = np.asarray(scores, dtype=np.float64)
    boxes, gt_boxes = _check_boxes(boxes, "boxes"), _check_boxes(gt_boxes, "gt_boxes")
    image_index, gt_labels, gt_image = np.asarray(image_index), np.asarray(gt_labels), np.asarray(gt_image)
    n_proposals, n_truths = len(boxes), len(gt_boxes)
    if scores.ndim != 2 or scores.shape[0] != n_proposals or image_index.shape != (n_proposals,):
        raise ValueError(
            f"need scores (P, C) and image_index (P,) for {n_proposals} boxes, got {scores.shape} and {image_index.shape}"
        )
    if gt_labels.shape != (n_truths,) or gt_image.shape != (n_truths,):
        raise ValueError(
            f"need gt_labels (G,) and gt_image (G,) for {n_truths} gt_boxes, got {gt_labels.shape} and {gt_image.shape}"
        )
    outside = [c for c in list(classes) + gt_labels.tolist() if not 0 <= c < scores.shape[1]]
    if outside:
        raise ValueError(f"class {outside[0]} is outside the {scores.shape[1]} score columns")
    wanted = [int(c) for c in classes if np.any(gt_labels == c)]
    hits = np.zeros((n_proposals, scores.shape[1]), dtype=bool)
    for image in np.unique(gt_image):
        rows, truths = np.flatnonzero(image_index == image), np.flatnonzero(gt_image == image)
        ious = box_iou(boxes[rows], gt_boxes[truths])
        for c in np.intersect1d(gt_labels[truths], wanted):
            columns = gt_labels[truths] == c
            hits[rows, c] = _match_image(scores[rows, c], ious[:, columns], iou_threshold)
    return {c: average_precision(scores[:, c], hits[:, c], int(np.sum(gt_labels == c))) for c in wanted}


def detection_figures(
    scores: np.ndarray,
    boxes: np.ndarray,
    image_index: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_image: np.ndarray,
    split: ClassSplit,
) -> dict[str, float]:
    """`ap50_base`, `ap50_novel`, `ap50_all`: mean AP50 (see `ap50_per_class`) over the base, the novel and all
    classes with ground truth, every class's detections competing (`scores` (P, C) holds all C classes);
    ValueError when the base or the novel side has no ground-truth box."""
    per_class = ap50_per_class(scores, boxes, image_index, gt_boxes, gt_labels, gt_image, range(np.shape(scores)[1]))
    figures: dict[str, float] = {}
    for side, classes in (("base", split.base), ("novel", split.novel), ("all", tuple(per_class))):
        values = [per_class[c] for c in classes if c in per_class]
        if not values:
            raise ValueError(f"no ground-truth box belongs to the {side} classes: AP50 on that side is undefined")
        figures[f"ap50_{side}"] = float(np.mean(values))
    return figures
