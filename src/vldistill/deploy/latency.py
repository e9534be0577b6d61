"""Measured latency of a cascade as deployed: uint8 images in, classes out, `batch_size` images per request
(1: one image at a time), under `torch.inference_mode()`. The student alone, the teacher alone (on every
sub-batch size the cascade may hand it) and the real cascade at a few thresholds are timed request by request,
interleaved, over repeated trials, so that a change of machine load touches them alike. From these a cascade's
mean latency per image at any routing is modelled, and the model is checked against the cascades timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vldistill.deploy.cascade import CascadeClassifier, ZeroShotModel, as_images
from vldistill.profile.throughput import no_gc, quartiles

METHOD = (
    "latency per image of requests of `batch_size` uint8 images (each request: the model's preprocessing, image "
    "tower and class logits; class text embeddings computed beforehand), under torch.inference_mode(), on "
    "`images` test images after a warm-up; each trial sends every request once to every timed stage (student "
    "alone, teacher alone at each sub-batch size in `teacher_batch_ms`, the cascade at threshold 0 and at each "
    "checked threshold), interleaved request by request in an order that rotates with the trial; a figure is "
    "the median over trials of the trial's mean (p25/p75 beside it). A point's mean_latency_ms is modelled as "
    "cascade_alone_ms (the cascade at threshold 0: the student plus its confidence) + the mean, over the "
    "evaluation set's consecutive full requests, of the teacher's time for the request's uncertain rows "
    "(linear between the measured sub-batch sizes, never falling with the size) / batch_size; with batch_size 1 "
    "that is cascade_alone_ms + teacher_call_rate x teacher_ms. `checks` compares the model with the real "
    "cascade timed at a few thresholds (relative_error = (modelled - measured) / measured)"
)


def summarize(trial_means_ms: Sequence[float]) -> dict[str, float]:
    """The median and the 25th / 75th percentiles of per-trial mean ms."""
    low, high = quartiles(trial_means_ms)
    return {"median": statistics.median(trial_means_ms), "p25": low, "p75": high}


def teacher_sizes(batch_size: int) -> list[int]:
    """The sub-batch sizes the teacher is timed at: powers of two below `batch_size`, and `batch_size`."""
    sizes, size = [], 1
    while size < batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [batch_size]


def modelled_ms(alone_ms: float, teacher_batch_ms: dict[int, float], routed: Sequence[int], batch_size: int) -> float:
    """Modelled mean ms per image of cascade requests of `batch_size` images whose uncertain row counts are
    `routed` (one count per request): `alone_ms` (per image) plus the mean teacher time per request for its
    count (0 for none; linear between the sizes of `teacher_batch_ms`, ms per call, taken as never falling with
    the size: timing noise can make a larger call measure faster) over `batch_size`."""
    sizes = sorted(teacher_batch_ms)
    costs = np.maximum.accumulate([teacher_batch_ms[size] for size in sizes])
    teacher = [0.0 if count == 0 else float(np.interp(count, sizes, costs)) for count in routed]
    return alone_ms + (sum(teacher) / len(teacher) if teacher else 0.0) / batch_size


def measure_cascade_latency(
    student: ZeroShotModel,
    teacher: ZeroShotModel,
    images,
    criterion: str,
    thresholds: Sequence[float],
    batch_size: int = 1,
    trials: int = 5,
    warmup: int = 3,
) -> dict:
    """Latency of the student alone, the teacher alone and the cascade at threshold 0 and at each of
    `thresholds`, on uint8 `images` (N, H, W, 3) sent as consecutive requests of `batch_size` (N a multiple of
    it; see METHOD).

    Returns per-image ms {"student_ms", "teacher_ms", "cascade_alone_ms"} (each `summarize`d), the teacher's
    median ms per call at each sub-batch size ("teacher_batch_ms"), "checks": per threshold its measured ms
    per image, the share of rows the teacher answered, the uncertain row count of each request and the
    cascade's predictions (last trial); and "batch_size", "images", "trials", "threads".
    """
    if trials < 1:
        raise ValueError(f"latency trials must be >= 1, got {trials}")
    images = as_images(images)
    if batch_size < 1 or len(images) == 0 or len(images) % batch_size:
        raise ValueError(f"need whole requests of {batch_size} images to time (at least one), got {len(images)} images")
    sizes = teacher_sizes(batch_size)
    cascades = {threshold: CascadeClassifier(student, teacher, threshold, criterion) for threshold in (0.0, *thresholds)}
    stages: dict[tuple, Callable] = {
        ("student",): lambda request: student.logits(request).argmax(dim=1),
        **{("teacher", size): lambda request, size=size: teacher.logits(request[:size]).argmax(dim=1) for size in sizes},
        **{("cascade", threshold): cascade for threshold, cascade in cascades.items()},
    }
    keys = list(stages)
    requests = list(images.split(batch_size))
    for request in requests[:warmup]:
        for stage in stages.values():
            stage(request)
    seconds: dict[tuple, list[float]] = {key: [] for key in keys}  # per trial, summed over the requests
    answers: dict[float, list] = {}
    with no_gc():
        for trial in range(trials):
            order = keys[trial % len(keys) :] + keys[: trial % len(keys)]
            total = dict.fromkeys(keys, 0)
            answers = {threshold: [] for threshold in cascades}  # the last trial's are kept
            for request in requests:
                for key in order:
                    start = time.perf_counter_ns()
                    answer = stages[key](request)
                    total[key] += time.perf_counter_ns() - start
                    if key[0] == "cascade":
                        answers[key[1]].append(answer)
            for key in keys:
                seconds[key].append(total[key] / 1e9)

    def per_image(key: tuple) -> dict[str, float]:
        return summarize([s * 1e3 / len(images) for s in seconds[key]])

    checks = [
        {
            "threshold": threshold,
            "measured_ms": per_image(("cascade", threshold)),
            "teacher_call_rate": sum(int(a.teacher_rows.sum()) for a in answers[threshold]) / len(images),
            "routed": [int(a.teacher_rows.sum()) for a in answers[threshold]],
            "predictions": torch.cat([a.predictions for a in answers[threshold]]),
        }
        for threshold in thresholds
    ]
    return {
        "batch_size": batch_size,
        "student_ms": per_image(("student",)),
        "teacher_ms": per_image(("teacher", batch_size)),
        "cascade_alone_ms": per_image(("cascade", 0.0)),
        "teacher_batch_ms": {
            size: statistics.median([s * 1e3 / len(requests) for s in seconds[("teacher", size)]]) for size in sizes
        },
        "checks": checks,
        "images": len(images),
        "trials": trials,
        "threads": torch.get_num_threads(),
    }
