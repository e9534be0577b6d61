"""Readers for the caption files the image-text retrieval benchmarks ship in; the format is detected
from the JSON content:

- Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_flickr8k.json`):
  `{"images": [{"filepath": ..., "filename": ..., "split": "train|val|test|restval",
  "sentences": [{"raw": ...}, ...]}, ...]}`; an image is `image_root/filepath/filename` (Flickr files
  have no filepath: `image_root/filename`). One file holds every split; a reader takes one split or a
  union written with `+` (`train+restval`, the usual COCO training set).
- COCO captions (`captions_train2017.json`, `captions_val2014.json`, ...): `{"images": [{"id": ...,
  "file_name": ...}, ...], "annotations": [{"image_id": ..., "caption": ...}, ...]}`; an image is
  `image_root/file_name`. The file is one split, read whole.

`image_root` defaults to the folder holding the file. A reader lists the images in file order, each
with its captions (stripped, in file order; empty ones left out), plus the problems found, as
(kind, example) entries for `DataQuality`: each empty caption and each image without any caption
("empty_caption"), each COCO caption of an image the file does not list ("missing").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

KARPATHY = "karpathy"
COCO = "coco"
KARPATHY_SPLITS = ("train", "val", "test", "restval")
PathLike = Union[str, Path]


@dataclass
class CaptionFile:
    """The images of one caption file (of `split`; None: the whole file) with their captions."""

    path: Path
    format: str
    split: Optional[str]
    images: list[Path] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


def parse_split(split: str) -> tuple[str, ...]:
    """The Karpathy split names in `split` ("test", or a union such as "train+restval"); ValueError
    for an empty or unknown name."""
    names = tuple(name.strip() for name in str(split).split("+"))
    unknown = [name for name in names if name not in KARPATHY_SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r} in {split!r}; splits are {', '.join(KARPATHY_SPLITS)}, joined by +")
    return names


def load_json(path: PathLike) -> Any:
    """The parsed content of a JSON file; ValueError naming the file (and line) when it is not valid UTF-8 JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    try:
        return json.loads(path.read_bytes())
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno} is not valid JSON ({error.msg})") from None


def detect_format(data: Any, path: PathLike) -> str:
    """`coco` for a mapping with `images` and `annotations` lists, `karpathy` for one whose `images`
    carry `sentences`; ValueError naming the file otherwise."""
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and isinstance(data.get("annotations"), list):
        return COCO
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        return KARPATHY
    raise ValueError(
        f"{path}: not a caption file: expected a Karpathy split file ({{\"images\": [{{\"filename\", \"split\", "
        f"\"sentences\"}}]}}) or COCO captions ({{\"images\": [{{\"id\", \"file_name\"}}], \"annotations\": "
        f"[{{\"image_id\", \"caption\"}}]}})"
    )


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    return value.strip()


def _entry(items: list, index: int, key: str, path: Path) -> dict:
    item = items[index]
    if not isinstance(item, dict):
        raise ValueError(f"{path}: {key}[{index}] must be a JSON object, got {type(item).__name__}")
    return item


def _add_image(listing: CaptionFile, image: Path, captions: list[str], where: str) -> None:
    """Add one image with its (stripped) captions, recording each empty one, or the image if it has none."""
    if not captions:
        listing.bad.append(("empty_caption", f"{where}: no caption"))
    good = [caption for caption in captions if caption]
    listing.bad.extend(("empty_caption", f"{where}: empty caption") for _ in range(len(captions) - len(good)))
    if good:
        listing.images.append(image)
        listing.captions.append(good)


def _karpathy_caption(sentence: Any, where: str) -> str:
    return _text(sentence.get("raw") if isinstance(sentence, dict) else sentence, f"{where}.raw")


def _read_karpathy(listing: CaptionFile, data: dict, root: Path, split: Optional[str]) -> None:
    wanted = set(parse_split(split)) if split is not None else None
    images, path, found = data["images"], listing.path, {}
    for i in range(len(images)):
        entry = _entry(images, i, "images", path)
        filename, where = entry.get("filename"), f"{path}: images[{i}]"
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"{where} needs a \"filename\"")
        image_split = entry.get("split")
        found[image_split] = found.get(image_split, 0) + 1
        if wanted is not None and image_split not in wanted:
            continue
        sentences = entry.get("sentences") or []
        if not isinstance(sentences, list):
            raise ValueError(f"{where}.sentences must be a list")
        captions = [_karpathy_caption(s, f"{where}.sentences[{k}]") for k, s in enumerate(sentences)]
        _add_image(listing, root / _text(entry.get("filepath"), f"{where}.filepath") / filename, captions, f"{where} {filename}")
    if wanted is not None and not any(found.get(name) for name in wanted):
        splits = ", ".join(f"{name} ({count})" for name, count in sorted(found.items(), key=str))
        raise ValueError(f"{path}: no images in split {split!r}; the file's splits: {splits}")


def _read_coco(listing: CaptionFile, data: dict, root: Path) -> None:
    path, images, annotations = listing.path, data["images"], data["annotations"]
    files: dict[Any, str] = {}
    for i in range(len(images)):
        entry = _entry(images, i, "images", path)
        image_id, file_name = entry.get("id"), entry.get("file_name")
        if image_id is None or not isinstance(file_name, str) or not file_name:
            raise ValueError(f"{path}: images[{i}] needs an \"id\" and a \"file_name\"")
        if image_id in files:
            raise ValueError(f"{path}: images[{i}]: image id {image_id!r} is listed twice")
        files[image_id] = file_name
    captions: dict[Any, list[str]] = {image_id: [] for image_id in files}
    for k in range(len(annotations)):
        entry = _entry(annotations, k, "annotations", path)
        image_id, where = entry.get("image_id"), f"{path}: annotations[{k}]"
        if image_id is None:
            raise ValueError(f"{where} needs an \"image_id\"")
        if image_id not in captions:
            listing.bad.append(("missing", f"{where}: image_id {image_id!r} is not in the file's images"))
            continue
        captions[image_id].append(_text(entry.get("caption"), f"{where}.caption"))
    for image_id, file_name in files.items():
        _add_image(listing, root / file_name, captions[image_id], f"{path}: image {image_id!r} {file_name}")


def read_caption_json(
    path: PathLike,
    split: Optional[str] = None,
    image_root: Optional[PathLike] = None,
    default_split: Optional[str] = None,
) -> CaptionFile:
    """The images of a Karpathy split file or a COCO captions file (see the module docstring) with
    their captions. `split` chooses a Karpathy split (else `default_split`; neither: the whole file);
    a COCO captions file is one split and refuses `split`. Images are found under `image_root`
    (default: the file's folder); FileNotFoundError when none of them exists there."""
    path = Path(path)
    data = load_json(path)
    kind = detect_format(data, path)
    root = Path(image_root) if image_root is not None else path.parent
    if kind == COCO:
        if split is not None:
            raise ValueError(f"{path} is a COCO captions file, which holds one split: it takes no split (got {split!r})")
        listing = CaptionFile(path, kind, None)
        _read_coco(listing, data, root)
    else:
        listing = CaptionFile(path, kind, split if split is not None else default_split)
        _read_karpathy(listing, data, root, listing.split)
    if not listing.images:
        raise ValueError(f"{path}: no image with a caption" + (f" in split {listing.split!r}" if listing.split else ""))
    if not any(image.is_file() for image in listing.images):
        raise FileNotFoundError(
            f"{path}: none of its {len(listing.images)} images exists under {root} (e.g. {listing.images[0]}); "
            "give the image folder (data.train_image_root / data.test_image_root, vldistill eval --images)"
        )
    return listing
