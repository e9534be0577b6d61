"""The on-disk teacher cache: fixed-width rows of named fields, stored in shards of `.npy` files
listed in `manifest.json`. A shard counts only once the manifest lists it, so an interrupted run
never leaves a half-written shard that looks complete, and a rerun resumes at the first missing one.

Folder layout::

    manifest.json                 format, version, meta, fields, total_rows, shard_rows, shards, complete
    teacher0__image-00000.npy     field "teacher0/image", rows [0, shard_rows)
    teacher0__image-00001.npy     ...

The manifest records each shard file's size and sha256. A reader checks the sizes when it opens the
cache and each file's sha256 the first time it reads that file, hashing the bytes as it reads them for
use (one read, no separate pass), so a flipped bit is refused naming the shard before any row of it is served.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from vldistill.fileio import fsync_path, write_bytes_atomic, write_text_atomic

FORMAT = "vldistill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
RESUME_HINT = "run `vldistill cache` again with the same config to resume"
REBUILD_HINT = "delete the folder and run `vldistill cache` again"
FIELD_NAME = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
MANIFEST_KEYS = ("meta", "fields", "total_rows", "shard_rows", "shards", "complete")
SETTINGS_KEYS = ("meta", "fields", "total_rows", "shard_rows")
READ_BLOCK = 1 << 20  # bytes read (and hashed) at a time


class CacheError(ValueError):
    """A teacher cache that cannot be written or read as asked; the message says what is wrong."""


class CacheNotFoundError(CacheError):
    """No cache at the given folder: the folder or its manifest.json is missing."""


class CacheFormatError(CacheError):
    """The folder holds something other than a teacher cache of this format and version."""


class CacheIncompleteError(CacheError):
    """The cache was started but not finished: some shards are not written yet."""


class CacheMismatchError(CacheError):
    """The cache was made with other settings; `differences` lists each as a dotted-key line."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


class CacheViewMismatchError(CacheError):
    """A batch's views are not the views the cache was built from (their stored `view_hash` differs)."""


class CacheCorruptError(CacheError):
    """A file of the cache is missing, unreadable, of the wrong size or fails its sha256."""


def diff_dicts(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One line per differing leaf of two nested dicts, keyed by dotted path:
    "meta.teacher.sha256: cache has 'ab12', expected 'cd34'" (`found` is what the cache has).
    Nested dicts are compared key by key; other values by their canonical JSON."""
    lines = []
    for key in sorted(set(expected) | set(found), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in found:
            lines.append(f"{path}: cache has no such key, expected {_show(expected[key])}")
        elif key not in expected:
            lines.append(f"{path}: cache has {_show(found[key])}, expected no such key")
        elif isinstance(expected[key], Mapping) and isinstance(found[key], Mapping):
            lines.extend(diff_dicts(expected[key], found[key], path))
        elif _canonical(expected[key]) != _canonical(found[key]):
            lines.append(f"{path}: cache has {_show(found[key])}, expected {_show(expected[key])}")
    return lines


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _show(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_roundtrip(meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` as it will read back from the manifest (tuples become lists, keys strings)."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as error:
        raise ValueError(f"meta must be JSON-serializable: {error}") from None


def _normalize_fields(fields: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check `fields` (name -> (dim, dtype)) and return it as name -> {"dim", "dtype"} with the
    dtype's canonical name, the form kept in the manifest."""
    if not fields:
        raise ValueError("fields must name at least one field")
    normalized = {}
    for name, spec in fields.items():
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or "__" in name:
            raise ValueError(
                f"field name {name!r} must be letters, digits, '_' or '-' in parts joined by '/', without '__'"
            )
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise ValueError(f"field {name!r} must be (dim, dtype), got {spec!r}")
        dim, dtype = spec
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"field {name!r}: dim must be an int >= 1, got {dim!r}")
        try:
            kind = np.dtype(dtype)
        except TypeError:
            raise ValueError(f"field {name!r}: {dtype!r} is not a numpy dtype") from None
        if kind.kind not in "biuf":
            raise ValueError(f"field {name!r}: dtype must be bool, int, uint or float, got {kind}")
        normalized[name] = {"dim": int(dim), "dtype": kind.name}
    return normalized


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def shard_file_name(field: str, index: int) -> str:
    """The file holding `field` for shard `index`: "teacher0/image", 3 -> "teacher0__image-00003.npy"."""
    return f"{field.replace('/', '__')}-{index:05d}.npy"


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest_mismatch(root: Path, name: str, shard: int, digest: str, recorded: str) -> CacheCorruptError:
    return CacheCorruptError(
        f"teacher cache at {root}: shard {shard} file {name} is corrupt: its sha256 {digest} "
        f"does not match the manifest's {recorded}; {REBUILD_HINT}"
    )


def _read_verified(root: Path, record: Mapping[str, Any], shard: int) -> bytearray:
    """The bytes of the shard file `record` names, read block by block into one buffer while each block
    goes through sha256; raises CacheCorruptError unless size and digest are those the manifest records."""
    path, size = root / record["name"], record["bytes"]
    buffer = bytearray(size + 1)  # one byte more: a file that grew since opening shows as too long
    view, digest, filled = memoryview(buffer), hashlib.sha256(), 0
    with open(path, "rb") as f:
        while filled < len(buffer):
            count = f.readinto(view[filled : filled + READ_BLOCK])
            if not count:
                break
            digest.update(view[filled : filled + count])
            filled += count
    view.release()
    if filled != size:
        found = f"over {size}" if filled > size else str(filled)
        raise CacheCorruptError(
            f"teacher cache at {root}: shard {shard} file {record['name']} is {found} bytes, "
            f"the manifest records {size}; {REBUILD_HINT}"
        )
    if digest.hexdigest() != record["sha256"]:
        raise _digest_mismatch(root, record["name"], shard, digest.hexdigest(), record["sha256"])
    del buffer[size:]
    return buffer


def _npy_array(buffer: bytearray) -> np.ndarray:
    """The array that the bytes of an .npy file hold, as a view of `buffer` (no copy)."""
    magic = io.BytesIO(bytes(buffer[:8]))
    version = np.lib.format.read_magic(magic)
    readers = {(1, 0): (2, np.lib.format.read_array_header_1_0), (2, 0): (4, np.lib.format.read_array_header_2_0)}
    if version not in readers:
        raise ValueError(f".npy version {version} is not one np.save writes for a cache")
    length_bytes, read_header = readers[version]
    offset = 8 + length_bytes + int.from_bytes(buffer[8 : 8 + length_bytes], "little")
    header = io.BytesIO(bytes(buffer[:offset]))
    np.lib.format.read_magic(header)
    shape, fortran_order, dtype = read_header(header)
    count = int(np.prod(shape))
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the cache at `root`, checked for format, version and keys."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CacheCorruptError(f"{path} is not valid JSON ({error}); {REBUILD_HINT}") from None
    if not isinstance(manifest, dict):
        raise CacheFormatError(f"{path} holds a JSON {type(manifest).__name__}, not a teacher cache manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheFormatError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CacheCorruptError(f"{path} lacks {', '.join(missing)}; {REBUILD_HINT}")
    return manifest


def _check_shard_files(root: Path, shard: Mapping[str, Any], verify: bool) -> None:
    """Raise CacheCorruptError unless every file of `shard` exists with its recorded size (and,
    with `verify`, its recorded sha256)."""
    for record in shard["files"].values():
        path = root / record["name"]
        if not path.is_file():
            raise CacheCorruptError(f"teacher cache at {root}: shard file {record['name']} is missing; {REBUILD_HINT}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CacheCorruptError(
                f"teacher cache at {root}: shard file {record['name']} is {size} bytes, "
                f"the manifest records {record['bytes']}; {REBUILD_HINT}"
            )
        if verify:
            digest = _sha256_file(path)
            if digest != record["sha256"]:
                raise _digest_mismatch(root, record["name"], shard["index"], digest, record["sha256"])


def _shard_range(index: int, total_rows: int, shard_rows: int) -> tuple[int, int]:
    start = index * shard_rows
    return start, min(total_rows, start + shard_rows)


def _shard_count(total_rows: int, shard_rows: int) -> int:
    return -(-total_rows // shard_rows)


class CacheWriter:
    """Writes a teacher cache shard by shard; `open` creates the folder or resumes a started one."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self._manifest = manifest
        self.fields: dict[str, tuple[int, str]] = {n: (f["dim"], f["dtype"]) for n, f in manifest["fields"].items()}
        self.total_rows: int = manifest["total_rows"]
        self.shard_rows: int = manifest["shard_rows"]
        self.num_shards: int = _shard_count(self.total_rows, self.shard_rows)

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        meta: dict[str, Any],
        fields: dict[str, tuple[int, str]],
        total_rows: int,
        shard_rows: int = 4096,
    ) -> CacheWriter:
        """A writer for the cache at `root`: a new one, or the started one there if it was made with
        identical meta, fields, total_rows and shard_rows (else CacheMismatchError listing the
        differences). Temp files and shard files the manifest does not list are deleted."""
        root = Path(root)
        settings = {
            "meta": _json_roundtrip(meta),
            "fields": _normalize_fields(fields),
            "total_rows": _positive_int("total_rows", total_rows),
            "shard_rows": _positive_int("shard_rows", shard_rows),
        }
        if (root / MANIFEST).is_file():
            manifest = _read_manifest(root)
            differences = diff_dicts(settings, {key: manifest[key] for key in SETTINGS_KEYS})
            if differences:
                raise CacheMismatchError(
                    f"teacher cache at {root} was started with other settings; use the same settings "
                    f"or delete the folder:\n  " + "\n  ".join(differences),
                    differences,
                )
            for shard in manifest["shards"]:
                _check_shard_files(root, shard, verify=False)
        else:
            _refuse_foreign_folder(root)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **settings,
                "shards": [],
                "complete": False,
            }
            root.mkdir(parents=True, exist_ok=True)
            _write_manifest(root, manifest)
        _remove_leftovers(root, manifest)
        return cls(root, manifest)

    def next_shard(self) -> Optional[tuple[int, int]]:
        """The row range [start, stop) of the next shard to write, or None once all are written."""
        index = self.next_index()
        return None if index == self.num_shards else self.shard_range(index)

    def shard_range(self, index: int) -> tuple[int, int]:
        """The row range [start, stop) of shard `index`."""
        return _shard_range(index, self.total_rows, self.shard_rows)

    def next_index(self) -> int:
        """The index of the first shard the manifest does not list yet (`num_shards` once all are)."""
        return len(self._manifest["shards"])

    def write_shard(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write shard `index` (which must be the next one) from one (rows, dim) array per field,
        then list it in the manifest with each file's size and sha256."""
        self._check_next(index, "write")
        self.record_shard(index, self.write_shard_files(index, arrays))

    def write_shard_files(self, index: int, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Write shard `index`'s files (atomically) without listing them; return what `record_shard` lists.
        Several processes building one cache each write their shards' files; one of them records them."""
        if not self.next_index() <= index < self.num_shards:
            raise ValueError(f"cannot write shard {index}: shards {self.next_index()} to {self.num_shards - 1} are left")
        start, stop = self.shard_range(index)
        self._check_arrays(arrays, stop - start)
        files = {}
        for name in self.fields:
            data = _npy_bytes(arrays[name])
            file_name = shard_file_name(name, index)
            write_bytes_atomic(self.root / file_name, data)
            files[name] = {"name": file_name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        fsync_path(self.root)  # the renames are durable before the manifest refers to them
        return files

    def record_shard(self, index: int, files: Mapping[str, Mapping[str, Any]]) -> None:
        """List shard `index` (which must be the next one) with its written files in the manifest."""
        self._check_next(index, "record")
        start, stop = self.shard_range(index)
        self._manifest["shards"].append({"index": index, "start": start, "stop": stop, "files": dict(files)})
        _write_manifest(self.root, self._manifest)

    def _check_next(self, index: int, verb: str) -> None:
        expected_index = self.next_index()
        if index != expected_index:
            due = "none: all shards are written" if expected_index == self.num_shards else f"shard {expected_index}"
            raise ValueError(f"cannot {verb} shard {index}: shards go in order and the next is {due}")

    def _check_arrays(self, arrays: Mapping[str, np.ndarray], rows: int) -> None:
        missing = [name for name in self.fields if name not in arrays]
        extra = [name for name in arrays if name not in self.fields]
        if missing or extra:
            raise ValueError(
                f"shard arrays must be exactly the cache's fields; missing: {', '.join(missing) or 'none'}, "
                f"unknown: {', '.join(map(str, extra)) or 'none'}"
            )
        for name, (dim, dtype) in self.fields.items():
            array = arrays[name]
            if not isinstance(array, np.ndarray):
                raise ValueError(f"field {name!r}: expected a numpy array, got {type(array).__name__}")
            if array.shape != (rows, dim):
                raise ValueError(f"field {name!r}: expected shape ({rows}, {dim}), got {array.shape}")
            if array.dtype != np.dtype(dtype):
                raise ValueError(f"field {name!r}: expected dtype {dtype}, got {array.dtype}")

    def finish(self) -> None:
        """Mark the cache complete; every shard must be written."""
        written = len(self._manifest["shards"])
        if written != self.num_shards:
            raise CacheIncompleteError(
                f"cannot finish the teacher cache at {self.root}: {written} of {self.num_shards} shards are written"
            )
        self._manifest["complete"] = True
        _write_manifest(self.root, self._manifest)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _refuse_foreign_folder(root: Path) -> None:
    """A new cache goes only into a missing or empty folder (temp files of an interrupted start aside)."""
    if root.exists() and not root.is_dir():
        raise CacheError(f"cannot create a teacher cache at {root}: it is a file, not a folder")
    others = sorted(p.name for p in root.iterdir() if not _is_temp(p)) if root.is_dir() else []
    if others:
        raise CacheError(
            f"cannot create a teacher cache at {root}: the folder has no {MANIFEST} but holds "
            f"{len(others)} other entries ({', '.join(others[:3])}{', …' if len(others) > 3 else ''}); "
            "choose an empty or new folder"
        )


def _remove_leftovers(root: Path, manifest: Mapping[str, Any]) -> None:
    """Delete temp files and any .npy file the manifest does not list (a half-written shard)."""
    listed = {record["name"] for shard in manifest["shards"] for record in shard["files"].values()}
    for path in root.iterdir():
        if path.is_file() and (_is_temp(path) or (path.suffix == ".npy" and path.name not in listed)):
            path.unlink()


class CacheReader:
    """Reads rows of a complete teacher cache. The first read of a shard file reads it whole through
    sha256 and serves the rows from those bytes (refusing a file whose digest is not the manifest's);
    later reads memory-map the verified file."""

    def __init__(self, root: Path, manifest: dict[str, Any], verified: bool = False) -> None:
        self.root = root
        self.meta: dict[str, Any] = manifest["meta"]
        self.fields: dict[str, tuple[int, str]] = {n: (f["dim"], f["dtype"]) for n, f in manifest["fields"].items()}
        self.total_rows: int = manifest["total_rows"]
        self.shard_rows: int = manifest["shard_rows"]
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._arrays: dict[tuple[str, int], np.ndarray] = {}
        self._verified = verified  # every file's sha256 was checked when opening

    @classmethod
    def open(
        cls, root: str | os.PathLike, expected_meta: Optional[dict[str, Any]] = None, verify: bool = False
    ) -> CacheReader:
        """A reader for the complete cache at `root`. Refuses a missing folder or manifest, another
        format or version, a partial cache, meta other than `expected_meta` (when given), and shard
        files missing or of the wrong size; with `verify`, also any whose sha256 differs (a full pass
        now; without it each file's sha256 is checked as the file is first read)."""
        root = Path(root)
        if not root.is_dir():
            raise CacheNotFoundError(f"no teacher cache at {root}: the folder does not exist")
        if not (root / MANIFEST).is_file():
            raise CacheNotFoundError(f"no teacher cache at {root}: {MANIFEST} is missing")
        manifest = _read_manifest(root)
        _check_complete(root, manifest)
        if expected_meta is not None:
            differences = diff_dicts(_json_roundtrip(expected_meta), manifest["meta"], prefix="meta")
            if differences:
                raise CacheMismatchError(
                    f"teacher cache at {root} was made for other settings:\n  " + "\n  ".join(differences),
                    differences,
                )
        for shard in manifest["shards"]:
            _check_shard_files(root, shard, verify)
        return cls(root, manifest, verified=verify)

    def bytes_per_row(self) -> int:
        """Bytes one row takes over all fields: the sum of dim * itemsize."""
        return sum(dim * np.dtype(dtype).itemsize for dim, dtype in self.fields.values())

    def disk_bytes(self) -> int:
        """Bytes the cache takes on disk: every shard file plus the manifest."""
        shard_bytes = sum(record["bytes"] for shard in self._shards for record in shard["files"].values())
        return shard_bytes + (self.root / MANIFEST).stat().st_size

    def rows(self, field: str, indices: np.ndarray) -> np.ndarray:
        """A new (len(indices), dim) array of `field` holding rows `indices` in the given order."""
        if field not in self.fields:
            raise ValueError(f"unknown field {field!r}; the cache has {', '.join(self.fields)}")
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-d integer array, got shape {indices.shape} of {indices.dtype}")
        indices = indices.astype(np.int64, copy=False)
        if indices.size and (indices.min() < 0 or indices.max() >= self.total_rows):
            bad = indices[(indices < 0) | (indices >= self.total_rows)][0]
            raise IndexError(f"row {bad} is out of range: the cache has rows 0..{self.total_rows - 1}")
        dim, dtype = self.fields[field]
        out = np.empty((indices.size, dim), dtype=dtype)
        shard_of = indices // self.shard_rows
        order = np.argsort(shard_of, kind="stable")
        shards, starts = np.unique(shard_of[order], return_index=True)
        for shard, positions in zip(shards, np.split(order, starts[1:])):
            out[positions] = self._array(field, int(shard))[indices[positions] - shard * self.shard_rows]
        return out

    def _array(self, field: str, shard: int) -> np.ndarray:
        """The array of `field` in `shard`. On its first use the file is read through sha256 (unless every
        file was verified when opening) and the rows are served from the bytes read; later uses read the
        memory-mapped file."""
        key = (field, shard)
        if key in self._arrays:
            return self._arrays[key]
        record = self._shards[shard]["files"][field]
        first = None if self._verified else _npy_array(_read_verified(self.root, record, shard))
        mapped = np.load(self.root / record["name"], mmap_mode="r", allow_pickle=False)
        for array in (first, mapped):
            if array is not None:
                self._check_array(array, field, shard)
        self._arrays[key] = mapped
        return mapped if first is None else first

    def _check_array(self, array: np.ndarray, field: str, shard: int) -> None:
        """Raise CacheCorruptError unless `array` has the shape and dtype the manifest gives `field` in `shard`."""
        start, stop = _shard_range(shard, self.total_rows, self.shard_rows)
        dim, dtype = self.fields[field]
        if array.shape != (stop - start, dim) or array.dtype != np.dtype(dtype):
            name = self._shards[shard]["files"][field]["name"]
            raise CacheCorruptError(
                f"teacher cache at {self.root}: shard file {name} holds {array.shape} {array.dtype}, "
                f"expected ({stop - start}, {dim}) {dtype}; {REBUILD_HINT}"
            )


def _check_complete(root: Path, manifest: Mapping[str, Any]) -> None:
    """Raise CacheIncompleteError unless every shard is written and the cache is marked complete."""
    total, shard_rows = manifest["total_rows"], manifest["shard_rows"]
    count = _shard_count(total, shard_rows)
    held = len(manifest["shards"])
    if held != count or not manifest["complete"]:
        rows = sum(shard["stop"] - shard["start"] for shard in manifest["shards"])
        raise CacheIncompleteError(
            f"teacher cache at {root} holds {held} of {count} shards ({rows} of {total} rows); {RESUME_HINT}"
        )
