"""Map-style pair sources that decode images lazily and survive bad input: JSONL/CSV manifests,
folders of images with caption files, and local Hugging Face `datasets` folders.

Each source holds only image references and captions; `__getitem__` decodes one image (RGB, shorter
side resized to `image_size`, centre crop) into `PairSample(image, caption, None, index)`, or records
the problem in the source's `DataQuality` and returns None (see `pairs.drop_bad`; `PairCollator`
leaves Nones out of its batches). Empty or missing captions are counted when the source is indexed
and get no pair. An image with several captions gives one pair per caption, and a bad image counts
once per pair.

Accounting is per pass: a pass starts when the source is built and ends once every index has been
fetched at least once; within a pass each index is counted once (fetching it again decodes it but
does not count it again), and the next fetch starts a new pass, which counts the captions found bad
while indexing again. So after a whole pass `quality.good + quality.bad` equals the pairs plus the
bad captions. Counting happens in the process that fetches: with DataLoader workers each worker
counts into its own copy of the `DataQuality`.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from vldistill.data.transforms import fit_image
from vldistill.data.pairs import PairSample
from vldistill.data.quality import DataQuality

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HF_MARKERS = ("dataset_info.json", "state.json")
ImageRef = Union[Path, int]


class BadImage(Exception):
    """An image that cannot be used: `kind` is one of quality.BAD_KINDS, `reason` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def decode_image(source: Union[Path, BinaryIO, Image.Image], image_size: int) -> torch.Tensor:
    """Decode a file, file object or PIL image to a uint8 (image_size, image_size, 3) tensor; raise
    BadImage(missing | not_image | truncated | corrupt) when it cannot be."""
    try:
        if isinstance(source, Image.Image):
            return torch.from_numpy(fit_image(source, image_size).copy())
        with Image.open(source) as image:
            return torch.from_numpy(fit_image(image, image_size).copy())
    except FileNotFoundError:
        raise BadImage("missing", "file does not exist") from None
    except UnidentifiedImageError:
        raise BadImage("not_image", "not a readable image") from None
    except (OSError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError) as error:
        kind = "truncated" if "truncated" in str(error) else "corrupt"
        raise BadImage(kind, f"cannot be decoded ({error})") from None


def first_in_pass(seen: set[int], index: int) -> bool:
    """Whether `index` is fetched for the first time in this pass (and mark it as fetched)."""
    first = index not in seen
    seen.add(index)
    return first


def decode_counted(source, image_size: int, quality: DataQuality, count: bool, describe: str) -> Optional[torch.Tensor]:
    """The decoded image, or None for bad input; when `count`, the outcome is recorded in `quality`
    (bad ones as "`describe`: reason")."""
    try:
        image = decode_image(source, image_size)
    except BadImage as bad:
        if count:
            quality.record_bad(bad.kind, f"{describe}: {bad.reason}")
        return None
    if count:
        quality.record_good()
    return image


class LazyPairs(Dataset):
    """Base of the lazy sources: `pairs` lists (image reference, caption); subclasses open a reference
    (`_open`) and name it in messages (`_describe`). Bad captions found while indexing go to
    `index_bad` as (kind, example) and are counted at the start of every pass."""

    def __init__(self, image_size: int, quality: DataQuality) -> None:
        self.image_size = image_size
        self.quality = quality
        self.pairs: list[tuple[ImageRef, str]] = []
        self.index_bad: list[tuple[str, str]] = []
        self._counted: set[int] = set()

    def _open(self, ref: ImageRef) -> Union[Path, BinaryIO, Image.Image]:
        raise NotImplementedError

    def _describe(self, ref: ImageRef) -> str:
        raise NotImplementedError

    def _start_pass(self) -> None:
        self._counted.clear()
        for kind, example in self.index_bad:
            self.quality.record_bad(kind, example)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Optional[PairSample]:
        index = int(index)
        ref, caption = self.pairs[index]
        if len(self._counted) == len(self.pairs):
            self._start_pass()
        image = decode_counted(self._open(ref), self.image_size, self.quality, first_in_pass(self._counted, index),
                               self._describe(ref))
        return None if image is None else PairSample(image, caption, None, index)


class ManifestPairs(LazyPairs):
    """Pairs listed in a JSONL manifest (`{"image": path, "caption": text}` or `"captions": [texts]`
    per line) or a CSV manifest (header with `image` and `caption`; one row per pair); image paths
    are relative to the manifest."""

    def __init__(self, path: Union[str, Path], image_size: int, quality: DataQuality) -> None:
        super().__init__(image_size, quality)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} does not exist")
        rows = self._csv_rows() if self.path.suffix.lower() == ".csv" else self._jsonl_rows()
        if not rows:
            raise ValueError(f"manifest {self.path} lists no pairs")
        for number, image, captions in rows:
            where = f"{self.path}:{number}: {image}"
            good = [str(caption).strip() for caption in captions if str(caption).strip()]
            if not good:
                self.index_bad.append(("empty_caption", f"{where}: empty caption"))
            self.pairs.extend((self.path.parent / image, caption) for caption in good)
        self._start_pass()

    def _jsonl_rows(self) -> list[tuple[int, str, list]]:
        rows = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
                raise ValueError(f"{self.path}:{number} needs a non-empty \"image\" path")
            captions = row.get("captions", [row.get("caption") or ""])
            if not isinstance(captions, list):
                raise ValueError(f"{self.path}:{number}: \"captions\" must be a list of strings")
            rows.append((number, row["image"], captions))
        return rows

    def _csv_rows(self) -> list[tuple[int, str, list]]:
        with self.path.open(newline="") as file:
            reader = csv.DictReader(file)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{self.path}:1: the CSV header needs \"image\" and \"caption\" columns, got {reader.fieldnames}")
            rows = []
            for row in reader:
                if not (row["image"] or "").strip():
                    raise ValueError(f"{self.path}:{reader.line_num} needs a non-empty \"image\" path")
                rows.append((reader.line_num, row["image"].strip(), [row["caption"] or ""]))
        return rows

    def _open(self, ref: ImageRef) -> Path:
        return ref

    def _describe(self, ref: ImageRef) -> str:
        return str(ref)


class FolderPairs(LazyPairs):
    """Image files under `root` (any depth; see IMAGE_EXTENSIONS), each with a same-name `.txt` file
    beside it holding one caption per non-empty line."""

    def __init__(self, root: Union[str, Path], image_size: int, quality: DataQuality) -> None:
        super().__init__(image_size, quality)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise ValueError(f"folder {self.root} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        for image in images:
            text = image.with_suffix(".txt")
            if not text.is_file():
                self.index_bad.append(("empty_caption", f"{image}: no caption file {text.name}"))
                continue
            captions = [line.strip() for line in text.read_text(errors="replace").splitlines() if line.strip()]
            if not captions:
                self.index_bad.append(("empty_caption", f"{text}: empty caption"))
            self.pairs.extend((image, caption) for caption in captions)
        self._start_pass()

    def _open(self, ref: ImageRef) -> Path:
        return ref

    def _describe(self, ref: ImageRef) -> str:
        return str(ref)


class HFDatasetPairs(LazyPairs):
    """Rows of a Hugging Face dataset saved with `save_to_disk`: `image_column` holds images (an
    Image feature, bytes, or file paths relative to the folder), `text_column` a caption or a list."""

    def __init__(
        self, path: Union[str, Path], image_size: int, quality: DataQuality,
        image_column: str = "image", text_column: str = "text",
    ) -> None:
        import datasets

        super().__init__(image_size, quality)
        self.path = Path(path)
        data = datasets.load_from_disk(str(self.path))
        if isinstance(data, datasets.DatasetDict):
            raise ValueError(f"{self.path} holds splits {', '.join(data)}; point at one split's folder, e.g. {self.path / next(iter(data))}")
        for column in (image_column, text_column):
            if column not in data.column_names:
                raise ValueError(f"{self.path}: no column {column!r}; columns are {', '.join(data.column_names)}")
        if isinstance(data.features[image_column], datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))
        for row, texts in enumerate(data[text_column]):
            good = [str(t).strip() for t in (texts if isinstance(texts, list) else [texts]) if t is not None and str(t).strip()]
            if not good:
                self.index_bad.append(("empty_caption", f"{self.path}[row {row}]: empty caption"))
            self.pairs.extend((row, caption) for caption in good)
        self.images = data.select_columns([image_column])
        self.image_column = image_column
        self._start_pass()

    def _open(self, ref: ImageRef) -> Union[Path, BinaryIO, Image.Image]:
        value: Any = self.images[ref][self.image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return io.BytesIO(value)
        if isinstance(value, str):
            return self.path / value
        if isinstance(value, Image.Image):
            return value
        raise BadImage("corrupt", f"column {self.image_column!r} holds {type(value).__name__}, not an image")

    def _describe(self, ref: ImageRef) -> str:
        return f"{self.path}[row {ref}]"


def _is_shards(path: Path) -> bool:
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def _open_shards(path: Path, image_size: int, quality: DataQuality) -> Dataset:
    """Hook for webdataset tar shards: dispatch to vldistill.data.webdataset.WebDatasetPairs."""
    try:
        module = importlib.import_module("vldistill.data.webdataset")
    except ModuleNotFoundError as error:
        if error.name != "vldistill.data.webdataset":
            raise
        module = None
    if module is None or not hasattr(module, "WebDatasetPairs"):
        raise ValueError(f"{path}: webdataset shards: use data.webdataset (vldistill.data.webdataset.WebDatasetPairs is not available)")
    return module.WebDatasetPairs(str(path), image_size, quality)


def open_pairs(path: Union[str, Path], image_size: int, quality: DataQuality) -> Dataset:
    """The pair source `path` is: a .jsonl/.csv manifest, a `save_to_disk` folder (holds
    dataset_info.json or state.json), webdataset .tar shards (a file or a folder of them), or a
    folder of images with .txt captions."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pair source {path} does not exist")
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return ManifestPairs(path, image_size, quality)
    if _is_shards(path):
        return _open_shards(path, image_size, quality)
    if path.is_dir() and any((path / marker).is_file() for marker in HF_MARKERS):
        return HFDatasetPairs(path, image_size, quality)
    if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
        return FolderPairs(path, image_size, quality)
    raise ValueError(
        f"{path}: not a pair source; expected a .jsonl or .csv manifest, a Hugging Face save_to_disk folder "
        f"({' or '.join(HF_MARKERS)}), .tar shards, or a folder of images with .txt captions"
    )


def scan(dataset: Dataset, progress: bool = True) -> int:
    """Fetch every sample once (one pass; one epoch of an IterableDataset such as webdataset shards),
    so the source's DataQuality counts all of it; the number of good samples."""
    samples = dataset if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    total = None if isinstance(dataset, IterableDataset) else len(dataset)
    return sum(sample is not None for sample in tqdm(samples, total=total, desc="check data", disable=not progress))
