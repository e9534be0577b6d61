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
from typing import Optional

import numpy as np
import torch

from vldistill.data.detection import Proposals, RegionSet, box_iou, check_boxes
from vldistill.data.preprocess import model_pixel_values
from vldistill.eval.base_novel import ClassSplit, images_of
from vldistill.eval.embed import inference
from vldistill.eval.zeroshot import classification_metrics
from vldistill.models.region_student import RegionStudent

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's recall points 0, 0.01, ..., 1


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
    boxes, gt_boxes = check_boxes(boxes, "boxes"), check_boxes(gt_boxes, "gt_boxes")
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


def embed_proposals(student: RegionStudent, regions: RegionSet, proposals: Proposals, batch_size: int = 256) -> torch.Tensor:
    """(R, D) the region student's embeddings of every proposal, in proposal order, `batch_size` images at a time
    (eval mode, no gradients; the student's training flag restored)."""
    out = torch.empty(len(proposals), student.embed_dim)
    with inference(student):
        for begin in range(0, len(regions.images), batch_size):
            rows = np.flatnonzero((proposals.image_index >= begin) & (proposals.image_index < begin + batch_size))
            if len(rows) == 0:
                continue
            images = torch.as_tensor(regions.images[begin : begin + batch_size])
            pixels = model_pixel_values(images, None, student.image_mean, student.image_std)
            out[rows] = student.embed_regions(
                pixels, torch.as_tensor(proposals.boxes[rows]), torch.as_tensor(proposals.image_index[rows] - begin)
            ).float()
    return out


def proposal_scores(logits: torch.Tensor, scale: float, background: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, C) per-class detection scores of R proposals from their (R, C) class cosine similarities: softmax of
    `scale` x similarity over the classes and, when given, the (R,) similarities to a background embedding (whose
    column is then dropped, so a proposal that looks like background scores low for every class)."""
    columns = logits if background is None else torch.cat([logits, background[:, None]], dim=1)
    return torch.softmax(scale * columns.float(), dim=1)[:, : logits.shape[1]]
