"""Prompt distillation (prompt_distill.py): base-to-novel evaluation against hand-worked examples, the class-logit
KD loss against a reference computed another way, image-only feature alignment, the stored class embeddings
(reused, refused when stale) and `vldistill prompt-distill` end to end on the tiny config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build_clip, config_for, teacher_spec
from safetensors.torch import load_file

from vldistill.binding import ConfigError
from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.eval.base_novel import ClassSplit, base_novel_accuracy, harmonic_mean, split_classes
from vldistill.losses import LOSSES, LossContext, build_objective
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.prompts import PromptedDualEncoder
from vldistill.models.signals import Signals
from vldistill.prompt_distill import CLASS_EMBEDDINGS_FILE, labelled_training_images, projected_logits
from vldistill.teachers.class_embeddings import stored_class_embeddings
from vldistill.trained import TrainedModel


def test_split_classes_is_seeded_disjoint_and_sized():
    split = split_classes(10, 0.5, seed=3)
    assert len(split.base) == 5 and len(split.novel) == 5
    assert sorted(split.base + split.novel) == list(range(10))
    assert split == split_classes(10, 0.5, seed=3) and split != split_classes(10, 0.5, seed=4)
    assert len(split_classes(3, 0.9).novel) == 1  # always a novel class left
    with pytest.raises(ValueError, match="at least 2 classes"):
        split_classes(1)


def test_base_and_novel_images_are_classified_among_their_own_classes_only():
    # 4 classes: base {0, 1}, novel {2, 3}. Image 0 (class 0) prefers class 2 overall but is right among base
    # classes; image 1 (class 1) is wrong among base; image 2 (class 2) right; image 3 (class 3) prefers class 0
    # overall but is right among novel classes.
    logits = torch.tensor([
        [0.5, 0.1, 0.9, 0.0],
        [0.6, 0.2, 0.0, 0.0],
        [0.0, 0.0, 0.7, 0.3],
        [0.9, 0.0, 0.1, 0.4],
    ])
    labels = np.array([0, 1, 2, 3])
    figures = base_novel_accuracy(logits, labels, ClassSplit(base=(0, 1), novel=(2, 3)))
    assert figures["base_acc1"] == pytest.approx(0.5)
    assert figures["novel_acc1"] == pytest.approx(1.0)
    assert figures["hm"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(0.8, 0.8) == pytest.approx(0.8)


def test_class_kd_matches_a_kl_computed_by_hand():
    torch.manual_seed(0)
    classes = F.normalize(torch.randn(5, 6), dim=-1)
    context = LossContext(4, 6, class_embeddings=classes)
    objective = build_objective({"class_kd": {"temperature": 2.0}}, context)
    student_projected = torch.randn(3, 6, requires_grad=True)
    teacher_images = F.normalize(torch.randn(3, 6), dim=-1)
    scale = torch.tensor(10.0)
    student = Signals(image_embeds=torch.randn(3, 4), projected_image_embeds=student_projected, logit_scale=torch.tensor(3.0))
    teacher = Signals(image_embeds=teacher_images, logit_scale=scale)
    loss, parts = objective(student, teacher)
    # reference: explicit sums over classes, per image, then the mean, times T^2
    s = scale * F.normalize(student_projected, dim=-1) @ classes.T / 2.0
    t = scale * teacher_images @ classes.T / 2.0
    p_t, p_s = t.softmax(-1), s.detach().softmax(-1)
    expected = 4.0 * sum(float((p_t[i] * (p_t[i].log() - p_s[i].log())).sum()) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student_projected.grad is not None and student_projected.grad.abs().sum() > 0
    assert objective.student_needs == {"projected_image_embeds"}
    assert objective.needs == {"image_embeds", "logit_scale"}


def test_class_kd_refuses_a_run_without_class_embeddings_or_with_mismatched_own_embeddings():
    with pytest.raises(ValueError, match="class-name embeddings"):
        build_objective({"class_kd": {}}, LossContext(4, 6))
    with pytest.raises(ValueError, match="cannot be compared"):
        build_objective({"class_kd": {"student": "own"}}, LossContext(4, 6, class_embeddings=torch.randn(5, 6)))
    assert "class_kd" in LOSSES.names()


def test_feature_alignment_on_images_alone_reads_no_text():
    torch.manual_seed(0)
    objective = build_objective({"feature": {"towers": ["image"]}}, LossContext(4, 6))
    assert objective.needs == {"image_embeds", "logit_scale"}
    student = Signals(image_embeds=torch.randn(3, 4), logit_scale=torch.tensor(1.0))
    teacher = Signals(image_embeds=F.normalize(torch.randn(3, 6), dim=-1), logit_scale=torch.tensor(1.0))
    loss, parts = objective(student, teacher)
    projection = objective.losses["feature"].image_projection
    projected = F.normalize(projection(student.image_embeds), dim=-1)
    expected = (1 - (projected * teacher.image_embeds).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"part/feature_image", "loss/feature", "loss/total"}
    with pytest.raises(ValueError, match="towers"):
        build_objective({"feature": {"towers": ["audio"]}}, LossContext(4, 6))
    same = build_objective({"feature": {"towers": ["image"]}}, LossContext(6, 6))
    assert list(same.parameters()) == []  # equal sizes: the identity, nothing to learn
    adapted = build_objective({"feature": {"towers": ["image"], "adapter": True}}, LossContext(6, 6))
    (matrix,) = adapted.parameters()
    assert torch.equal(matrix, torch.eye(6)) and matrix.requires_grad


def test_prompt_distill_config_refuses_text_losses_and_bad_shares():
    with pytest.raises(ConfigError, match="text_embeds"):
        load_config(None, ["prompt_distill.losses={kd: {weight: 1}}"])
    with pytest.raises(ConfigError, match="base_share"):
        load_config(None, ["prompt_distill.base_share=1.0"])
    with pytest.raises(ConfigError, match="low_resource"):
        load_config(None, ["prompt_distill.low_resource=0"])


def test_class_embeddings_are_stored_once_and_recomputed_for_another_teacher(tokenizer, tmp_path):
    teacher = TrainedModel(build_clip(config_for(teacher_spec(), tokenizer), seed=0), tokenizer, tmp_path / "t")
    path = tmp_path / CLASS_EMBEDDINGS_FILE
    names, templates = ["red circle", "blue square", "green cross"], ["a {}", "a photo of a {}"]
    first = stored_class_embeddings(teacher, names, templates, path, progress=False)
    assert first.shape == (3, teacher.model.embed_dim)
    assert torch.allclose(first.norm(dim=-1), torch.ones(3), atol=1e-5)
    stamp = path.stat().st_mtime_ns
    again = stored_class_embeddings(teacher, names, templates, path, progress=False)
    assert torch.equal(first, again) and path.stat().st_mtime_ns == stamp  # read back, not recomputed
    other = TrainedModel(build_clip(config_for(teacher_spec(), tokenizer), seed=1), tokenizer, tmp_path / "t")
    changed = stored_class_embeddings(other, names, templates, path, progress=False)
    assert not torch.allclose(first, changed)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable class-embedding file"):
        stored_class_embeddings(teacher, names, templates, path, progress=False)


@pytest.mark.slow
def test_prompt_distill_command_trains_on_base_images_and_reports_base_to_novel(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "prompt-distill", str(packaged_config("tiny")), "--out", str(out), "-q",
        "--set", "prompt_distill.train.steps=6", "--set", "prompt_distill.train.batch_size=32",
        "--set", "prompt_distill.train.warmup_steps=1",
        "--set", "prompt_distill.losses={class_kd: {}, feature: {towers: [image]}, attention: {towers: [vision], distance: mse, grad_scale: 0.7}}",
    ]
    assert main(args) == 0
    logged = json.loads((out / "logs" / "prompted.jsonl").read_text().splitlines()[-1])
    assert {"loss/class_kd", "loss/feature", "loss/attention"} <= set(logged) and logged["grad_scale/attention"] == 0.7
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "student", "prompted", "prompted-low-resource"}
    split = summary["classes"]
    assert len(split["base"]) == len(split["novel"]) == 60 and not set(split["base"]) & set(split["novel"])
    for row in summary["models"].values():
        assert row["hm"] == pytest.approx(harmonic_mean(row["base_acc1"], row["novel_acc1"]))
    prompted = summary["models"]["prompted"]
    low = summary["models"]["prompted-low-resource"]
    assert 0 < low["train_images"] < prompted["train_images"] < 256  # base images only; 10% of them (per class)
    assert summary["prompted_minus_student"]["hm"] == pytest.approx(prompted["hm"] - summary["models"]["student"]["hm"])
    assert "prompted minus student" in capsys.readouterr().out
    # the saved prompted student reloads with its prompts and projector and scores the test images as reported
    model, _ = load_dual_encoder_any(out / "prompted")
    assert isinstance(model, PromptedDualEncoder) and model.projector is not None
    classes = load_file(str(out / CLASS_EMBEDDINGS_FILE))["class_embeddings"]
    data = load_data(load_config(packaged_config("tiny")).data, progress=False)
    names = data.classnames
    split = ClassSplit(tuple(names.index(n) for n in split["base"]), tuple(names.index(n) for n in split["novel"]))
    logits = projected_logits(model, data.zeroshot.images, classes, 64)
    figures = base_novel_accuracy(logits, data.zeroshot.labels, split)
    assert figures["base_acc1"] == pytest.approx(prompted["base_acc1"])
    assert figures["novel_acc1"] == pytest.approx(prompted["novel_acc1"])
    # only the prompts and the projector trained: the base weights equal the unprompted student's
    start, _ = load_dual_encoder_any(out / "student")
    base_state, start_state = model.base.state_dict(), start.state_dict()
    assert all(torch.equal(base_state[name], start_state[name]) for name in start_state)
    assert math.isfinite(summary["wall_seconds"])


@pytest.mark.slow
def test_staged_prompt_distillation_trains_the_vision_tower_but_never_the_text_tower(tmp_path):
    out = tmp_path / "run"
    args = [
        "prompt-distill", str(packaged_config("tiny")), "--out", str(out), "-q",
        "--set", "prompt_distill.train.steps=4", "--set", "prompt_distill.train.batch_size=32",
        "--set", "prompt_distill.train.warmup_steps=1", "--set", "prompt_distill.low_resource=null",
        "--set", "prompt_distill.stages=[{name: prompts, steps: 2, trainable: [prompts, projector]}, "
        "{name: joint, steps: 2, lr: 0.01, trainable: [student, objective]}]",
    ]
    assert main(args) == 0
    model, _ = load_dual_encoder_any(out / "prompted")
    start, _ = load_dual_encoder_any(out / "student")
    tuned, original = model.base.model, start.model
    assert all(torch.equal(p, q) for p, q in zip(tuned.text_model.parameters(), original.text_model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(tuned.vision_model.parameters(), original.vision_model.parameters()))
    stages = [json.loads(line)["stage"] for line in (out / "logs" / "prompted.jsonl").read_text().splitlines()]
    assert "joint" in str(stages[-1])


def test_shapes_training_labels_index_the_datas_classes_also_within_a_domain():
    cfg = load_config(packaged_config("tiny"), ["data.shapes_filter={shape: [cross, diamond]}"])
    data = load_data(cfg.data, progress=False)
    labelled = labelled_training_images(cfg, data, progress=False)
    assert len(data.classnames) == 48 and len(labelled) == len(data.train)
    for label, attrs in zip(labelled.labels, data.train.attributes):
        assert data.classnames[label] == f"{attrs['size']} {attrs['colour']} {attrs['shape']}"
