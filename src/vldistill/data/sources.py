"""Map-style pair sources that decode images lazily and survive bad input: JSONL/CSV manifests,
folders of images with caption files, and local Hugging Face `datasets` folders.

Each source holds only image references and captions; `__getitem__` decodes one image (see
`images.decode_image`: size checked before decoding, RGB, shorter side resized to `image_size`,
centre crop) into `PairSample(image, caption, None, index)`, or records the problem in the source's
`DataQuality` and returns None (see `pairs.drop_bad`; `PairCollator` leaves Nones out of its
batches). Empty or missing captions, and manifest lines or caption file lines that are not UTF-8,
are counted when the source is indexed and get no pair. An image with several captions gives one
pair per caption, and a bad image counts once per pair.

Accounting is per pass: a pass starts when the source is built and ends once every index has been
fetched at least once; within a pass each index is counted once (fetching it again decodes it but
does not count it again), and the next fetch starts a new pass, which counts the captions found bad
while indexing again. So after a whole pass `quality.good + quality.bad` equals the pairs plus the
bad captions. Counting happens in the process that fetches: with DataLoader workers each worker
counts into its own copy of the `DataQuality`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from vldistill.data.caption_json import read_caption_json
from vldistill.data.images import ImageSource, decode_counted
from vldistill.data.pairs import PairSample
from vldistill.data.quality import DataQuality
from vldistill.data.webdataset import WebDatasetPairs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HF_MARKERS = ("dataset_info.json", "state.json")
ImageRef = Union[Path, int]
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, decoded with errors="surrogateescape"


def first_in_pass(seen: set[int], index: int) -> bool:
    """Whether `index` is fetched for the first time in this pass (and mark it as fetched)."""
    first = index not in seen
    seen.add(index)
    return first


def not_utf8(path: Path, number: int, byte: int) -> tuple[str, str]:
    """The ("not_utf8", example) entry for line `number` of `path`, whose first undecodable byte is `byte`."""
    return "not_utf8", f"{path}:{number}: not valid UTF-8 (byte 0x{byte:02x})"


def utf8_lines(path: Path, bad: list[tuple[str, str]]) -> list[tuple[int, str]]:
    """(line number, text) for each line of `path` that is valid UTF-8 (a byte-order mark on line 1
    dropped); each other line is appended to `bad` as a "not_utf8" entry and left out."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as error:
            bad.append(not_utf8(path, number, raw[error.start]))
    return lines


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

    def _open(self, ref: ImageRef) -> ImageSource:
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
            skipped = f" (skipped {len(self.index_bad)} undecodable line(s), e.g. {self.index_bad[0][1]})" if self.index_bad else ""
            raise ValueError(f"manifest {self.path} lists no pairs{skipped}")
        for number, image, captions in rows:
            where = f"{self.path}:{number}: {image}"
            good = [str(caption).strip() for caption in captions if str(caption).strip()]
            if not good:
                self.index_bad.append(("empty_caption", f"{where}: empty caption"))
            self.pairs.extend((self.path.parent / image, caption) for caption in good)
        self._start_pass()

    def _jsonl_rows(self) -> list[tuple[int, str, list]]:
        rows = []
        for number, line in utf8_lines(self.path, self.index_bad):
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
        # Undecodable bytes become lone surrogates, so a row that is not UTF-8 is found and skipped alone.
        with self.path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
            reader = csv.DictReader(file)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{self.path}:1: the CSV header needs \"image\" and \"caption\" columns, got {reader.fieldnames}")
            rows = []
            for row in reader:
                undecodable = _ESCAPED_BYTE.search("".join(v for v in row.values() if isinstance(v, str)))
                if undecodable:
                    self.index_bad.append(not_utf8(self.path, reader.line_num, ord(undecodable.group()) - 0xDC00))
                    continue
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
            undecodable = len(self.index_bad)
            captions = [line.strip() for _, line in utf8_lines(text, self.index_bad) if line.strip()]
            if not captions and len(self.index_bad) == undecodable:  # not only lines that are not UTF-8
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

    def _open(self, ref: ImageRef) -> Any:
        """The row's image as images.decode_image takes it: bytes, a PIL image, or a path under the
        dataset folder (anything else is left for decode_image to refuse)."""
        value: Any = self.images[ref][self.image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        return self.path / value if isinstance(value, str) else value

    def _describe(self, ref: ImageRef) -> str:
        return f"{self.path}[row {ref}]"


class CaptionFilePairs(LazyPairs):
    """Pairs of a Karpathy split file or COCO captions file (see vldistill.data.caption_json): one
    per caption of the chosen split, images under `image_root` (default: the file's folder)."""

    def __init__(
        self, path: Union[str, Path], image_size: int, quality: DataQuality, split: Optional[str] = None,
        image_root: Optional[Union[str, Path]] = None, default_split: Optional[str] = None,
    ) -> None:
        super().__init__(image_size, quality)
        listing = read_caption_json(path, split, image_root, default_split)
        self.path, self.format, self.split = listing.path, listing.format, listing.split
        self.pairs = [(image, caption) for image, captions in zip(listing.images, listing.captions) for caption in captions]
        self.index_bad = listing.bad
        self._start_pass()

    def _open(self, ref: ImageRef) -> Path:
        return ref

    def _describe(self, ref: ImageRef) -> str:
        return str(ref)


def _is_shards(path: Path) -> bool:
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def open_pairs(
    path: Union[str, Path], image_size: int, quality: DataQuality, split: Optional[str] = None,
    image_root: Optional[Union[str, Path]] = None, default_split: Optional[str] = None,
) -> Dataset:
    """The pair source `path` is: a .jsonl/.csv manifest, a .json caption file (Karpathy split or COCO
    captions: `split`, `image_root` and `default_split` go to `CaptionFilePairs`), a `save_to_disk`
    folder (holds dataset_info.json or state.json), webdataset .tar shards (a file or a folder of
    them), or a folder of images with .txt captions."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pair source {path} does not exist")
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return ManifestPairs(path, image_size, quality)
    if path.is_file() and path.suffix.lower() == ".json":
        return CaptionFilePairs(path, image_size, quality, split, image_root, default_split)
    if _is_shards(path):
        return WebDatasetPairs(str(path), image_size, quality)
    if path.is_dir() and any((path / marker).is_file() for marker in HF_MARKERS):
        return HFDatasetPairs(path, image_size, quality)
    if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
        return FolderPairs(path, image_size, quality)
    raise ValueError(
        f"{path}: not a pair source; expected a .jsonl or .csv manifest, a .json caption file (Karpathy split "
        f"or COCO captions), a Hugging Face save_to_disk folder "
        f"({' or '.join(HF_MARKERS)}), .tar shards, or a folder of images with .txt captions"
    )


def scan(dataset: Dataset, progress: bool = True) -> int:
    """Fetch every sample once (one pass; one epoch of an IterableDataset such as webdataset shards),
    so the source's DataQuality counts all of it; the number of good samples."""
    samples = dataset if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    total = None if isinstance(dataset, IterableDataset) else len(dataset)
    return sum(sample is not None for sample in tqdm(samples, total=total, desc="check data", disable=not progress))
