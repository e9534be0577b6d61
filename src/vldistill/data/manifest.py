"""Pairs listed in a JSONL manifest: one `{"image": path, "caption": text, "label": class?}` per line,
image paths relative to the manifest. Images are decoded, resized (shorter side) and centre-cropped
to a square once, when the split is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from vldistill.data.pairs import PairSplit


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode an image file to RGB, resize its shorter side to `image_size` and centre-crop a square."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = image_size / min(image.size)
            width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - image_size) // 2, (height - image_size) // 2
            return np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"image {path} cannot be decoded ({error})") from None


def read_manifest_rows(path: str | Path) -> list[dict]:
    """The manifest's rows, each checked to have a non-empty `image` and `caption`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not row.get("image") or not str(row.get("caption", "")).strip():
            raise ValueError(f"{path}:{number} needs a non-empty \"image\" and \"caption\"")
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest {path} lists no pairs")
    return rows


def read_manifest(path: str | Path, image_size: int, classnames: Optional[list[str]] = None, progress: bool = True) -> PairSplit:
    """Load every pair of a manifest into memory; labels index `classnames` when given."""
    rows = read_manifest_rows(path)
    root = Path(path).parent
    images = np.stack([
        load_image(root / row["image"], image_size) for row in tqdm(rows, desc=f"read {Path(path).name}", disable=not progress)
    ])
    labels = None
    if classnames is not None:
        index = {name: i for i, name in enumerate(classnames)}
        labels = np.array([index[row["label"]] for row in rows], dtype=np.int64)
    return PairSplit(images=images, captions=[str(row["caption"]) for row in rows], labels=labels)


def manifest_classnames(path: str | Path) -> Optional[list[str]]:
    """Sorted class names when every row of the manifest has a `label`, else None (no zero-shot task)."""
    labels = [row.get("label") for row in read_manifest_rows(path)]
    return sorted(set(labels)) if labels and all(label is not None for label in labels) else None
