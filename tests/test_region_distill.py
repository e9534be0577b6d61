"""Region distillation (ViLD): the region data (proposals, COCO files at the student's size, batches), the scores
and `vldistill region-distill` end to end on the tiny config."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from vldistill.binding import ConfigError
from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.detection import (
    Proposals, box_iou, detection_regions, fitted_boxes, region_proposals, scene_regions,
)
from vldistill.data.quality import DataQualityError
from vldistill.eval.base_novel import ClassSplit
from vldistill.eval.regions import classification_figures, embed_proposals, proposal_scores
from vldistill.models.region_student import RegionStudent
from vldistill.region_distill import training_labels
from vldistill.train.region_loop import region_batches


def test_training_labels_name_base_classes_background_and_unlabelled_novel_objects() -> None:
    proposals = Proposals(np.zeros((5, 4), np.float32), np.zeros(5, np.int64), np.array([3, 1, -1, 0, 2]))
    split = ClassSplit(base=(1, 3), novel=(0, 2))
    assert training_labels(proposals, split, "background").tolist() == [1, 0, 2, 2, 2]
    assert training_labels(proposals, split, "ignore").tolist() == [1, 0, 2, -1, -1]


def test_fitted_boxes_follow_the_resize_and_centre_crop_of_the_image() -> None:
    # a 100 x 50 image at 64 px: scale 1.28 -> 128 x 64, crop from x = 32
    boxes = np.array([[40, 10, 60, 20], [0, 0, 20, 50], [30, 0, 40, 50]], dtype=np.float32)
    fitted, kept = fitted_boxes(boxes, 100, 50, 64)
    assert kept.tolist() == [0, 2]  # the second box lies wholly left of the crop
    np.testing.assert_allclose(fitted, [[19.2, 12.8, 44.8, 25.6], [6.4, 0, 19.2, 64]], atol=1e-4)


def test_region_proposals_hold_every_object_and_background_boxes_clear_of_them() -> None:
    regions = scene_regions("train", 12, seed=3, image_size=64)
    proposals = region_proposals(regions, background=2, seed=5)
    objects = sum(len(o.boxes) for o in regions.objects)
    assert int(proposals.is_object.sum()) == objects and len(proposals) == objects + 2 * 12
    for image, obj in enumerate(regions.objects):
        rows = proposals.image_index == image
        np.testing.assert_array_equal(proposals.boxes[rows & proposals.is_object], obj.boxes)
        background = proposals.boxes[rows & ~proposals.is_object]
        assert box_iou(background, obj.boxes).max() < 0.3
        assert ((background >= 0) & (background <= 64)).all()
    again = region_proposals(regions, background=2, seed=5)
    np.testing.assert_array_equal(again.boxes, proposals.boxes)


def test_region_batches_visit_every_image_once_an_epoch_with_all_its_proposals() -> None:
    regions = scene_regions("train", 6, seed=0, image_size=32, max_objects=2)
    proposals = region_proposals(regions, background=1, seed=0)
    labels = np.arange(len(proposals))
    batches = list(region_batches(regions, proposals, labels, batch_size=3, steps=4, seed=0))
    seen = [set(proposals.image_index[b.rows].tolist()) for b in batches]
    assert seen[0] | seen[1] == set(range(6)) and seen[2] | seen[3] == set(range(6))
    for batch in batches:
        np.testing.assert_array_equal(batch.labels, labels[batch.rows])
        np.testing.assert_array_equal(batch.boxes, proposals.boxes[batch.rows])
        for local, row in zip(batch.image_index, batch.rows):  # each box sits on the batch image it came from
            np.testing.assert_array_equal(batch.images[local], regions.images[proposals.image_index[row]])


def write_detection_file(folder, images, annotations, categories):
    path = folder / "det.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_detection_regions_decode_images_at_the_students_size_and_count_what_they_skip(tmp_path) -> None:
    Image.new("RGB", (100, 50), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40), (10, 10, 200)).save(tmp_path / "b.png")
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}, {"id": 2, "file_name": "b.png", "width": 40, "height": 40}]
    annotations = [
        {"image_id": 1, "category_id": 7, "bbox": [40, 10, 20, 10]},
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 20, 50]},  # cut away by the centre crop
        {"image_id": 2, "category_id": 9, "bbox": [10, 10, 0, 5]},  # zero width
        {"image_id": 2, "category_id": 9, "bbox": [20, 20, 10, 10]},
    ]
    path = write_detection_file(tmp_path, images, annotations, [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}])
    regions = detection_regions(path, 64, progress=False)
    assert regions.images.shape == (2, 64, 64, 3) and regions.classnames == ["cat", "dog"]
    np.testing.assert_allclose(regions.objects[0].boxes, [[19.2, 12.8, 44.8, 25.6]], atol=1e-4)
    np.testing.assert_allclose(regions.objects[1].boxes, [[32, 32, 48, 48]], atol=1e-4)  # 40 px -> 64 px: x1.6
    assert regions.objects[1].labels.tolist() == [1]
    assert regions.problem_counts() == {"box_cropped": 1, "box_empty": 1}
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataQualityError, match="too many bad images"):
        detection_regions(path, 64, progress=False)


def test_proposal_scores_are_a_softmax_whose_background_column_is_dropped() -> None:
    logits = torch.tensor([[0.5, 0.1]])
    background = torch.tensor([0.9])
    scores = proposal_scores(logits, 10.0, background)
    total = math.exp(5) + math.exp(1) + math.exp(9)
    assert scores.tolist()[0] == pytest.approx([math.exp(5) / total, math.exp(1) / total])
    plain = proposal_scores(logits, 10.0)
    assert plain.sum().item() == pytest.approx(1.0)


def test_embed_proposals_in_batches_equals_one_image_at_a_time() -> None:
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    student = RegionStudent(CLIPVisionModel(config), embed_dim=8)
    regions = scene_regions("test", 5, image_size=32, max_objects=2)
    proposals = region_proposals(regions, background=1, seed=0)
    batched = embed_proposals(student, regions, proposals, batch_size=2)
    single = embed_proposals(student, regions, proposals, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5) and student.training


def test_region_distill_config_refuses_impossible_settings() -> None:
    with pytest.raises(ConfigError, match="arm 'image' trains with region_image"):
        load_config(None, ["region_distill.losses={region_text: {}}"])
    with pytest.raises(ConfigError, match="give both detections and test_detections"):
        load_config(None, [f"region_distill.detections={packaged_config('tiny')}"])
    with pytest.raises(ConfigError, match="unlabelled_objects must be one of background, ignore"):
        load_config(None, ["region_distill.unlabelled_objects=drop"])
    with pytest.raises(ConfigError, match="kd is no region loss"):
        load_config(None, ["region_distill.losses={region_text: {}, region_image: {}, kd: {}}"])


def test_region_distill_command_trains_three_arms_from_one_start_and_reports_what_the_saved_students_do(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "region-distill", str(packaged_config("tiny")), "--out", str(out), "-q",
        "--set", "region_distill.image_size=32", "--set", "region_distill.train_scenes=24",
        "--set", "region_distill.test_scenes=40", "--set", "region_distill.train.steps=3",
        "--set", "region_distill.train.batch_size=8", "--set", "region_distill.train.warmup_steps=1",
        "--set", "region_distill.train.log_every=1",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "student-text", "student-image", "student-both"}
    split = summary["classes"]
    assert len(split["base"]) == len(split["novel"]) == 20 and not set(split["base"]) & set(split["novel"])
    for arm, losses in (("text", {"loss/region_text"}), ("image", {"loss/region_image"}), ("both", {"loss/region_text", "loss/region_image"})):
        logged = json.loads((out / "logs" / f"student-{arm}.jsonl").read_text().splitlines()[-1])
        assert {key for key in logged if key.startswith("loss/") and key != "loss/total"} == losses
        assert logged["step"] == 3
    adds = summary["image_adds"]
    models = summary["models"]
    assert adds["novel_acc1"] == pytest.approx(models["student-both"]["novel_acc1"] - models["student-text"]["novel_acc1"])
    assert summary["train_regions"]["background"] == 2 * 24 and summary["test_regions"]["background"] == 2 * 40
    # the saved student classifies the test boxes as the summary says
    cfg = load_config(packaged_config("tiny"), ["region_distill.image_size=32", "region_distill.test_scenes=40"])
    test = scene_regions("test", 40, cfg.data.seed, 32, cfg.region_distill.max_objects)
    proposals = region_proposals(test, 2, cfg.seed + 1)
    student = RegionStudent.from_pretrained(out / "student-both")
    classes = load_file(str(out / "class_embeddings.safetensors"))["class_embeddings"]
    names = test.classnames
    class_split = ClassSplit(tuple(names.index(n) for n in split["base"]), tuple(names.index(n) for n in split["novel"]))
    objects = proposals.is_object
    logits = embed_proposals(student, test, proposals)[torch.as_tensor(objects)] @ classes.T
    figures = classification_figures(logits, proposals.classes[objects], class_split)
    assert figures["novel_acc1"] == pytest.approx(models["student-both"]["novel_acc1"])
    assert figures["base_recall"] == pytest.approx(models["student-both"]["base_recall"])
    assert "ViLD-image adds over ViLD-text" in capsys.readouterr().out
    assert (out / "region_cache" / "train" / "manifest.json").is_file()
