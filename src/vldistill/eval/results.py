"""CLIP_benchmark-style result records: one JSON object per (dataset, model, task) evaluation."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vldistill.fileio import write_text_atomic

ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"
CAPTIONING = "captioning"
REQUIRED_KEYS = ("dataset", "model", "task", "metrics")


def make_result(
    dataset: str, model: str, task: str, metrics: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """A result record {dataset, model, task, metrics (as plain floats), **extra}."""
    return {
        "dataset": dataset,
        "model": model,
        "task": task,
        "metrics": {name: float(value) for name, value in metrics.items()},
        **extra,
    }


def _check_result(result: Any, source: str) -> None:
    if not isinstance(result, dict):
        raise ValueError(f"{source}: a result must be a JSON object, got {type(result).__name__}")
    for key in REQUIRED_KEYS:
        if key not in result:
            raise ValueError(f"{source}: result is missing key {key!r}")


def write_result(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `result` as indented JSON to `path` atomically (temp file, fsync, rename); return the path."""
    _check_result(result, str(path))
    return write_text_atomic(path, json.dumps(result, indent=2) + "\n")


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a result record from `path`, checking it has dataset, model, task and metrics."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    _check_result(result, str(path))
    return result


def _recall_ks(metrics: Mapping[str, float]) -> list[int]:
    prefix = "image_retrieval_recall@"
    return sorted(int(name[len(prefix):]) for name in metrics if name.startswith(prefix))


def format_records(records: Mapping[str, dict[str, Any]]) -> str:
    """A plain-text report of a model's records (keyed by task): the retrieval recalls as a table,
    text->image (image_retrieval_recall@K) and image->text (text_retrieval_recall@K) by K, and the same
    after ITM re-ranking when the record has them (itm_*, "-" at depths not re-ranked); the zero-shot
    accuracies on one line (and the record's note); the captioning BLEU-4 and CIDEr on one line."""
    lines = []
    retrieval = records.get(ZEROSHOT_RETRIEVAL)
    if retrieval is not None:
        metrics, ks = retrieval["metrics"], _recall_ks(retrieval["metrics"])
        counts = f"{retrieval['images']:,} images, {retrieval['captions']:,} captions, " if "images" in retrieval else ""
        lines.append(f"{retrieval['model']} on {retrieval['dataset']}: {counts}hits: {retrieval.get('retrieval_match', 'pair')}")
        rows = [("text->image", "image_retrieval_recall"), ("image->text", "text_retrieval_recall")]
        width = 13
        if "rerank_k" in retrieval:
            rows += [(f"{label} ITM", f"itm_{key}") for label, key in rows]
            lines[-1] += f"; ITM re-ranks the top {retrieval['rerank_k']}"
            width = 17
        lines.append(f"{'retrieval':<{width}}" + "".join(f"{f'R@{k}':>8}" for k in ks))
        for label, key in rows:
            cells = [metrics.get(f"{key}@{k}") for k in ks]
            lines.append(f"{label:<{width}}" + "".join(f"{c:>8.3f}" if c is not None else f"{'-':>8}" for c in cells))
    classification = records.get(ZEROSHOT_CLASSIFICATION)
    if classification is not None:
        metrics = classification["metrics"]
        classes = f" ({classification['classes']} classes)" if "classes" in classification else ""
        accuracies = [f"{name} {value:.3f}" for name, value in metrics.items() if name.startswith("acc")]
        if "mean_per_class_recall" in metrics:
            accuracies.append(f"mean per-class recall {metrics['mean_per_class_recall']:.3f}")
        lines.append(f"zero-shot{classes}: " + ", ".join(accuracies))
        if classification.get("note"):
            lines.append(f"  note: {classification['note']}")
    captioning = records.get(CAPTIONING)
    if captioning is not None:
        metrics = captioning["metrics"]
        counts = f" ({captioning['images']:,} images)" if "images" in captioning else ""
        lines.append(f"{captioning['model']} on {captioning['dataset']}{counts}: captioning "
                     f"BLEU-4 {metrics['bleu4']:.3f}, CIDEr {metrics['cider']:.3f}")
    return "\n".join(lines)
