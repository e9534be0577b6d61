"""The teacher cache store: round trip, resume after a crash, and every refusal with its message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vldistill.teachers.cache import store
from vldistill.teachers.cache import (
    CacheCorruptError,
    CacheFormatError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheReader,
    CacheWriter,
    diff_dicts,
    shard_file_name,
)

FIELDS = {"teacher0/image": (8, "float16"), "teacher0/text": (8, "float16"), "view_params": (3, "float32")}
META = {"teacher": {"sha256": "ab12", "name": "tiny"}, "views": 2}
TOTAL, SHARD = 10, 4  # 3 shards, the last of 2 rows


def source_arrays(total: int = TOTAL) -> dict[str, np.ndarray]:
    """Deterministic full-length arrays, one per field, in the field's dtype."""
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((total, dim)).astype(dtype) for name, (dim, dtype) in FIELDS.items()}


def write_shards(writer: CacheWriter, source: dict[str, np.ndarray], count: int) -> None:
    """Write the next `count` shards of `source` through `writer`."""
    for _ in range(count):
        start, stop = writer.next_shard()
        writer.write_shard(start // writer.shard_rows, {k: v[start:stop] for k, v in source.items()})


def build(root: Path, source: dict[str, np.ndarray], meta: dict = META) -> Path:
    """A complete cache of `source` at `root`."""
    writer = CacheWriter.open(root, meta, FIELDS, TOTAL, SHARD)
    write_shards(writer, source, 3)
    writer.finish()
    return root


def test_round_trip_in_arbitrary_order(tmp_path):
    source = source_arrays()
    reader = CacheReader.open(build(tmp_path / "c", source), expected_meta=META, verify=True)
    order = np.array([9, 0, 5, 4, 3, 8, 1, 9, 2])
    for name in FIELDS:
        got = reader.rows(name, order)
        assert got.dtype == source[name].dtype
        np.testing.assert_array_equal(got, source[name][order])
    assert reader.rows("view_params", np.array([], dtype=np.int64)).shape == (0, 3)
    assert reader.total_rows == TOTAL and reader.fields == FIELDS and reader.meta == META
    assert reader.bytes_per_row() == 8 * 2 + 8 * 2 + 3 * 4
    assert reader.disk_bytes() == sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    with pytest.raises(IndexError, match="row 10 is out of range"):
        reader.rows("view_params", np.array([1, 10]))


def test_resume_after_crash_matches_an_uninterrupted_cache(tmp_path):
    source = source_arrays()
    root = tmp_path / "resumed"
    write_shards(CacheWriter.open(root, META, FIELDS, TOTAL, SHARD), source, 2)  # then "crash"
    garbage = root / shard_file_name("teacher0/image", 2)
    garbage.write_bytes(b"half a shard")
    temp = root / ".view_params-00002.npy.x1y2.tmp"
    temp.write_bytes(b"partial")

    writer = CacheWriter.open(root, META, FIELDS, TOTAL, SHARD)
    assert writer.next_shard() == (8, 10)
    assert not garbage.exists() and not temp.exists()
    write_shards(writer, source, 1)
    assert writer.next_shard() is None
    writer.finish()

    fresh = build(tmp_path / "fresh", source)
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for path in fresh.glob("*.npy"):
        assert (root / path.name).read_bytes() == path.read_bytes()
    manifests = [json.loads((r / "manifest.json").read_text()) for r in (root, fresh)]
    for manifest in manifests:
        manifest.pop("created")
    assert manifests[0] == manifests[1]


def test_partial_cache_is_refused_with_counts(tmp_path):
    writer = CacheWriter.open(tmp_path, META, FIELDS, TOTAL, SHARD)
    write_shards(writer, source_arrays(), 2)
    with pytest.raises(CacheIncompleteError, match=r"holds 2 of 3 shards \(8 of 10 rows\); run `vldistill cache` again"):
        CacheReader.open(tmp_path)
    with pytest.raises(CacheIncompleteError, match="2 of 3 shards are written"):
        writer.finish()


def test_meta_mismatch_lists_dotted_keys_and_both_values(tmp_path):
    build(tmp_path, source_arrays())
    other = {"teacher": {"sha256": "cd34", "name": "tiny"}, "views": 2, "extra": 1}
    with pytest.raises(CacheMismatchError) as error:
        CacheReader.open(tmp_path, expected_meta=other)
    assert "meta.teacher.sha256: cache has 'ab12', expected 'cd34'" in str(error.value)
    assert error.value.differences == [
        "meta.extra: cache has no such key, expected 1",
        "meta.teacher.sha256: cache has 'ab12', expected 'cd34'",
    ]
    with pytest.raises(CacheMismatchError, match=r"(?s)fields\.teacher0/text\.dim: cache has 8, expected 4.*total_rows"):
        CacheWriter.open(tmp_path, META, {**FIELDS, "teacher0/text": (4, "float16")}, TOTAL + 1, SHARD)


def test_diff_dicts_compares_leaves_by_json_type():
    assert diff_dicts({"a": {"b": 1}}, {"a": {"b": 1}}) == []
    assert diff_dicts({"a": 1}, {"a": True}, prefix="meta") == ["meta.a: cache has True, expected 1"]


def test_missing_and_foreign_caches_are_refused(tmp_path):
    with pytest.raises(CacheNotFoundError, match="folder does not exist"):
        CacheReader.open(tmp_path / "nowhere")
    with pytest.raises(CacheNotFoundError, match="manifest.json is missing"):
        CacheReader.open(tmp_path)
    root = build(tmp_path / "c", source_arrays())
    manifest = json.loads((root / "manifest.json").read_text())
    for change in ({"version": 2}, {"format": "something-else"}):
        (root / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(CacheFormatError, match="expected 'vldistill-teacher-cache' version 1"):
            CacheReader.open(root)
        with pytest.raises(CacheFormatError):
            CacheWriter.open(root, META, FIELDS, TOTAL, SHARD)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no manifest.json but holds 1 other entries"):
        CacheWriter.open(tmp_path / "other", META, FIELDS, TOTAL, SHARD)


def test_truncated_and_corrupt_shards_are_refused(tmp_path):
    root = build(tmp_path, source_arrays())
    path = root / shard_file_name("teacher0/text", 1)
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(CacheCorruptError, match=f"{path.name} is {len(data) - 2} bytes, the manifest records {len(data)}"):
        CacheReader.open(root)
    with pytest.raises(CacheCorruptError, match=f"{path.name} is {len(data) - 2} bytes"):
        CacheWriter.open(root, META, FIELDS, TOTAL, SHARD)  # resuming checks listed shards too
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    reader = CacheReader.open(root)  # same size: the bytes are checked as they are first read
    with pytest.raises(CacheCorruptError, match=f"shard 1 file {path.name} is corrupt"):
        reader.rows("teacher0/text", np.array([5]))
    with pytest.raises(CacheCorruptError, match=f"shard 1 file {path.name} is corrupt"):
        CacheReader.open(root, verify=True)
    path.unlink()
    with pytest.raises(CacheCorruptError, match=f"{path.name} is missing"):
        CacheReader.open(root)


@pytest.mark.parametrize("byte", [3, 60, 128 + 5, -1])  # magic, header, first value, last value
def test_a_flipped_bit_is_refused_when_its_shard_is_first_read(tmp_path, byte):
    source = source_arrays()
    root = build(tmp_path, source)
    path = root / shard_file_name("teacher0/image", 1)
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x10
    path.write_bytes(bytes(data))
    reader = CacheReader.open(root, expected_meta=META)
    intact = np.array([0, 3, 8, 9])  # shards 0 and 2
    np.testing.assert_array_equal(reader.rows("teacher0/image", intact), source["teacher0/image"][intact])
    np.testing.assert_array_equal(reader.rows("teacher0/text", np.array([4, 7])), source["teacher0/text"][[4, 7]])
    for _ in range(2):  # refused on every read, never served
        with pytest.raises(
            CacheCorruptError, match=rf"at {root}: shard 1 file teacher0__image-00001\.npy is corrupt: its sha256 [0-9a-f]{{64}} "
            r"does not match the manifest's [0-9a-f]{64}; delete the folder"
        ):
            reader.rows("teacher0/image", np.array([0, 6]))


def test_each_shard_file_is_hashed_once_however_often_it_is_read(tmp_path, monkeypatch):
    source = source_arrays()
    root = build(tmp_path, source)
    hashed = []
    read_verified = store._read_verified

    def counting(root, record, shard):
        hashed.append(record["name"])
        return read_verified(root, record, shard)

    monkeypatch.setattr(store, "_read_verified", counting)
    reader = CacheReader.open(root, expected_meta=META)
    rng = np.random.default_rng(1)
    for _ in range(5):
        order = rng.permutation(TOTAL)
        for name in FIELDS:
            np.testing.assert_array_equal(reader.rows(name, order), source[name][order])
    files = sorted(p.name for p in root.glob("*.npy"))
    assert len(files) == 9 and sorted(hashed) == files  # 3 shards x 3 fields, each hashed once
    hashed.clear()
    verified = CacheReader.open(root, verify=True)  # checked whole when opening: not hashed again when read
    np.testing.assert_array_equal(verified.rows("view_params", np.arange(TOTAL)), source["view_params"])
    assert hashed == []


def test_a_shard_file_that_changed_size_after_opening_is_refused(tmp_path):
    root = build(tmp_path, source_arrays())
    reader = CacheReader.open(root)
    path = root / shard_file_name("view_params", 2)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CacheCorruptError, match=f"shard 2 file {path.name} is over {size} bytes, the manifest records {size}"):
        reader.rows("view_params", np.array([9]))


def test_write_shard_checks_name_the_field(tmp_path):
    writer = CacheWriter.open(tmp_path, META, FIELDS, TOTAL, SHARD)
    good = {k: v[:4] for k, v in source_arrays().items()}
    with pytest.raises(ValueError, match=r"field 'teacher0/text': expected shape \(4, 8\), got \(3, 8\)"):
        writer.write_shard(0, {**good, "teacher0/text": good["teacher0/text"][:3]})
    with pytest.raises(ValueError, match="field 'view_params': expected dtype float32, got float64"):
        writer.write_shard(0, {**good, "view_params": good["view_params"].astype(np.float64)})
    with pytest.raises(ValueError, match="missing: teacher0/image, unknown: teacher0/imag"):
        writer.write_shard(0, {**{k: v for k, v in good.items() if k != "teacher0/image"}, "teacher0/imag": good["teacher0/image"]})
    with pytest.raises(ValueError, match="cannot write shard 1: .* the next is shard 0"):
        writer.write_shard(1, good)
    with pytest.raises(ValueError, match="field name 'a__b' .* without '__'"):
        CacheWriter.open(tmp_path / "x", META, {"a__b": (2, "float16")}, TOTAL, SHARD)
