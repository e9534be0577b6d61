"""Tests for vldistill.eval.results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vldistill.eval import make_result, read_result, write_result


def example_result() -> dict:
    metrics = {"acc1": torch.tensor(0.75), "acc5": np.float32(1.0), "mean_per_class_recall": 0.5}
    return make_result("shapes_test", "student_tiny", "zeroshot_classification", metrics, n_samples=8)


def test_make_result_has_plain_float_metrics() -> None:
    assert example_result() == {
        "dataset": "shapes_test",
        "model": "student_tiny",
        "task": "zeroshot_classification",
        "metrics": {"acc1": 0.75, "acc5": 1.0, "mean_per_class_recall": 0.5},
        "n_samples": 8,
    }
    assert all(type(v) is float for v in example_result()["metrics"].values())


def test_round_trip_creates_parents_and_leaves_no_temp_files(tmp_path) -> None:
    path = tmp_path / "runs" / "eval" / "result.json"
    write_result(example_result(), path)
    write_result(example_result(), path)  # overwriting is atomic too
    assert read_result(path) == example_result()
    assert path.read_text().startswith('{\n  "dataset": "shapes_test",')
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_failed_write_keeps_old_file_and_no_temp_files(tmp_path) -> None:
    path = tmp_path / "result.json"
    write_result(example_result(), path)
    with pytest.raises(TypeError):
        write_result({**example_result(), "extra": object()}, path)  # not JSON-serializable
    assert read_result(path) == example_result()
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_read_result_names_file_and_missing_key(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"dataset": "d", "model": "m", "metrics": {}}))
    with pytest.raises(ValueError, match=r"broken\.json.*missing key 'task'"):
        read_result(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_result(path)
