"""Choose a cascade's threshold: sweep thresholds over a labelled zero-shot set, with each point's accuracy,
teacher call rate and measured mean latency per image, and recommend the cheapest threshold that keeps a target
fraction of the teacher's accuracy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from vldistill.deploy.cascade import ZeroShotModel, as_images, check_criterion, confidence
from vldistill.deploy.latency import METHOD, measure_cascade_latency, modelled_ms

logger = logging.getLogger(__name__)

# Call rates near which the latency model is checked against the real cascade.
CHECKED_CALL_RATES = (0.25, 0.5, 1.0)
# Slack for comparing an accuracy (a count over N) with a goal computed in floating point.
TOLERANCE = 1e-9


def threshold_grid(confidences: torch.Tensor, points: int = 21) -> list[float]:
    """Ascending thresholds whose teacher call rates (the share of `confidences` below them) spread evenly
    from 0 to 1: for each of `points` evenly spaced rates k/N the midpoint between the k-th and (k+1)-th
    smallest confidence; 0 (the student alone) first and, last, 1 (or just above 1 when a confidence is 1),
    which sends every row to the teacher. Tied confidences give fewer distinct points."""
    if points < 2:
        raise ValueError(f"need at least 2 threshold points (0% and 100% teacher calls), got {points}")
    values = torch.sort(confidences.double().flatten()).values.tolist()
    if not values:
        raise ValueError("need at least one confidence to place thresholds")
    n = len(values)
    top = 1.0 if values[-1] < 1.0 else 1.0 + 1e-6
    grid = set()
    for rate in np.linspace(0.0, 1.0, points):
        k = round(float(rate) * n)
        grid.add(0.0 if k == 0 else top if k == n else (values[k - 1] + values[k]) / 2)
    return sorted(grid)


def sweep_thresholds(
    confidences: torch.Tensor,
    student_predictions: torch.Tensor,
    teacher_predictions: torch.Tensor,
    labels: torch.Tensor,
    thresholds: Sequence[float],
) -> list[dict[str, float]]:
    """Per threshold, the cascade's top-1 accuracy and teacher call rate: rows whose student confidence is
    below it take the teacher's prediction, the others the student's (what CascadeClassifier answers)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    points = []
    for threshold in thresholds:
        uncertain = confidences < threshold
        merged = torch.where(uncertain, teacher_predictions, student_predictions)
        points.append({
            "threshold": float(threshold),
            "acc1": (merged == labels).double().mean().item(),
            "teacher_call_rate": uncertain.double().mean().item(),
        })
    return points


def check_target(target: float) -> None:
    """Raise a ValueError unless `target` is a fraction of the teacher's acc1 in (0, 1]."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be a fraction of the teacher's acc1 in (0, 1], got {target}")


def recommend(points: Sequence[dict], teacher_acc1: float, teacher_ms: float, target: float = 0.99) -> dict:
    """The cheapest point (lowest mean_latency_ms, then lowest call rate) whose acc1 reaches `target` x the
    teacher's acc1: {"met": True, "goal_acc1", "threshold", "acc1", "teacher_call_rate", "mean_latency_ms",
    "acc1_vs_teacher", "latency_vs_teacher", "message"}; when none does, {"met": False, "goal_acc1",
    "threshold": None, "message"} naming the most accurate point."""
    check_target(target)
    if not points:
        raise ValueError("no cascade points to recommend from")
    goal = target * teacher_acc1
    meeting = [point for point in points if point["acc1"] >= goal - TOLERANCE]
    if not meeting:
        best = max(points, key=lambda point: (point["acc1"], -point["mean_latency_ms"]))
        message = (
            f"no threshold reaches {target:.1%} of the teacher's acc1 ({goal:.4f}); the most accurate, threshold "
            f"{best['threshold']:.4g}, reaches {best['acc1']:.4f} with the teacher on {best['teacher_call_rate']:.1%} "
            "of the images"
        )
        return {"met": False, "goal_acc1": goal, "threshold": None, "message": message}
    best = min(meeting, key=lambda point: (point["mean_latency_ms"], point["teacher_call_rate"]))
    vs_acc1 = best["acc1"] / teacher_acc1 if teacher_acc1 > 0 else None
    vs_ms = best["mean_latency_ms"] / teacher_ms if teacher_ms > 0 else None
    message = (
        f"threshold {best['threshold']:.4g}: acc1 {best['acc1']:.4f}"
        + (f" ({vs_acc1:.1%} of the teacher's)" if vs_acc1 is not None else "")
        + f", the teacher answers {best['teacher_call_rate']:.1%} of the images, {best['mean_latency_ms']:.3g} ms per image"
        + (f" ({vs_ms:.0%} of the teacher's latency)" if vs_ms is not None else "")
    )
    if vs_ms is not None and vs_ms >= 1:
        message += "; the teacher alone is as fast or faster"
    return {
        "met": True, "goal_acc1": goal, "threshold": best["threshold"], "acc1": best["acc1"],
        "teacher_call_rate": best["teacher_call_rate"], "mean_latency_ms": best["mean_latency_ms"],
        "acc1_vs_teacher": vs_acc1, "latency_vs_teacher": vs_ms, "message": message,
    }


def latency_sample(n: int, size: int, batch_size: int = 1) -> np.ndarray:
    """Indices spread evenly over 0..n-1 for timing: `size` rounded down to whole requests of `batch_size`
    (at least one request, at most the requests that fit in n)."""
    if size < 1 or batch_size < 1:
        raise ValueError(f"need at least one image and a request size >= 1 to time latency, got {size} and {batch_size}")
    if batch_size > n:
        raise ValueError(f"the latency request size {batch_size} is larger than the {n} evaluation images")
    count = min(max(1, size // batch_size), n // batch_size) * batch_size
    return np.linspace(0, n - 1, count).round().astype(np.int64)


def routed_per_request(uncertain: torch.Tensor, batch_size: int) -> list[int]:
    """Uncertain rows in each consecutive full request of `batch_size` rows (a last partial one is left out)."""
    whole = len(uncertain) // batch_size * batch_size
    return uncertain[:whole].view(-1, batch_size).sum(dim=1).tolist()


def _checked_thresholds(points: Sequence[dict]) -> list[float]:
    """The sweep's thresholds whose call rates lie nearest CHECKED_CALL_RATES (each once, 0 excluded)."""
    chosen = []
    for rate in CHECKED_CALL_RATES:
        point = min(points, key=lambda p: (abs(p["teacher_call_rate"] - rate), p["threshold"]))
        if point["threshold"] > 0 and point["threshold"] not in chosen:
            chosen.append(point["threshold"])
    return chosen


def evaluate_cascade(
    student: ZeroShotModel,
    teacher: ZeroShotModel,
    images,
    labels,
    criterion: str = "max_prob",
    target: float = 0.99,
    points: int = 21,
    latency_images: int = 100,
    latency_batch: int = 1,
    trials: int = 5,
    batch_size: int = 256,
    names: Optional[dict[str, str]] = None,
    dataset: Optional[str] = None,
) -> dict:
    """Sweep a student -> teacher cascade's threshold on labelled uint8 `images` (N, H, W, 3).

    Both models classify every image once (batches of `batch_size`); the thresholds come from the student's
    confidence quantiles (`threshold_grid`), so the points spread from 0% to 100% teacher calls. Latency is
    measured on about `latency_images` of the images sent in requests of `latency_batch` over `trials` (see
    latency.METHOD). Returns {"criterion",
    "target", "images", "classes", "student", "teacher" ({"name", "acc1", "mean_latency_ms"}), "points" (per
    threshold: threshold, acc1, teacher_call_rate, mean_latency_ms), "recommendation" (`recommend`),
    "latency" (the measured figures, the method and the checks of the latency model), "dataset"}. `names` may
    give the student's and the teacher's names, `dataset` the data's, for the record.
    """
    check_criterion(criterion)
    check_target(target)
    images = as_images(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels.shape != (len(images),) or len(images) == 0:
        raise ValueError(
            f"need one label per image and at least one image; got {len(images)} images, labels {tuple(labels.shape)}"
        )
    student_logits = student.batched_logits(images, batch_size)
    teacher_logits = teacher.batched_logits(images, batch_size)
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(f"the student knows {student_logits.shape[1]} classes and the teacher {teacher_logits.shape[1]}")
    if labels.min() < 0 or labels.max() >= student_logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {student_logits.shape[1]})")
    confidences = confidence(student_logits.double().softmax(dim=1), criterion)
    student_predictions, teacher_predictions = student_logits.argmax(dim=1), teacher_logits.argmax(dim=1)
    thresholds = threshold_grid(confidences, points)
    sweep = sweep_thresholds(confidences, student_predictions, teacher_predictions, labels, thresholds)

    sample = latency_sample(len(images), latency_images, latency_batch)
    checked = _checked_thresholds(sweep)
    logger.info(
        "timing the student, the teacher and the cascade at %d thresholds on %d images (requests of %d), %d trials",
        len(checked) + 1, len(sample), latency_batch, trials,
    )
    measured = measure_cascade_latency(
        student, teacher, images[torch.from_numpy(sample)], criterion, checked, latency_batch, trials
    )
    alone_ms, teacher_ms = measured["cascade_alone_ms"]["median"], measured["teacher_ms"]["median"]
    teacher_batch_ms = measured["teacher_batch_ms"]
    for point in sweep:
        routed = routed_per_request(confidences < point["threshold"], latency_batch)
        point["mean_latency_ms"] = modelled_ms(alone_ms, teacher_batch_ms, routed, latency_batch)
    checks = []
    for check in measured["checks"]:
        expected = torch.where(
            confidences[sample] < check["threshold"], teacher_predictions[sample], student_predictions[sample]
        )
        modelled = modelled_ms(alone_ms, teacher_batch_ms, check["routed"], latency_batch)
        measured_ms = check["measured_ms"]["median"]
        checks.append({
            "threshold": check["threshold"], "teacher_call_rate": check["teacher_call_rate"],
            "measured_ms": check["measured_ms"], "modelled_ms": modelled,
            "relative_error": (modelled - measured_ms) / measured_ms,
            "agreement_with_sweep": (check["predictions"] == expected).double().mean().item(),
        })
    names = names or {}
    teacher_acc1 = (teacher_predictions == labels).double().mean().item()
    return {
        "criterion": criterion,
        "target": target,
        "dataset": dataset,
        "images": len(images),
        "classes": student_logits.shape[1],
        "student": {"name": names.get("student", "student"),
                    "acc1": (student_predictions == labels).double().mean().item(),
                    "mean_latency_ms": measured["student_ms"]["median"]},
        "teacher": {"name": names.get("teacher", "teacher"), "acc1": teacher_acc1, "mean_latency_ms": teacher_ms},
        "points": sweep,
        "recommendation": recommend(sweep, teacher_acc1, teacher_ms, target),
        "latency": {
            "method": METHOD,
            "batch_size": latency_batch,
            "images": measured["images"],
            "trials": measured["trials"],
            "threads": measured["threads"],
            "torch": torch.__version__,
            "student_ms": measured["student_ms"],
            "teacher_ms": measured["teacher_ms"],
            "cascade_alone_ms": measured["cascade_alone_ms"],
            "teacher_batch_ms": {str(size): ms for size, ms in teacher_batch_ms.items()},
            "checks": checks,
        },
    }
