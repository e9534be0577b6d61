"""Region data (data/detection.py): the COCO detection reader against a hand-written file with bad boxes, and the
embedded multi-object scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vldistill.data.detection import clip_box, make_scenes, read_coco_detection, scene_class_names


def write_file(folder, annotations):
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 50}, {"id": 9, "file_name": "b.png", "width": 20, "height": 20}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": " dog "}],
        "annotations": annotations,
    }
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes_are_converted_clipped_and_bad_ones_counted(tmp_path):
    path = write_file(tmp_path, [
        {"image_id": 7, "category_id": 1, "bbox": [10, 5, 20, 10]},     # kept: (10, 5, 30, 15), dog
        {"image_id": 7, "category_id": 3, "bbox": [90, 40, 30, 30]},    # clipped to (90, 40, 100, 50), cat
        {"image_id": 7, "category_id": 3, "bbox": [120, 10, 5, 5]},     # wholly outside: box_empty
        {"image_id": 9, "category_id": 3, "bbox": [1, 1, 0, 4]},        # zero width: box_empty
        {"image_id": 8, "category_id": 3, "bbox": [1, 1, 2, 2]},        # unknown image
        {"image_id": 9, "category_id": 5, "bbox": [1, 1, 2, 2]},        # unknown category
        {"image_id": 9, "category_id": 3, "bbox": [2, 3, 4.5, 5]},      # kept: (2, 3, 6.5, 8), cat
    ])
    read = read_coco_detection(path)
    assert read.classnames == ["cat", "dog"]
    assert read.images == [tmp_path / "a.png", tmp_path / "b.png"] and read.sizes == [(100, 50), (20, 20)]
    np.testing.assert_array_equal(read.objects[0].boxes, [[10, 5, 30, 15], [90, 40, 100, 50]])
    np.testing.assert_array_equal(read.objects[0].labels, [1, 0])
    np.testing.assert_array_equal(read.objects[1].boxes, [[2, 3, 6.5, 8]])
    assert [kind for kind, _ in read.problems] == ["box_empty", "box_empty", "unknown_image", "unknown_category"]
    assert "annotations[2]" in read.problems[0][1]


def test_malformed_detection_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json:1 is not valid JSON"):
        read_coco_detection(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO detection file"):
        read_coco_detection(bad)
    path = write_file(tmp_path, [{"image_id": 7, "category_id": 3, "bbox": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"annotations\[0\] needs"):
        read_coco_detection(path)
    with pytest.raises(FileNotFoundError):
        read_coco_detection(tmp_path / "missing.json")


def test_clip_box_by_hand():
    assert clip_box(-5, -5, 10, 10, 8, 8) == (0.0, 0.0, 5.0, 5.0)
    assert clip_box(8, 0, 3, 3, 8, 8) is None and clip_box(0, 0, 3, -1, 8, 8) is None


def test_scenes_are_seeded_and_boxes_hold_exactly_their_shapes_pixels():
    images, objects = make_scenes("test", 12, seed=0, image_size=64, max_objects=3)
    again, _ = make_scenes("test", 12, seed=0, image_size=64, max_objects=3)
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8 and np.array_equal(images, again)
    assert not np.array_equal(images, make_scenes("train", 12, seed=0, image_size=64)[0])
    counts = [len(o.labels) for o in objects]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) > 1
    names = scene_class_names()
    assert len(names) == 40 and names[0] == "red circle"
    for image, found in zip(images, objects):
        bright = image.max(axis=2) > 100  # shapes are bright, the background dark (< 60 + noise)
        covered = np.zeros_like(bright)
        for x0, y0, x1, y1 in found.boxes.astype(int):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert not covered[y0:y1, x0:x1].any()  # boxes do not overlap
            covered[y0:y1, x0:x1] = True
        assert not (bright & ~covered).any()  # every shape pixel lies in a box
        assert ((found.labels >= 0) & (found.labels < 40)).all()
