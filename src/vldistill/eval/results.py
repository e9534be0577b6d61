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
