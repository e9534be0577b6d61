"""The fixed held-out batch gap weighting measures on: always the asked number of good pairs, a bad pair
replaced by the next good one of the seeded order, and several processes' shares equal in size, disjoint
and together exactly the one-process batch, so the gather in `refresh_gap` works whatever is bad."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import IndexPairs
from torch.utils.data import IterableDataset

from vldistill.data.bundle import DataBundle
from vldistill.data.pairs import held_out_pairs
from vldistill.data.quality import DataQuality
from vldistill.data.sources import ManifestPairs
from vldistill.data.synthetic import make_split
import vldistill.train.runs as runs

# The order seed 0 shuffles 24 pairs in (torch.randperm), listed so the cases below can be worked by hand.
ORDER_24 = [20, 5, 3, 12, 7, 2, 13, 17, 4, 1, 19, 22, 9, 18, 11, 8, 16, 10, 0, 14, 15, 23, 21, 6]
CORRUPT = (5, 12, 17)  # 2nd, 4th and 8th in that order: two in the first process's half, one in the second's


def manifest_bundle(tmp_path, corrupt=CORRUPT) -> tuple[DataBundle, np.ndarray]:
    """24 shapes pairs as 16x16 PNGs in a JSONL manifest (the training data), the `corrupt` ones garbage or a
    truncated PNG; also the images as made."""
    split = make_split("train", 24, seed=0, image_size=16)
    for i, image in enumerate(split.images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    for k, index in enumerate(corrupt):
        path = tmp_path / f"{index}.png"
        path.write_bytes(b"not an image" if k % 2 else path.read_bytes()[:60])
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(split.captions)))
    quality = DataQuality()
    data = DataBundle(
        name="files", train=ManifestPairs(manifest, 16, quality), test=make_split("test", 4, image_size=16),
        zeroshot=None, classnames=None, templates=[], fingerprint="files", quality=quality,
    )
    return data, split.images


def pixels(images, captions):
    return {"pixel_values": images.float()}


def held_out(data, monkeypatch, rank=0, world=1, batch_size=8, seed=0) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(runs, "process_rank", lambda: (rank, world))
    return runs.held_out_batch(data, pixels, batch_size, seed)


def test_bad_pairs_are_replaced_by_the_next_good_ones_of_the_seeded_order(tmp_path, monkeypatch):
    data, images = manifest_bundle(tmp_path)
    batch = held_out(data, monkeypatch)
    # the first 8 of ORDER_24 without 5, 12 and 17
    assert batch["sample_index"].tolist() == [20, 3, 7, 2, 13, 4, 1, 19]
    assert torch.equal(batch["pixel_values"], torch.from_numpy(images[[20, 3, 7, 2, 13, 4, 1, 19]]).float())
    assert data.quality.bad == {"truncated": 2, "not_image": 1} and data.quality.good == 8
    again = held_out(data, monkeypatch)
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    assert held_out(data, monkeypatch, seed=1)["sample_index"].tolist() == [13, 2, 18, 20, 7, 6, 23, 4]


def test_two_processes_take_equal_disjoint_shares_that_make_up_the_one_process_batch(tmp_path, monkeypatch):
    data, _ = manifest_bundle(tmp_path)
    one = held_out(data, monkeypatch)["sample_index"].tolist()
    shares = [held_out(data, monkeypatch, rank, world=2)["sample_index"].tolist() for rank in (0, 1)]
    assert shares == [[20, 3, 7, 2], [13, 4, 1, 19]]
    assert shares[0] + shares[1] == one
    quarters = [held_out(data, monkeypatch, rank, world=4)["sample_index"].tolist() for rank in range(4)]
    assert [len(q) for q in quarters] == [2] * 4 and sum(quarters, []) == one


def test_too_few_good_pairs_is_one_clear_error(tmp_path, monkeypatch):
    data, _ = manifest_bundle(tmp_path, corrupt=range(17))  # 7 good pairs for a batch of 8
    with pytest.raises(ValueError, match=r"^the held-out batch needs 8 good pairs, but the 24 pairs of the training "
                                         r"data it drew hold only 7 \(see the data quality report\)$"):
        held_out(data, monkeypatch)
    # the same error for every process
    for rank in (0, 1):
        with pytest.raises(ValueError, match="needs 8 good pairs"):
            held_out(data, monkeypatch, rank, world=2)


def indices(samples) -> list[int]:
    return [sample.index for sample in samples]


def test_a_set_smaller_than_the_batch_is_used_whole_in_equal_shares():
    # seed 0 orders 5 pairs as 4, 0, 1, 3, 2
    assert indices(held_out_pairs(IndexPairs(5), 8, seed=0)) == [4, 0, 1, 3, 2]
    assert [indices(held_out_pairs(IndexPairs(5), 8, 0, rank, world=2)) for rank in (0, 1)] == [[4, 0], [1, 3]]
    assert [indices(held_out_pairs(IndexPairs(5, bad={0}), 8, 0, rank, world=2)) for rank in (0, 1)] == [[4, 1], [3, 2]]
    with pytest.raises(ValueError, match=r"needs 5 good pairs, but the 5 pairs of the data it drew hold only 4"):
        held_out_pairs(IndexPairs(5, bad={0}), 8, seed=0)
    with pytest.raises(ValueError, match=r"^the held-out batch needs a pair per process, but the data holds 1 for 2$"):
        held_out_pairs(IndexPairs(1), 8, 0, 0, world=2)


def test_replacements_come_from_the_first_32_pairs_per_position_at_most():
    # seed 0 orders 100 pairs starting 44, 19, ..., with 1 at place 63 and 51 last; a batch of 2 draws 64
    good = {44, 1, 51}
    assert indices(held_out_pairs(IndexPairs(100, bad=set(range(100)) - good), 2, seed=0)) == [44, 1]
    with pytest.raises(ValueError, match=r"needs 2 good pairs, but the 64 pairs of the data it drew hold only 1"):
        held_out_pairs(IndexPairs(100, bad=set(range(100)) - {44, 51}), 2, seed=0)


class Stream(IterableDataset):
    """A stream of `size` pairs in which every third is bad input (None)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self):
        for index in range(self.size):
            yield None if index % 3 == 0 else IndexPairs(self.size)[index]


def test_a_stream_gives_each_process_its_first_good_pairs_or_one_clear_error():
    assert indices(held_out_pairs(Stream(20), 8, seed=0, rank=1, world=2)) == [1, 2, 4, 5]
    assert indices(held_out_pairs(Stream(20), 8, seed=0)) == [1, 2, 4, 5, 7, 8, 10, 11]
    with pytest.raises(ValueError, match=r"^the held-out batch needs 8 good pairs from process 0's part of the data, "
                                         r"which holds only 6; lower the batch size or add data$"):
        held_out_pairs(Stream(9), 8, seed=0)
