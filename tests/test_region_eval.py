"""Tests for vldistill.eval.regions: box IoU, region classification figures and box-level AP50, against
hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vldistill.eval.base_novel import ClassSplit
from vldistill.eval.regions import (
    ap50_per_class,
    average_precision,
    box_iou,
    classification_figures,
    detection_figures,
)


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 2, 2], [1, 1, 1, 1]])  # area 4; a zero-area point box
    b = np.array(
        [
            [1, 1, 3, 3],  # overlaps a[0] in 1x1: 1 / (4 + 4 - 1)
            [5, 5, 6, 6],  # disjoint
            [0.5, 0.5, 1.5, 1.5],  # inside a[0]: 1 / 4
            [2, 0, 4, 2],  # shares an edge only: 0
            [0, 0, 2, 2],  # identical: 1
            [1, 1, 1, 1],  # zero-area: zero union with a[1] -> 0, not NaN
        ]
    )
    expected = np.array([[1 / 7, 0, 0.25, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    iou = box_iou(a, b)
    assert iou.dtype == np.float64 and iou.shape == (2, 6)
    np.testing.assert_allclose(iou, expected)
    np.testing.assert_allclose(box_iou(b, a), expected.T)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 6)


def test_box_iou_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou(np.zeros((2, 3)), np.zeros((1, 4)))


SPLIT = ClassSplit(base=(0, 1), novel=(2, 3))


def test_classification_figures_hand_worked() -> None:
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0, 0.0],  # label 0: all -> 0 right; among base -> 0 right
            [3.0, 1.0, 4.0, 0.0],  # label 0: all -> 2 wrong; among base -> 0 right
            [2.0, 1.0, 0.0, 0.0],  # label 0: all -> 0 right; among base -> 0 right
            [2.0, 1.0, 0.0, 0.0],  # label 1: all -> 0 wrong; among base -> 0 wrong
            [0.0, 0.0, 3.0, 1.0],  # label 2: all -> 2 right; among novel -> 2 right
            [0.0, 5.0, 1.0, 2.0],  # label 2: all -> 1 wrong; among novel -> 3 wrong
            [0.0, 6.0, 1.0, 2.0],  # label 3: all -> 1 wrong; among novel -> 3 right
        ]
    )
    labels = np.array([0, 0, 0, 1, 2, 2, 3])
    figures = classification_figures(logits, labels, SPLIT)
    assert figures == pytest.approx(
        {
            "base_acc1": 3 / 4,  # among all classes it would be 2 / 4
            "base_recall": (3 / 3 + 0 / 1) / 2,  # imbalanced: class 0 has 3 regions, class 1 one
            "novel_acc1": 2 / 3,  # among all classes it would be 1 / 3
            "novel_recall": (1 / 2 + 1 / 1) / 2,
            "all_acc1": 3 / 7,
            "all_recall": (2 / 3 + 0 + 1 / 2 + 0) / 4,
        }
    )


def test_classification_figures_side_without_regions() -> None:
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="novel"):
        classification_figures(logits, np.array([0, 1]), SPLIT)
    with pytest.raises(ValueError, match=r"logits \(N, C\) and labels \(N,\)"):
        classification_figures(logits, np.array([0, 1, 2]), SPLIT)


def test_average_precision_hand_worked() -> None:
    # Ranked TP, FP, TP with 3 ground truths: precision 1, 1/2, 2/3 -> monotone 1, 2/3, 2/3 at recall 1/3, 1/3,
    # 2/3. Recall points 0..0.33 (34 of them) read 1, 0.34..0.66 (33) read 2/3, 0.67..1 (34) are past the
    # highest recall and read 0: AP = (34 + 33 * 2/3) / 101 = 56 / 101. Given unsorted, to check the ranking.
    scores = np.array([0.7, 0.9, 0.8])
    hits = np.array([True, True, False])
    assert average_precision(scores, hits, 3) == pytest.approx(56 / 101)
    assert average_precision(np.array([0.9, 0.8]), np.array([True, True]), 2) == pytest.approx(1.0)
    # FP then TP with 1 ground truth: precision 0, 1/2 -> monotone 1/2, 1/2; every recall point reads 1/2.
    assert average_precision(np.array([0.9, 0.8]), np.array([False, True]), 1) == pytest.approx(0.5)


def test_average_precision_ties_keep_order_and_edge_cases() -> None:
    assert average_precision(np.array([1.0, 1.0]), np.array([False, True]), 1) == pytest.approx(0.5)
    assert average_precision(np.array([1.0, 1.0]), np.array([True, False]), 1) == pytest.approx(1.0)
    assert average_precision(np.array([]), np.array([], dtype=bool), 2) == 0.0
    assert average_precision(np.array([0.5]), np.array([False]), 1) == 0.0
    with pytest.raises(ValueError, match="at least one ground-truth"):
        average_precision(np.array([0.5]), np.array([True]), 0)
    with pytest.raises(ValueError, match="true positives"):
        average_precision(np.array([0.5, 0.4]), np.array([True, True]), 1)


BOX_A = [0, 0, 10, 10]


def test_ap50_background_outranks_true_box() -> None:
    # One image: A (class 0), B (class 1); proposals A, B and a background box.
    gt_boxes = np.array([BOX_A, [20, 20, 30, 30]])
    boxes = np.array([BOX_A, [20, 20, 30, 30], [40, 40, 50, 50]])
    scores = np.array(
        [
            [0.8, 0.2],
            [0.1, 0.7],  # B's box scored as class 0: no class-0 ground truth overlaps it -> FP for class 0
            [0.9, 0.1],  # background scores highest for class 0 -> FP ranked first
        ]
    )
    args = (scores, boxes, np.zeros(3, int), gt_boxes, np.array([0, 1]), np.zeros(2, int))
    # class 0 ranks FP, TP, FP with 1 ground truth: monotone precision 1/2 at every recall point -> AP 1/2.
    assert ap50_per_class(*args, classes=[0, 1]) == pytest.approx({0: 0.5, 1: 1.0})
    assert detection_figures(*args, split=ClassSplit(base=(0,), novel=(1,))) == pytest.approx(
        {"ap50_base": 0.5, "ap50_novel": 1.0, "ap50_all": 0.75}
    )


def test_ap50_duplicate_detection_is_false_positive() -> None:
    # Class 0 in images 0, 1 and 2 (the last never detected). In image 0 the box A is detected twice
    # (the second IoU 0.9): ranked TP, FP (duplicate), TP with 3 ground truths -> 56 / 101 as above.
    gt_boxes = np.array([BOX_A, BOX_A, BOX_A])
    boxes = np.array([BOX_A, [0, 0, 10, 9], BOX_A])
    scores = np.array([[0.9], [0.8], [0.7]])
    aps = ap50_per_class(scores, boxes, np.array([0, 0, 1]), gt_boxes, np.zeros(3, int), np.array([0, 1, 2]), [0])
    assert aps == pytest.approx({0: 56 / 101})


def test_ap50_iou_threshold() -> None:
    # IoU 0.4 (FP at 0.5) ranked above IoU 0.6 (TP): AP 1/2; at threshold 0.3 the first is the TP: AP 1.
    boxes = np.array([[0, 0, 10, 4], [0, 0, 10, 6]])
    scores = np.array([[0.9], [0.8]])
    args = (scores, boxes, np.zeros(2, int), np.array([BOX_A]), np.array([0]), np.array([0]))
    assert ap50_per_class(*args, classes=[0]) == pytest.approx({0: 0.5})
    assert ap50_per_class(*args, classes=[0], iou_threshold=0.3) == pytest.approx({0: 1.0})
    # IoU exactly at the threshold matches.
    at_threshold = (np.array([[0.9]]), np.array([[0, 0, 10, 5]]), np.array([0]), np.array([BOX_A]), np.array([0]), np.array([0]))
    assert ap50_per_class(*at_threshold, classes=[0]) == pytest.approx({0: 1.0})


def test_ap50_detection_in_another_image_does_not_match() -> None:
    boxes = np.array([BOX_A, BOX_A])  # the same box, first in image 1 (no ground truth there), then image 0
    scores = np.array([[0.9, 0.0], [0.5, 0.0]])
    aps = ap50_per_class(scores, boxes, np.array([1, 0]), np.array([BOX_A]), np.array([0]), np.array([0]), [0, 1])
    assert aps == pytest.approx({0: 0.5})  # FP then TP; class 1 has no ground truth and is left out


def test_ap50_matches_highest_iou_unmatched_ground_truth() -> None:
    # Image 0 holds G1 and G2 (class 0), image 1 holds G3 (class 0, never detected). d0 overlaps G1 (0.74) and G2
    # (0.90): it takes G2, the higher IoU. d1 overlaps G2 (0.67) but G1 only 0.43: G2 is taken -> FP.
    # Ranked TP, FP with 3 ground truths: recall points 0..0.33 read 1 -> AP 34 / 101 (67 / 101 had d0 taken G1).
    gt_boxes = np.array([BOX_A, [2, 0, 12, 10], BOX_A])
    boxes = np.array([[1.5, 0, 11.5, 10], [4, 0, 14, 10]])
    scores = np.array([[0.9], [0.8]])
    aps = ap50_per_class(scores, boxes, np.zeros(2, int), gt_boxes, np.zeros(3, int), np.array([0, 0, 1]), [0])
    assert aps == pytest.approx({0: 34 / 101})


def test_detection_figures_sides_and_errors() -> None:
    boxes = np.array([BOX_A, [20, 20, 30, 30]])
    scores = np.array([[0.9, 0.1, 0.0], [0.95, 0.2, 0.0]])  # class 0 ranks FP (B's box), TP -> 1/2; class 1 -> 1
    args = (scores, boxes, np.zeros(2, int), boxes, np.array([0, 1]), np.zeros(2, int))
    # class 2 has no ground truth: left out of the base mean (counting it as 0 would give 1/4).
    assert detection_figures(*args, split=ClassSplit(base=(0, 2), novel=(1,))) == pytest.approx(
        {"ap50_base": 0.5, "ap50_novel": 1.0, "ap50_all": 0.75}
    )
    with pytest.raises(ValueError, match="novel"):
        detection_figures(*args, split=ClassSplit(base=(0, 1), novel=(2,)))
    with pytest.raises(ValueError, match="outside the 3 score columns"):
        ap50_per_class(*args, classes=[3])
