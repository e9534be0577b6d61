"""The teacher's region-crop embeddings (ViLD-image targets): crops against hand-made images, a cache built with
the tiny CLIP teacher against its embeddings computed directly, reuse, resume and refusal."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vldistill.teachers.cache import regions
from vldistill.teachers.cache.regions import (
    REGION_FIELD,
    build_region_cache,
    crop_regions,
    region_cache_meta,
    region_embeddings,
)
from vldistill.teachers.cache.store import CacheMismatchError, CacheReader


def ramp_image(side: int = 8) -> torch.Tensor:
    """(1, side, side, 3) uint8 image whose pixel (y, x) holds 10 * y + x in channel 0, 100 + that in channel 1 and
    a constant 7 in channel 2."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    value = 10 * y + x
    return torch.stack([value, 100 + value, torch.full_like(value, 7)], dim=-1)[None].to(torch.uint8)


def test_crop_of_a_box_covering_a_2x2_block_is_those_pixels():
    image = ramp_image()
    crops = crop_regions(image, torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0]), context=1.0, size=2)
    assert crops.shape == (1, 3, 2, 2) and crops.dtype == torch.float32
    # rows y = 2, 3 and columns x = 1, 2
    expected = torch.tensor([[21.0, 22.0], [31.0, 32.0]])
    torch.testing.assert_close(crops[0, 0], expected / 255)
    torch.testing.assert_close(crops[0, 1], (expected + 100) / 255)
    torch.testing.assert_close(crops[0, 2], torch.full((2, 2), 7 / 255))


def test_context_enlarges_the_box_about_its_centre():
    image = ramp_image().float()  # float in [0, 255] is taken as well as uint8
    box = torch.tensor([[3.0, 3.0, 5.0, 5.0]])  # the centred 2 x 2 block; context 2 -> pixels 2..5
    crops = crop_regions(image, box, torch.tensor([0]), context=2.0, size=4)
    expected = torch.tensor([[10.0 * y + x for x in range(2, 6)] for y in range(2, 6)])
    torch.testing.assert_close(crops[0, 0], expected / 255)
    # 1.5x: the window (2.5, 5.5) in 3 bins samples at 3.0, 4.0, 5.0, i.e. halfway between pixel centres
    # (index + 0.5), so bilinear sampling of the ramp gives its value at indices 2.5, 3.5, 4.5
    crops = crop_regions(image, box, torch.tensor([0]), context=1.5, size=3)
    coords = torch.tensor([2.5, 3.5, 4.5])
    expected = 10 * coords[:, None] + coords[None, :]
    torch.testing.assert_close(crops[0, 0], expected / 255)


def test_crops_come_from_the_image_each_box_names():
    images = torch.stack([ramp_image()[0], 255 - ramp_image()[0]])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    crops = crop_regions(images, boxes, torch.tensor([1, 0]), context=1.0, size=1)
    torch.testing.assert_close(crops[:, :, 0, 0], torch.tensor([[255.0, 155.0, 248.0], [0.0, 100.0, 7.0]]) / 255)


def scene(count: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three random 32 x 32 images and `count` random boxes on them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    corner = rng.uniform(0, 20, size=(count, 2))
    size = rng.uniform(4, 12, size=(count, 2))
    boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
    return images, boxes, rng.integers(0, 3, size=count)


def direct_embeddings(teacher, images, boxes, image_index, context) -> torch.Tensor:
    """The teacher's normalized embeddings of the crops, computed here without the cache."""
    spec = teacher.input_spec
    crops = crop_regions(torch.from_numpy(images), torch.from_numpy(boxes), torch.from_numpy(image_index), context,
                         spec.image_size)
    mean, std = torch.tensor(spec.image_mean).view(1, 3, 1, 1), torch.tensor(spec.image_std).view(1, 3, 1, 1)
    teacher.eval()
    with torch.no_grad():
        return F.normalize(teacher.encode_image((crops - mean) / std), dim=-1)


def test_cache_rows_are_the_teachers_embeddings_of_the_crops(teacher, tmp_path):
    images, boxes, image_index = scene()
    teacher.train()
    reader = build_region_cache(teacher, images, boxes, image_index, tmp_path / "regions", batch_size=4,
                                shard_rows=6, progress=False)
    assert teacher.training  # the flag is restored
    assert isinstance(reader, CacheReader)
    assert reader.total_rows == 10 and reader.fields == {REGION_FIELD: (teacher.embed_dim, "float32")}
    assert reader.meta["count"] == 10 and reader.meta["context"] == 1.5 and reader.meta["kind"] == "region-crops"
    expected = direct_embeddings(teacher, images, boxes, image_index, 1.5)
    rows = np.array([9, 0, 5, 6])
    stored = region_embeddings(reader, rows)
    assert stored.dtype == torch.float32 and stored.shape == (4, teacher.embed_dim)
    torch.testing.assert_close(stored, expected[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored.norm(dim=-1), torch.ones(4))
    # the crops really differ: embeddings of different regions are not all the same
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_second_build_reuses_the_cache_without_the_teacher(teacher, tmp_path, monkeypatch, caplog):
    images, boxes, image_index = scene()
    root = tmp_path / "regions"
    first = build_region_cache(teacher, images, boxes, image_index, root, batch_size=4, progress=False)
    expected = first.rows(REGION_FIELD, np.arange(10))

    def refuse(pixel_values):
        raise AssertionError("the teacher ran on a complete cache")

    monkeypatch.setattr(teacher, "encode_image", refuse)
    with caplog.at_level("INFO", logger="vldistill.teachers.cache.regions"):
        again = build_region_cache(teacher, images, boxes, image_index, root, batch_size=4, progress=False)
    assert "reusing" in caplog.text
    np.testing.assert_array_equal(again.rows(REGION_FIELD, np.arange(10)), expected)


def test_interrupted_build_resumes_and_ends_equal_to_an_uninterrupted_one(teacher, tmp_path, monkeypatch):
    images, boxes, image_index = scene()
    whole = build_region_cache(teacher, images, boxes, image_index, tmp_path / "whole", batch_size=4, shard_rows=4,
                               progress=False)
    encode, calls = teacher.encode_image, []

    def fail_on_second_batch(pixel_values):
        calls.append(len(pixel_values))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return encode(pixel_values)

    root = tmp_path / "resumed"
    monkeypatch.setattr(teacher, "encode_image", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_region_cache(teacher, images, boxes, image_index, root, batch_size=4, shard_rows=4, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    resumed = build_region_cache(teacher, images, boxes, image_index, root, batch_size=4, shard_rows=4,
                                 progress=False)
    assert calls == [4, 4, 4, 2]  # shard 0, the failed batch, then shards 1 and 2 only
    np.testing.assert_array_equal(
        resumed.rows(REGION_FIELD, np.arange(10)), whole.rows(REGION_FIELD, np.arange(10))
    )


def test_a_cache_for_other_weights_boxes_or_context_is_refused(teacher, tmp_path):
    images, boxes, image_index = scene()
    root = tmp_path / "regions"
    build_region_cache(teacher, images, boxes, image_index, root, progress=False)
    moved = boxes.copy()
    moved[3, 0] += 1
    with pytest.raises(CacheMismatchError, match=r"meta\.regions") as error:
        build_region_cache(teacher, images, moved, image_index, root, progress=False)
    assert f"delete {root}" in str(error.value)
    with pytest.raises(CacheMismatchError, match=r"meta\.context"):
        build_region_cache(teacher, images, boxes, image_index, root, context=1.0, progress=False)
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    with pytest.raises(CacheMismatchError, match=r"meta\.teacher\.sha256") as error:
        build_region_cache(teacher, images, boxes, image_index, root, progress=False)
    assert error.value.differences == [line for line in error.value.differences if line.startswith("meta.teacher.sha256")]


def test_a_started_cache_for_other_boxes_is_refused(teacher, tmp_path, monkeypatch):
    images, boxes, image_index = scene()
    root = tmp_path / "regions"

    def fail(pixel_values):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(teacher, "encode_image", fail)
        with pytest.raises(RuntimeError):
            build_region_cache(teacher, images, boxes, image_index, root, progress=False)
    with pytest.raises(CacheMismatchError, match=r"meta\.regions") as error:
        build_region_cache(teacher, images, boxes[::-1].copy(), image_index, root, progress=False)
    assert "delete" in str(error.value)


def test_meta_names_the_teacher_and_regions(teacher):
    images, boxes, image_index = scene()
    meta = region_cache_meta(teacher, images, boxes, image_index, 1.5)
    spec = teacher.input_spec
    assert meta["teacher"]["class"] == "CLIPDualEncoder" and meta["teacher"]["image_size"] == spec.image_size
    assert meta["teacher"]["image_mean"] == list(spec.image_mean)
    assert meta == region_cache_meta(teacher, images.copy(), boxes.astype(np.float64), image_index, 1.5)
    other_index = image_index.copy()
    other_index[0] = (other_index[0] + 1) % 3
    assert region_cache_meta(teacher, images, boxes, other_index, 1.5)["regions"] != meta["regions"]


def test_bad_regions_are_refused_naming_the_row(teacher, tmp_path):
    images, boxes, image_index = scene()
    flat = boxes.copy()
    flat[4, 3] = flat[4, 1]
    with pytest.raises(ValueError, match="region 4: box .* has no area"):
        build_region_cache(teacher, images, flat, image_index, tmp_path / "a", progress=False)
    wrong = image_index.copy()
    wrong[2] = 3
    with pytest.raises(ValueError, match="region 2: image_index 3 is not one of the 3 images"):
        build_region_cache(teacher, images, boxes, wrong, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_other_processes_wait_for_the_first_to_finish(teacher, tmp_path, monkeypatch):
    """A process of rank > 0 never runs the teacher or writes: it waits until the first process has finished the
    cache (here the first process builds it during the other's first wait), then reads the same rows."""
    images, boxes, image_index = scene()
    root = tmp_path / "regions"
    rank, waits = [1], []

    def first_process_builds(seconds):
        assert not root.exists()  # the waiting process wrote nothing
        waits.append(seconds)
        rank[0] = 0
        build_region_cache(teacher, images, boxes, image_index, root, batch_size=4, progress=False)
        rank[0] = 1

    monkeypatch.setattr(regions, "process_rank", lambda: (rank[0], 2))
    monkeypatch.setattr(regions, "time", SimpleNamespace(sleep=first_process_builds))
    reader = build_region_cache(teacher, images, boxes, image_index, root, batch_size=4, progress=False)
    assert waits == [regions.WAIT_SECONDS]
    expected = direct_embeddings(teacher, images, boxes, image_index, 1.5)
    torch.testing.assert_close(region_embeddings(reader, np.arange(10)), expected, atol=1e-5, rtol=1e-5)
