"""Decoding one image, the same way for every source (manifests, image folders, Hugging Face datasets,
webdataset shards, class folders): open it lazily, refuse dimensions that would cost gigabytes or
leave almost nothing after the centre crop before a pixel is decoded, then convert to RGB on the
right scale, resize and centre-crop (see transforms.fit_image). An image that cannot be used raises
BadImage with its kind in quality.BAD_KINDS; `decode_counted` records the outcome in a DataQuality.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import torch
from PIL import Image, UnidentifiedImageError

from vldistill.data.quality import DataQuality
from vldistill.data.transforms import fit_image

# Largest width * height decoded: Pillow's default Image.MAX_IMAGE_PIXELS (about 0.25 GiB as RGB).
# Pillow itself refuses images over twice its own limit while reading the header, so raising this
# past 2 * PIL.Image.MAX_IMAGE_PIXELS needs Pillow's limit raised too.
MAX_IMAGE_PIXELS = 89_478_485
# Largest longer-to-shorter side ratio: a 1x10000 strip would be resized to image_size x 10000 * image_size
# before its centre crop, and keeps almost nothing of the image.
MAX_ASPECT_RATIO = 20.0
ImageSource = Union[str, Path, bytes, bytearray, BinaryIO, Image.Image]


class BadImage(Exception):
    """An image that cannot be used: `kind` is one of quality.BAD_KINDS, `reason` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


def check_dimensions(width: int, height: int) -> None:
    """Raise BadImage("too_large") when width * height exceeds MAX_IMAGE_PIXELS, or
    BadImage("extreme_aspect") when the longer side exceeds MAX_ASPECT_RATIO times the shorter."""
    if width < 1 or height < 1:
        raise BadImage("corrupt", f"declares {width}x{height} pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImage(
            "too_large",
            f"{width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb?)",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise BadImage("extreme_aspect", f"{width}x{height} has aspect ratio {ratio:.1f}:1, over the limit of {MAX_ASPECT_RATIO:g}:1")


def open_image(source: Any) -> Image.Image:
    """`source` opened lazily (header read, pixels not decoded): a path, bytes, a binary file object,
    or a PIL image (returned as is); BadImage("not_image") for anything else. Pillow's
    DecompressionBombWarning is silenced: check_dimensions applies this module's limit instead."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif not isinstance(source, (str, Path)) and not hasattr(source, "read"):
        raise BadImage("not_image", f"holds {type(source).__name__}, not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def decode_image(source: ImageSource, image_size: int) -> torch.Tensor:
    """The image at `source` (see open_image) as a uint8 (image_size, image_size, 3) tensor: its size
    checked from the header before decoding (check_dimensions), then converted to RGB, resized and
    centre-cropped (transforms.fit_image). Raises BadImage(missing | not_image | too_large |
    extreme_aspect | truncated | corrupt) when it cannot be used."""
    try:
        image = open_image(source)
        with contextlib.nullcontext(image) if image is source else image:
            check_dimensions(*image.size)
            return torch.from_numpy(fit_image(image, image_size).copy())  # PIL arrays are read-only
    except FileNotFoundError:
        raise BadImage("missing", "file does not exist") from None
    except UnidentifiedImageError:
        raise BadImage("not_image", "not a readable image") from None
    except Image.DecompressionBombError as error:
        raise BadImage("too_large", f"{error}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error) as error:
        kind = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise BadImage(kind, f"cannot be decoded ({error})") from None


def decode_counted(
    source: ImageSource, image_size: int, quality: DataQuality, count: bool, describe: str
) -> Optional[torch.Tensor]:
    """The decoded image (see decode_image), or None for bad input; when `count`, the outcome is
    recorded in `quality` (bad ones as "`describe`: reason")."""
    try:
        image = decode_image(source, image_size)
    except BadImage as bad:
        if count:
            quality.record_bad(bad.kind, f"{describe}: {bad.reason}")
        return None
    if count:
        quality.record_good()
    return image
