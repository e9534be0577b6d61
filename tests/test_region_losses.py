"""ViLD's region losses (losses/regions.py) against references computed another way, and the region student
(models/region_student.py): pooling, resizing and its saved folder."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

from vldistill.losses.base import LossContext
from vldistill.losses.registry import build_objective
from vldistill.models.region_student import RegionStudent, vision_at_size
from vldistill.models.regions import roi_align, token_grid
from vldistill.models.signals import Signals

D = 4


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_region_image_l1_and_cosine_match_sums_by_hand() -> None:
    student, teacher = unit(3, D), unit(3, D)
    expected_l1 = sum(sum(abs(float(student[r, k] - teacher[r, k])) for k in range(D)) for r in range(3)) / 3
    expected_cos = sum(1 - sum(float(student[r, k] * teacher[r, k]) for k in range(D)) for r in range(3)) / 3
    for distance, expected in (("l1", expected_l1), ("cosine", expected_cos)):
        objective = build_objective({"region_image": {"distance": distance}}, LossContext(D, D))
        loss, parts = objective(Signals(region_embeds=student), Signals(region_crop_embeds=teacher))
        assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert objective.needs == {"region_crop_embeds"}


def test_region_image_refuses_an_unknown_distance() -> None:
    with pytest.raises(ValueError, match=r"losses\.region_image\.distance must be one of l1, cosine"):
        build_objective({"region_image": {"distance": "l2"}}, LossContext(D, D))


def test_region_text_is_cross_entropy_over_base_classes_and_background_skipping_unlabelled() -> None:
    classes, background = unit(3, D), unit(D)
    embeds = unit(5, D)
    labels = torch.tensor([0, 2, 3, -1, 1])  # 3 = background; -1 = no label
    temperature = 0.1
    objective = build_objective(
        {"region_text": {"temperature": temperature}}, LossContext(D, D, class_embeddings=classes.float())
    )
    loss, parts = objective(Signals(region_embeds=embeds, region_labels=labels, region_background=background), None)
    targets = [*classes, background]
    terms = []
    for row, label in zip(embeds, labels.tolist()):
        if label < 0:
            continue
        scores = [float(row @ t) / temperature for t in targets]
        terms.append(-scores[label] + math.log(sum(math.exp(s) for s in scores)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert objective.needs == frozenset()  # ViLD-text reads no teacher signal while training


def test_region_text_without_labelled_regions_is_zero_and_needs_class_embeddings() -> None:
    objective = build_objective({"region_text": {}}, LossContext(D, D, class_embeddings=unit(3, D).float()))
    student = Signals(region_embeds=unit(2, D).requires_grad_(), region_labels=torch.tensor([-1, -1]), region_background=unit(D))
    loss, _ = objective(student, None)
    assert loss.item() == 0.0
    loss.backward()  # still a graph: every process backpropagates through the same parameters
    with pytest.raises(ValueError, match="region_text needs the teacher's base-class text embeddings"):
        build_objective({"region_text": {}}, LossContext(D, D))


def tiny_vision(image_size: int = 32) -> CLIPVisionModel:
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=8)
    return CLIPVisionModel(config).eval()


def test_vision_at_size_keeps_the_model_at_its_own_size_and_interpolates_positions_for_a_larger_one() -> None:
    vision = tiny_vision(32)
    same = vision_at_size(vision, 32).eval()
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.allclose(same(pixel_values=pixels).last_hidden_state, vision(pixel_values=pixels).last_hidden_state)
    larger = vision_at_size(vision, 64).eval()
    big = torch.randn(1, 3, 64, 64)
    expected = vision(pixel_values=big, interpolate_pos_encoding=True).last_hidden_state  # transformers' own interpolation
    assert torch.allclose(larger(pixel_values=big).last_hidden_state, expected, atol=1e-5)
    assert larger.config.image_size == 64
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        vision_at_size(vision, 60)


def test_region_student_embeds_boxes_by_pooling_the_token_grid_and_round_trips_its_folder(tmp_path) -> None:
    student = RegionStudent(tiny_vision(32), embed_dim=6, pool_size=2).eval()
    pixels = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 24.0]])
    index = torch.tensor([1, 0])
    out = student(pixels, boxes, index, torch.tensor([2, -1]))
    with torch.no_grad():  # the same computation written out: tokens -> grid -> RoIAlign -> LN per bin -> head
        hidden = student.vision(pixel_values=pixels).last_hidden_state
        pooled = roi_align(token_grid(hidden, 32, 8), boxes, index, 1 / 8, 2)  # (2, 16, 2, 2)
        bins = [student.vision.post_layernorm(pooled[:, :, i, j]) for i in range(2) for j in range(2)]  # row-major bins
        expected = F.normalize(student.head(torch.cat(bins, dim=1)), dim=-1)
    assert torch.allclose(out.region_embeds, expected, atol=1e-6)
    assert out.region_labels.tolist() == [2, -1]
    assert out.region_background.norm().item() == pytest.approx(1.0)
    student.save_pretrained(tmp_path / "student", {"role": "test"})
    loaded = RegionStudent.from_pretrained(tmp_path / "student").eval()
    assert torch.allclose(loaded(pixels, boxes, index).region_embeds, out.region_embeds, atol=1e-6)
    assert CLIPVisionModel.from_pretrained(tmp_path / "student" / "vision").config.image_size == 32  # plain transformers
    with pytest.raises(ValueError, match="region.json is missing"):
        RegionStudent.from_pretrained(tmp_path)
