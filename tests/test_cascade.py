"""Cascade inference (vldistill.deploy): confidence criteria against hand-worked values, routing of only the
uncertain rows to the teacher in one batch, merged answers, the threshold sweep and its grid, the
recommendation on a hand-made table, the latency model and its check against a timed cascade, and
`vldistill cascade-eval`."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_SIZE, SMALL_SPEC, build_clip, config_for, teacher_spec
from PIL import Image
from torch import nn

from vldistill.cli import main
from vldistill.config import packaged_config
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.deploy.cascade import CascadeClassifier, ZeroShotModel, confidence
from vldistill.deploy.cascade_eval import (
    evaluate_cascade,
    latency_sample,
    recommend,
    routed_per_request,
    sweep_thresholds,
    threshold_grid,
)
from vldistill.deploy.latency import measure_cascade_latency, modelled_ms, teacher_sizes
from vldistill.deploy.report import POINT_KEYS, format_cascade
from vldistill.eval.zeroshot import evaluate_zero_shot
from vldistill.models.inputs import InputSpec
from vldistill.models.io import save_dual_encoder

TINY = str(packaged_config("tiny"))

# ---------------------------------------------------------------- a hand-made cascade


class ColourEncoder(nn.Module):
    """A 1x1-pixel 'model': the image embedding is the normalized RGB colour (pixels are only scaled to [0, 1]),
    optionally after sleeping `delay` seconds (a model whose latency is known)."""

    def __init__(self, scale: float, delay: float = 0.0) -> None:
        super().__init__()
        self.scale, self.delay = torch.tensor(scale), delay
        self.calls: list[torch.Tensor] = []

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(image_size=1, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixel_values.clone())
        if self.delay:
            time.sleep(self.delay)
        return F.normalize(pixel_values.flatten(1), dim=-1)


E1, E2, E3 = torch.eye(3)
# Student classes: red, green, blue. The teacher's class 0 is blue, 1 red, 2 green (a permutation, so that
# its answers differ from the student's and the merge is visible).
STUDENT_CLASSES, TEACHER_CLASSES = torch.stack([E1, E2, E3]), torch.stack([E3, E1, E2])
COLOURS = [(255, 0, 0), (255, 200, 0), (0, 0, 255), (0, 255, 40), (90, 0, 100)]
SCALE = 10.0


def colour_images(colours=COLOURS) -> np.ndarray:
    """uint8 (N, 1, 1, 3) images of the given colours."""
    return np.array(colours, dtype=np.uint8).reshape(-1, 1, 1, 3)


def hand_probabilities(colours, classes: torch.Tensor, scale: float = SCALE) -> np.ndarray:
    """softmax(scale * cos(colour, class)) computed with numpy from the colours."""
    rgb = np.array(colours, dtype=np.float64)
    cos = (rgb / np.linalg.norm(rgb, axis=1, keepdims=True)) @ classes.double().numpy().T
    exp = np.exp(scale * cos)
    return exp / exp.sum(axis=1, keepdims=True)


def colour_cascade(threshold: float, criterion: str = "max_prob", delays=(0.0, 0.0)) -> CascadeClassifier:
    student = ZeroShotModel(ColourEncoder(SCALE, delays[0]), STUDENT_CLASSES)
    teacher = ZeroShotModel(ColourEncoder(SCALE, delays[1]), TEACHER_CLASSES)
    return CascadeClassifier(student, teacher, threshold, criterion)


def test_only_the_uncertain_rows_reach_the_teacher_in_one_batch():
    # Student max probabilities: red 0.9999, orange (255, 200, 0) 0.845, blue 0.9999, green 0.9997, purple
    # (90, 0, 100) 0.677 (softmax of 10 x cosine; orange: 1 / (1 + e^-1.697 + e^-7.868)). At 0.9 orange and
    # purple are uncertain.
    probabilities = hand_probabilities(COLOURS, STUDENT_CLASSES)
    assert probabilities.max(axis=1) == pytest.approx([0.99991, 0.84489, 0.99991, 0.99971, 0.67744], abs=1e-5)
    cascade = colour_cascade(0.9)
    output = cascade(colour_images())
    assert output.teacher_rows.tolist() == [False, True, False, False, True]
    assert output.teacher_call_rate == pytest.approx(0.4)
    teacher_calls = cascade.teacher.model.calls
    assert len(teacher_calls) == 1 and teacher_calls[0].shape == (2, 3, 1, 1)  # one batch, the two uncertain rows
    assert torch.equal(teacher_calls[0], torch.tensor([COLOURS[1], COLOURS[4]]).float().div(255).view(2, 3, 1, 1))
    assert len(cascade.student.model.calls) == 1 and cascade.student.model.calls[0].shape == (5, 3, 1, 1)
    # Student: red 0, green 1, blue 2. Teacher (0 blue, 1 red, 2 green): orange is mostly red -> 1; purple
    # mostly blue -> 0. Confident rows keep the student's answers.
    assert output.predictions.tolist() == [0, 1, 2, 1, 0]
    assert output.confidence.numpy() == pytest.approx(probabilities.max(axis=1))


def test_threshold_zero_never_calls_the_teacher_and_above_one_always_does():
    silent = colour_cascade(0.0)
    output = silent(colour_images())
    assert output.teacher_call_rate == 0 and silent.teacher.model.calls == []
    assert output.predictions.tolist() == [0, 0, 2, 1, 2]  # the student's own answers
    everything = colour_cascade(1.0 + 1e-6)
    output = everything(colour_images())
    assert output.teacher_call_rate == 1 and everything.teacher.model.calls[0].shape[0] == 5
    assert output.predictions.tolist() == [1, 1, 0, 2, 0]  # the teacher's answers


def test_criteria_against_hand_worked_rows():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    assert confidence(probabilities, "max_prob").tolist() == pytest.approx([0.7, 1 / 3, 1.0])
    assert confidence(probabilities, "margin").tolist() == pytest.approx([0.5, 0.0, 1.0], abs=1e-7)
    # H(0.7, 0.2, 0.1) = 0.7 ln(1/0.7) + 0.2 ln 5 + 0.1 ln 10 = 0.2496725 + 0.3218876 + 0.2302585 = 0.8018186 nats;
    # 1 - H / ln 3 = 1 - 0.8018186 / 1.0986123 = 0.270153. Uniform: H = ln 3 -> 0; one-hot: H = 0 -> 1.
    assert confidence(probabilities, "entropy").tolist() == pytest.approx([0.270153, 0.0, 1.0], abs=1e-6)
    assert confidence(torch.tensor([[1.0], [1.0]]), "margin").tolist() == [1.0, 1.0]  # one class: certain
    with pytest.raises(ValueError, match="unknown cascade criterion 'top1'"):
        confidence(probabilities, "top1")


@pytest.mark.parametrize("criterion", ["max_prob", "margin", "entropy"])
def test_each_criterion_routes_by_its_own_confidence(criterion):
    p = hand_probabilities(COLOURS, STUDENT_CLASSES)
    top = np.sort(p, axis=1)[:, ::-1]
    expected = {
        "max_prob": top[:, 0],
        "margin": top[:, 0] - top[:, 1],
        "entropy": 1 + (p * np.log(p)).sum(axis=1) / math.log(3),
    }[criterion]
    ranked = np.sort(expected)
    threshold = float(ranked[1] + ranked[2]) / 2  # the two least confident rows go to the teacher
    output = colour_cascade(threshold, criterion)(colour_images())
    assert output.confidence.numpy() == pytest.approx(expected, abs=1e-6)  # float32 logits
    assert output.teacher_rows.tolist() == (expected < threshold).tolist()
    assert output.teacher_rows.sum() == 2


def test_cascade_refuses_mismatched_classes_and_bad_settings():
    student = ZeroShotModel(ColourEncoder(SCALE), STUDENT_CLASSES)
    with pytest.raises(ValueError, match="3 classes and the teacher 2"):
        CascadeClassifier(student, ZeroShotModel(ColourEncoder(SCALE), STUDENT_CLASSES[:2]), 0.5)
    with pytest.raises(ValueError, match="finite"):
        CascadeClassifier(student, student, float("nan"))
    with pytest.raises(ValueError, match="uint8 images of shape"):
        CascadeClassifier(student, student, 0.5)(np.zeros((2, 1, 1, 3), dtype=np.float32))


# ---------------------------------------------------------------- tiny CLIP models on the shapes data


@pytest.fixture
def colour_task(tokenizer):
    """A tiny CLIP student and teacher (random weights) classifying 64 shapes images by colour: the images,
    labels, class names and the two models."""
    data = make_split("test", 64, seed=3, image_size=IMAGE_SIZE)
    names = sorted({a["colour"] for a in data.attributes})
    labels = np.array([names.index(a["colour"]) for a in data.attributes])
    student = build_clip(config_for(SMALL_SPEC, tokenizer), seed=1)
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=2)
    return {"images": data.images, "labels": labels, "names": names, "student": student, "teacher": teacher}


def heads(task, tokenizer):
    return [ZeroShotModel.build(task[role], tokenizer, task["names"], ["a {}"]) for role in ("student", "teacher")]


def test_cascade_on_tiny_clips_matches_each_model_alone(colour_task, tokenizer):
    """Threshold 0 answers as the student alone and a threshold above 1 as the teacher alone, whose acc1 is
    computed another way (eval.zeroshot on pixels prepared as eval.suite does)."""
    student, teacher = heads(colour_task, tokenizer)
    images, labels = colour_task["images"], torch.as_tensor(colour_task["labels"])
    tokenize = make_tokenize(tokenizer, 32)
    alone = {
        role: evaluate_zero_shot(
            colour_task[role], tokenize, to_pixel_values(images), labels, colour_task["names"], ["a {}"],
            progress=False, ks=(1,),
        )["acc1"]
        for role in ("student", "teacher")
    }
    assert 0 < alone["teacher"] < 1 and 0 < alone["student"] < 1  # neither trivially right nor wrong
    assert alone["teacher"] != alone["student"]
    low = CascadeClassifier(student, teacher, 0.0)(images)
    assert low.teacher_call_rate == 0
    assert (low.predictions == labels).double().mean().item() == pytest.approx(alone["student"])
    high = CascadeClassifier(student, teacher, 1.5)(images)
    assert high.teacher_call_rate == 1
    assert (high.predictions == labels).double().mean().item() == pytest.approx(alone["teacher"])


# ---------------------------------------------------------------- the sweep and the recommendation


def test_threshold_grid_spreads_call_rates_from_confidence_quantiles():
    confidences = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    grid = threshold_grid(confidences, points=5)
    assert grid == pytest.approx([0.0, 0.15, 0.25, 0.35, 1.0])  # midpoints between neighbours; 0 and 1 at the ends
    rates = [(confidences < t).double().mean().item() for t in grid]
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0]
    saturated = threshold_grid(torch.tensor([0.5, 1.0], dtype=torch.float64), points=3)
    assert saturated == [0.0, 0.75, 1.0 + 1e-6]  # a confidence of exactly 1 needs a threshold above 1
    assert threshold_grid(torch.full((4,), 0.5, dtype=torch.float64), points=5) == [0.0, 0.5, 1.0]  # ties merge
    with pytest.raises(ValueError, match="at least 2 threshold points"):
        threshold_grid(confidences, points=1)


def test_sweep_merges_teacher_answers_below_each_threshold():
    confidences = torch.tensor([0.9, 0.2, 0.6, 0.4], dtype=torch.float64)
    student, teacher, labels = torch.tensor([1, 0, 2, 0]), torch.tensor([1, 1, 0, 2]), torch.tensor([1, 1, 2, 2])
    points = sweep_thresholds(confidences, student, teacher, labels, [0.0, 0.3, 0.5, 1.0])
    # 0.3: row 1 -> teacher (right); 0.5: rows 1, 3 (both right); 1.0: all rows (rows 0, 1, 3 right).
    assert [p["teacher_call_rate"] for p in points] == [0.0, 0.25, 0.5, 1.0]
    assert [p["acc1"] for p in points] == [0.5, 0.75, 1.0, 0.75]


def hand_table() -> list[dict]:
    return [
        {"threshold": 0.0, "acc1": 0.80, "teacher_call_rate": 0.0, "mean_latency_ms": 1.0},
        {"threshold": 0.5, "acc1": 0.90, "teacher_call_rate": 0.3, "mean_latency_ms": 1.6},
        {"threshold": 0.7, "acc1": 0.95, "teacher_call_rate": 0.5, "mean_latency_ms": 2.0},
        {"threshold": 0.9, "acc1": 0.96, "teacher_call_rate": 0.8, "mean_latency_ms": 2.6},
        {"threshold": 1.0, "acc1": 0.96, "teacher_call_rate": 1.0, "mean_latency_ms": 3.0},
    ]


def test_recommendation_is_the_cheapest_threshold_meeting_the_target():
    # Teacher acc1 0.96 at 2.5 ms. 99% of it is 0.9504: only thresholds 0.9 and 1.0 reach it; 0.9 is cheaper
    # (and slower than the teacher alone). 98% is 0.9408: threshold 0.7 at 2.0 ms, 80% of the teacher's latency.
    strict = recommend(hand_table(), teacher_acc1=0.96, teacher_ms=2.5, target=0.99)
    assert strict["met"] and strict["threshold"] == 0.9 and strict["goal_acc1"] == pytest.approx(0.9504)
    assert strict["latency_vs_teacher"] == pytest.approx(2.6 / 2.5)
    assert "the teacher alone is as fast or faster" in strict["message"]
    loose = recommend(hand_table(), teacher_acc1=0.96, teacher_ms=2.5, target=0.98)
    assert (loose["threshold"], loose["teacher_call_rate"], loose["mean_latency_ms"]) == (0.7, 0.5, 2.0)
    assert loose["acc1_vs_teacher"] == pytest.approx(0.95 / 0.96) and loose["latency_vs_teacher"] == pytest.approx(0.8)
    assert "teacher alone" not in loose["message"]
    assert recommend(hand_table(), teacher_acc1=0.96, teacher_ms=2.5, target=0.8)["threshold"] == 0.0  # the student
    exact = recommend(hand_table(), teacher_acc1=0.95, teacher_ms=2.5, target=1.0)  # acc1 equal to the goal counts
    assert exact["threshold"] == 0.7


def test_no_recommendation_when_no_threshold_reaches_the_target():
    result = recommend(hand_table(), teacher_acc1=0.99, teacher_ms=2.5, target=0.99)  # goal 0.9801 > 0.96
    assert not result["met"] and result["threshold"] is None
    assert result["message"].startswith("no threshold reaches 99.0% of the teacher's acc1 (0.9801)")
    assert "threshold 0.9, reaches 0.9600" in result["message"]  # the most accurate, the cheaper of the two
    with pytest.raises(ValueError, match=r"target must be a fraction of the teacher's acc1 in \(0, 1\], got 1.5"):
        recommend(hand_table(), 0.96, 2.5, target=1.5)


# ---------------------------------------------------------------- latency


def test_latency_model_by_hand():
    assert teacher_sizes(1) == [1] and teacher_sizes(4) == [1, 2, 4] and teacher_sizes(5) == [1, 2, 4, 5]
    # Requests of 4 with 0, 1, 3 and 4 uncertain rows: teacher 0, 2, 4 (between 3.0 at 2 and 5.0 at 4) and 5 ms;
    # mean 2.75 ms per request = 0.6875 ms per image, plus 0.5 ms per image for the cascade answering alone.
    assert modelled_ms(0.5, {1: 2.0, 2: 3.0, 4: 5.0}, [0, 1, 3, 4], 4) == pytest.approx(1.1875)
    assert modelled_ms(1.0, {1: 3.0}, [1, 0, 0, 1], 1) == pytest.approx(1.0 + 0.5 * 3.0)  # batch 1: rate x teacher
    assert modelled_ms(0.0, {1: 2.0, 2: 1.5}, [2], 2) == pytest.approx(1.0)  # a larger call never costs less
    assert routed_per_request(torch.tensor([True, False, True, True, False, True, True]), 3) == [2, 2]  # 7th left out
    assert latency_sample(10, 4).tolist() == [0, 3, 6, 9]
    assert latency_sample(10, 5, batch_size=2).tolist() == [0, 3, 6, 9]  # rounded down to whole requests of 2
    with pytest.raises(ValueError, match="request size 16 is larger than the 10"):
        latency_sample(10, 100, batch_size=16)


def test_measured_latency_of_models_with_known_delays():
    """A student that takes 2 ms and a teacher that takes 6 ms per call: the timings find them, and the
    modelled latency of the cascade matches the cascade timed at each checked threshold."""
    cascade = colour_cascade(0.9, delays=(0.002, 0.006))
    images = colour_images(COLOURS * 2)  # 10 images, 4 of them uncertain at 0.9
    measured = measure_cascade_latency(cascade.student, cascade.teacher, images, "max_prob", [0.9, 2.0], trials=3)
    # Sleeping overshoots a little, more on a busy machine: generous upper bounds.
    assert 2.0 <= measured["student_ms"]["median"] < 5.0 and 6.0 <= measured["teacher_ms"]["median"] < 12.0
    assert measured["cascade_alone_ms"]["median"] >= 2.0
    halfway, everything = measured["checks"]
    assert halfway["teacher_call_rate"] == pytest.approx(0.4) and halfway["routed"] == [0, 1, 0, 0, 1] * 2
    assert everything["teacher_call_rate"] == 1.0
    alone, teacher = measured["cascade_alone_ms"]["median"], measured["teacher_batch_ms"]
    for check in measured["checks"]:
        modelled = modelled_ms(alone, teacher, check["routed"], 1)
        assert modelled == pytest.approx(check["measured_ms"]["median"], rel=0.3)
    assert halfway["predictions"].tolist() == [0, 1, 2, 1, 0] * 2


def test_evaluate_cascade_on_tiny_clips(colour_task, tokenizer):
    student, teacher = heads(colour_task, tokenizer)
    result = evaluate_cascade(
        student, teacher, colour_task["images"], colour_task["labels"], criterion="margin", points=5,
        latency_images=8, latency_batch=2, trials=2, names={"student": "s", "teacher": "t"}, dataset="colours",
    )
    points = result["points"]
    assert [p["teacher_call_rate"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]  # 64 distinct confidences
    assert points[0]["acc1"] == result["student"]["acc1"] and points[-1]["acc1"] == result["teacher"]["acc1"]
    labels = torch.as_tensor(colour_task["labels"])
    assert result["teacher"]["acc1"] == (CascadeClassifier(student, teacher, 2.0)(colour_task["images"]).predictions
                                         == labels).double().mean().item()
    latencies = [p["mean_latency_ms"] for p in points]
    assert latencies == sorted(latencies) and latencies[0] > 0
    latency = result["latency"]
    assert (latency["batch_size"], latency["images"], latency["trials"]) == (2, 8, 2)
    assert set(latency["teacher_batch_ms"]) == {"1", "2"} and len(latency["checks"]) == 3
    assert all(check["agreement_with_sweep"] == 1.0 for check in latency["checks"])
    assert (result["criterion"], result["dataset"], result["student"]["name"]) == ("margin", "colours", "s")
    assert result["recommendation"]["goal_acc1"] == pytest.approx(0.99 * result["teacher"]["acc1"])
    table = format_cascade(result)
    assert table.splitlines()[1].split() == ["threshold", "teacher", "calls", "acc1", "ms/image"]
    assert len(table.splitlines()) == 2 + len(points) + 4


# ---------------------------------------------------------------- the command


def test_cascade_eval_command_writes_points_summary_and_plot(tmp_path, tokenizer, capsys):
    student = save_dual_encoder(build_clip(config_for(SMALL_SPEC, tokenizer), seed=1), tokenizer, tmp_path / "student")
    teacher = save_dual_encoder(build_clip(config_for(teacher_spec(), tokenizer), seed=2), tokenizer, tmp_path / "teacher")
    out = tmp_path / "cascade"
    args = ["cascade-eval", "--student", str(student), "--teacher", str(teacher), "--config", TINY, "--out", str(out),
            "--points", "5", "--latency-images", "6", "--trials", "2", "--criterion", "entropy", "--target", "0.9"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    points = json.loads((out / "cascade.json").read_text())
    assert isinstance(points, list) and len(points) == 5
    assert all(set(point) == set(POINT_KEYS) for point in points)
    assert points[0]["teacher_call_rate"] == 0 and points[-1]["teacher_call_rate"] == 1
    summary = json.loads((out / "cascade_summary.json").read_text())
    assert {"criterion", "target", "student", "teacher", "recommendation", "latency"} <= set(summary)
    assert (summary["criterion"], summary["target"], summary["images"], summary["classes"]) == ("entropy", 0.9, 96, 120)
    assert set(summary["student"]) == set(summary["teacher"]) == {"name", "acc1", "mean_latency_ms"}
    assert summary["teacher"]["acc1"] == points[-1]["acc1"] and summary["student"]["acc1"] == points[0]["acc1"]
    assert "method" in summary["latency"] and summary["latency"]["images"] == 6
    with Image.open(out / "cascade.png") as plot:
        plot.load()
        assert plot.format == "PNG" and plot.width > 0 and plot.height > 0
    assert "threshold  teacher calls" in printed and "recommendation (target 90.0%" in printed
    assert f"wrote {out / 'cascade.json'}" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "test"], "--split and --images apply to the file given with --data"),
        (["--target", "1.5"], r"target must be a fraction of the teacher's acc1 in \(0, 1\], got 1.5"),
    ],
)
def test_cascade_eval_command_errors(tmp_path, tokenizer, capsys, extra, message):
    model = save_dual_encoder(build_clip(config_for(SMALL_SPEC, tokenizer), seed=1), tokenizer, tmp_path / "m")
    args = ["cascade-eval", "--student", str(model), "--teacher", str(model), "--config", TINY, "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
