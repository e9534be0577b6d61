"""Streaming webdataset shards: good samples exactly, bad ones counted by kind, rank/worker split,
per-epoch order, resumption and no retained images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vldistill.data.quality import DataQuality
from vldistill.data.webdataset import SHARD_STRIDE, WebDatasetPairs, split_shards, write_synthetic_shards

SIZE = 16
GOOD_SHARDS, PER_SHARD = 4, 3


def _member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 good shards of 3 pairs, a shard with broken members, a tar cut inside a member, an unopenable .tar."""
    folder = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(folder, GOOD_SHARDS * PER_SHARD, PER_SHARD, image_size=SIZE, seed=0)
    with tarfile.open(folder / "broken.tar", "w") as archive:
        _member(archive, "good1.png", _png(10))
        _member(archive, "good1.txt", b"a red circle")
        _member(archive, "trunc.png", _png(20)[:-30])
        _member(archive, "trunc.txt", b"a truncated square")
        _member(archive, "noimage.txt", b"a caption alone")
        _member(archive, "nocap.png", _png(30))
        _member(archive, "empty.png", _png(40))
        _member(archive, "empty.txt", b"  \n")
        _member(archive, "text.jpg", b"this is not an image at all")
        _member(archive, "text.txt", b"a fake jpeg")
        _member(archive, "good2.png", _png(50))
        _member(archive, "good2.txt", b"a blue square")
        _member(archive, "good2.json", b"{}")
    whole = (folder / "00000.tar").read_bytes()
    with tarfile.open(folder / "00000.tar") as archive:
        second_image = [m for m in archive.getmembers() if m.name.endswith(".jpg")][1]
    (folder / "cut.tar").write_bytes(whole[: second_image.offset_data + 10])
    (folder / "unopenable.tar").write_bytes(b"\x00\x01not a tar archive" * 3)
    return folder


def test_yields_exactly_the_good_samples_and_counts_bad_ones(shards):
    quality = DataQuality()
    dataset = WebDatasetPairs(shards, SIZE, quality, shuffle_shards=False)
    samples = list(dataset)
    names = [Path(p).name for p in dataset.shards]
    assert names == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "broken.tar", "cut.tar", "unopenable.tar"]
    # 12 synthetic + 2 good in broken.tar + the first pair of cut.tar
    assert len(samples) == GOOD_SHARDS * PER_SHARD + 3 and quality.good == len(samples)
    assert dict(quality.bad) == {"truncated": 1, "missing": 2, "empty_caption": 1, "not_image": 1, "unreadable_member": 2}
    assert any("unopenable.tar: cannot open shard" in e for e in quality.examples["unreadable_member"])
    assert quality.examples["missing"][0].startswith("broken.tar:noimage: ")

    broken = [s for s in samples if s.index // SHARD_STRIDE == 4]
    assert [(s.caption, s.index % SHARD_STRIDE, int(s.image[0, 0, 0])) for s in broken] == [
        ("a red circle", 0, 10), ("a blue square", 6, 50)
    ]
    with tarfile.open(shards / "00001.tar") as archive:
        image_bytes = archive.extractfile("000010002.jpg").read()
        caption = archive.extractfile("000010002.txt").read().decode()
    sample = next(s for s in samples if s.index == 1 * SHARD_STRIDE + 2)
    expected = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(sample.image.numpy(), expected) and sample.caption == caption and sample.attributes is None


def test_every_sample_read_once_across_ranks_and_workers(shards):
    single = sorted(s.index for s in WebDatasetPairs(shards, SIZE, DataQuality(), seed=3))
    seen = []
    for rank in range(2):
        dataset = WebDatasetPairs(shards, SIZE, DataQuality(), seed=3, rank=rank, world_size=2)
        dataset.set_epoch(1)
        seen += [s.index for s in DataLoader(dataset, batch_size=None, num_workers=2)]
    assert sorted(seen) == single and len(set(seen)) == len(seen)
    order = list(range(10))
    parts = [split_shards(order, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == order


def test_order_is_deterministic_per_seed_and_epoch(shards):
    def order(seed: int, epoch: int) -> list[int]:
        dataset = WebDatasetPairs(shards, SIZE, DataQuality(), seed=seed)
        dataset.set_epoch(epoch)
        return [s.index for s in dataset]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and sorted(order(0, 0)) == sorted(order(0, 1))
    assert order(0, 2) != order(1, 2)


def test_state_dict_resumes_at_the_next_sample(shards):
    full_dataset = WebDatasetPairs(shards, SIZE, DataQuality(), seed=5)
    full_dataset.set_epoch(2)
    full = [s.index for s in full_dataset]
    for stop in (1, PER_SHARD, len(full) - 1):
        dataset = WebDatasetPairs(shards, SIZE, DataQuality(), seed=5)
        dataset.set_epoch(2)
        iterator = iter(dataset)
        head = [next(iterator).index for _ in range(stop)]
        state = dataset.state_dict()
        assert state["epoch"] == 2
        resumed = WebDatasetPairs(shards, SIZE, DataQuality(), seed=5)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # a training loop re-setting the epoch keeps the restored position
        assert head + [s.index for s in resumed] == full
    assert resumed.state_dict() == {"epoch": 2, "shard_cursor": 0, "sample_in_shard": 0}


def test_iteration_keeps_no_images(shards):
    dataset = WebDatasetPairs(shards, SIZE, DataQuality())
    for _ in dataset:
        pass
    held = [v for v in vars(dataset).values() if isinstance(v, (torch.Tensor, np.ndarray, bytes, dict, set))]
    assert held == [] and all(isinstance(p, str) for p in dataset.shards)


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        WebDatasetPairs(str(tmp_path), SIZE, DataQuality())
    write_synthetic_shards(tmp_path, 2, 2, image_size=SIZE)
    with pytest.raises(ValueError, match="rank"):
        WebDatasetPairs(str(tmp_path), SIZE, DataQuality(), rank=2, world_size=2)
