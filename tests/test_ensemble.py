"""Teacher ensembles: combining outputs (checked against hand computations), per-teacher inputs,
and a distillation run from two teachers of different sizes and input formats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_SIZE, TEXT_LENGTH, build_clip, config_for, dual_output, seeded, teacher_spec, unit_rows

from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.losses import LossContext, build_objective
from vldistill.models import DualEncoderSpec, TowerSpec
from vldistill.teachers.ensemble import TeacherEnsemble, combine_outputs, confidence_weights
from vldistill.models.inputs import InputSpec, inputs_for
from vldistill.models.signals import Signals


def output(dim: int, seed: int, scale: float, rows: int = 4) -> Signals:
    """float64 unit image rows seeded by `seed`, text rows by `seed` + 100, and the logit scale."""
    image = unit_rows(rows, dim, dtype=torch.float64, generator=seeded(seed))
    return dual_output(image, unit_rows(rows, dim, dtype=torch.float64, generator=seeded(seed + 100)), scale)


def softmax_rows(matrix: list[list[float]]) -> list[list[float]]:
    out = []
    for row in matrix:
        exps = [math.exp(v) for v in row]
        out.append([e / sum(exps) for e in exps])
    return out


def test_single_teacher_is_unchanged() -> None:
    one = output(8, 0, 10.0)
    assert combine_outputs([one], "fixed", [1.0]) is one


def test_fixed_mixture_of_soft_targets_by_hand() -> None:
    a, b = output(8, 0, 10.0), output(12, 1, 20.0)  # different embedding sizes
    combined = combine_outputs([a, b], "fixed", [3.0, 1.0])
    la, lb = a.logits_per_image().tolist(), b.logits_per_image().tolist()
    pa, pb = softmax_rows(la), softmax_rows(lb)
    expected = [[math.log(0.75 * pa[i][j] + 0.25 * pb[i][j]) for j in range(4)] for i in range(4)]
    assert torch.allclose(combined.logits_per_image(), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # text->image rows mix the teachers' column distributions.
    pa_t, pb_t = softmax_rows([list(r) for r in zip(*la)]), softmax_rows([list(r) for r in zip(*lb)])
    expected_t = [[math.log(0.75 * pa_t[i][j] + 0.25 * pb_t[i][j]) for j in range(4)] for i in range(4)]
    assert torch.allclose(combined.logits_per_text(), torch.tensor(expected_t, dtype=torch.float64), atol=1e-12)
    # Concatenated embeddings: unit rows whose dot products are the weighted mean cosines.
    assert combined.image_embeds.shape == (4, 20)
    assert torch.allclose(combined.image_embeds.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    weighted_cos = 0.75 * a.image_embeds @ a.text_embeds.t() + 0.25 * b.image_embeds @ b.text_embeds.t()
    assert torch.allclose(combined.image_embeds @ combined.text_embeds.t(), weighted_cos, atol=1e-12)


def test_average_is_the_mean_similarity_matrix() -> None:
    a, b = output(8, 0, 10.0), output(8, 1, 30.0)
    combined = combine_outputs([a, b], "average", [5.0, 1.0])  # weights ignored: plain mean
    expected = (a.logits_per_image() + b.logits_per_image()) / 2
    assert torch.allclose(combined.logits_per_image(), expected)
    assert torch.allclose(combined.logits_per_text(), expected.t())


def test_confidence_weights_favour_the_lower_entropy_teacher() -> None:
    sure = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.0], [0.0, 10.0]])
    weights = confidence_weights([sure, unsure])
    h_sure0 = -sum(p * math.log(p) for p in softmax_rows([[10.0, 0.0]])[0])
    h_flat = math.log(2)
    w0 = math.exp(-h_sure0) / (math.exp(-h_sure0) + math.exp(-h_flat))
    assert weights[:, 0].tolist() == pytest.approx([w0, 1 - w0])  # row 0: the sure teacher leads
    assert weights[:, 1].tolist() == pytest.approx([1 - w0, w0])  # row 1: the other one does
    assert torch.allclose(weights.sum(dim=0), torch.ones(2))


def test_confidence_combination_mixes_rows_with_those_weights() -> None:
    a, b = output(8, 0, 50.0), output(8, 1, 2.0)  # a is far more confident
    combined = combine_outputs([a, b], "confidence", [1.0, 1.0])
    w = confidence_weights([a.logits_per_image(), b.logits_per_image()])
    mixture = w[0, :, None] * a.logits_per_image().softmax(-1) + w[1, :, None] * b.logits_per_image().softmax(-1)
    assert torch.allclose(combined.logits_per_image(), mixture.log(), atol=1e-12)
    assert (w[0] > 0.5).all()


def test_kd_against_an_ensemble_uses_the_mixture(tokenizer) -> None:
    a, b = output(8, 0, 10.0), output(8, 1, 20.0)
    student = output(8, 7, 10.0)
    combined = combine_outputs([a, b], "fixed", [1.0, 1.0])
    objective = build_objective({"kd": {"temperature": 1.0}}, LossContext(8, 16))
    loss, _ = objective(student, combined)
    p_t = 0.5 * a.logits_per_image().softmax(-1) + 0.5 * b.logits_per_image().softmax(-1)
    log_s = student.logits_per_image().log_softmax(-1)
    i2t = (p_t * (p_t.log() - log_s)).sum(-1).mean()
    p_t2 = 0.5 * a.logits_per_text().softmax(-1) + 0.5 * b.logits_per_text().softmax(-1)
    t2i = (p_t2 * (p_t2.log() - student.logits_per_text().log_softmax(-1))).sum(-1).mean()
    assert loss.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-10)


def test_ensemble_runs_each_teacher_on_its_own_inputs(tokenizer) -> None:
    big = build_clip(config_for(teacher_spec(), tokenizer), seed=0)
    small_spec = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=1, patch_size=4),
                                 text=TowerSpec(layers=1, width=16, heads=1), projection_dim=8)
    small_config = config_for(small_spec, tokenizer)
    small_config.vision_config.image_size = 8
    small = build_clip(small_config, seed=1)
    data = make_split("test", 4, image_size=IMAGE_SIZE)
    images = torch.from_numpy(data.images)
    primary = BatchPreprocessor(make_tokenize(tokenizer, TEXT_LENGTH))
    other = BatchPreprocessor.for_model(tokenizer, InputSpec(image_size=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    batch = primary(images, data.captions)
    batch.update({f"teacher1.{k}": v for k, v in other(images, data.captions).items()})
    assert batch["teacher1.pixel_values"].shape == (4, 3, 8, 8)
    ensemble = TeacherEnsemble([big, small], ["", "teacher1"], "fixed", [1.0, 1.0])
    assert ensemble.embed_dim == 32 + 8
    combined = ensemble(batch)
    with torch.no_grad():
        expected = combine_outputs([big(**inputs_for(batch, "")), small(**inputs_for(batch, "teacher1"))], "fixed", [1, 1])
    assert torch.allclose(combined.image_embeds, expected.image_embeds)
    assert not any(p.requires_grad for p in ensemble.parameters())


def test_preprocessor_resizes_after_normalizing_equivalently() -> None:
    images = torch.from_numpy(make_split("test", 2, image_size=16).images)
    pre = BatchPreprocessor(lambda texts: {}, image_size=8, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    pixels = pre(images, ["a", "b"])["pixel_values"]
    raw = images.permute(0, 3, 1, 2).float() / 255
    manual = (F.interpolate(raw, size=(8, 8), mode="bilinear", antialias=True) - 0.5) / 0.25
    assert torch.allclose(pixels, manual, atol=1e-5)
    same = BatchPreprocessor(lambda texts: {}, image_size=16)
    assert torch.equal(same(images, ["a", "b"])["pixel_values"], to_pixel_values(images))


def test_inputs_for_selects_prefixed_keys() -> None:
    batch = {"pixel_values": 1, "input_ids": 2, "teacher1.pixel_values": 3, "teacher1.input_ids": 4}
    assert inputs_for(batch, "") == {"pixel_values": 1, "input_ids": 2}
    assert inputs_for(batch, "teacher1") == {"pixel_values": 3, "input_ids": 4}


def test_ensemble_validation() -> None:
    with pytest.raises(ValueError, match="unknown combine method 'max'"):
        TeacherEnsemble([torch.nn.Linear(1, 1)], method="max")
    with pytest.raises(ValueError, match="positive sum"):
        TeacherEnsemble([torch.nn.Linear(1, 1)], weights=[0.0])


def test_distill_from_two_teachers_with_different_inputs(tmp_path, tokenizer) -> None:
    from vldistill.config import load_config, packaged_config
    from vldistill.data.bundle import load_data
    from vldistill.models.io import read_metadata, save_dual_encoder
    from vldistill.trained import TrainResult
    from vldistill.train.runs import obtain_teacher, train_student

    cfg = load_config(packaged_config("tiny"))
    data = load_data(cfg.data, progress=False)
    primary = obtain_teacher(cfg, data, tmp_path / "teacher")
    # A second teacher taking 8x8 images with another normalization and a 24-d embedding.
    spec = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=1, patch_size=4),
                           text=TowerSpec(layers=1, width=16, heads=1), projection_dim=24)
    config = config_for(spec, primary.tokenizer)
    config.vision_config.image_size = 8
    other = build_clip(config, seed=3)
    other.image_mean, other.image_std = (0.5,) * 3, (0.5,) * 3
    save_dual_encoder(other, primary.tokenizer, tmp_path / "other")
    cfg = load_config(packaged_config("tiny"), [
        f"teacher.path={tmp_path / 'teacher'}",
        f"teacher.ensemble=[{{path: {tmp_path / 'other'}, weight: 0.5}}]",
        "teacher.combine=confidence",
        "distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0}, feature: {weight: 1.0}, icl: {weight: 1.0}}",
    ])
    student = train_student(cfg, data, obtain_teacher(cfg, data, tmp_path / "unused"), tmp_path / "student")
    assert isinstance(student.result, TrainResult) and student.result.steps == cfg.distill.train.steps
    assert student.model.input_spec.image_size == 16  # the student keeps the primary's inputs
    metadata = read_metadata(tmp_path / "student")
    assert metadata["combine"] == "confidence" and metadata["ensemble"][0]["weight"] == 0.5
