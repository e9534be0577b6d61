"""The teacher's image embeddings of cropped regions (ViLD-image's targets, issue 16), computed once and kept in
the teacher cache store (store.py): one row per region, field `teacher0/region_image`.

Each region is its box enlarged about the centre by `context` (ViLD crops at 1.5x), cropped from its image and
resized to the teacher's input size with bilinear sampling, which is RoIAlign on the pixels (models/regions.py).
The manifest's meta (`region_cache_meta`) names the teacher's weights and input settings, the images, boxes and
context, so a cache made for anything else is refused, a finished one is reused without running the teacher, and an
interrupted build resumes at its first missing shard."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vldistill import __version__
from vldistill.distributed import process_rank
from vldistill.eval.embed import inference
from vldistill.models.regions import roi_align
from vldistill.teachers.cache.meta import state_dict_sha256
from vldistill.teachers.cache.store import (
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheReader,
    CacheWriter,
)

logger = logging.getLogger(__name__)

REGION_FIELD = "teacher0/region_image"
KIND = "region-crops"
WAIT_SECONDS = 1.0  # how often a process other than the first looks whether the cache is finished


def crop_regions(
    images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, context: float, size: int
) -> torch.Tensor:
    """(R, 3, size, size) crops in [0, 1] of the R boxes (x0, y0, x1, y1 pixels) on the (N, H, W, 3) images
    (uint8, or float in [0, 255]) that `image_index` names: each box enlarged about its centre by `context`, then
    resized with bilinear sampling (RoIAlign on the pixels; parts outside the image repeat its border)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {tuple(images.shape)}")
    if context <= 0:
        raise ValueError(f"context must be > 0, got {context}")
    pixels = images.permute(0, 3, 1, 2).to(torch.float32)
    boxes = boxes.to(torch.float32)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (context / 2)
    enlarged = torch.cat([centre - half, centre + half], dim=1)
    crops = roi_align(pixels, enlarged, image_index.to(torch.long), spatial_scale=1.0, output_size=size)
    return crops / 255.0


def _check_regions(images: np.ndarray, boxes: np.ndarray, image_index: np.ndarray) -> None:
    """Raise ValueError naming the problem unless images, boxes and image_index describe at least one region."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (R, 4) (x0, y0, x1, y1), got shape {boxes.shape}")
    if image_index.shape != (boxes.shape[0],):
        raise ValueError(f"image_index must be ({boxes.shape[0]},), one per box, got shape {image_index.shape}")
    if boxes.shape[0] == 0:
        raise ValueError("no regions: boxes is empty")
    if image_index.dtype.kind not in "iu":
        raise ValueError(f"image_index must hold integers, got {image_index.dtype}")
    outside = np.flatnonzero((image_index < 0) | (image_index >= images.shape[0]))
    if outside.size:
        row = outside[0]
        raise ValueError(f"region {row}: image_index {image_index[row]} is not one of the {images.shape[0]} images")
    empty = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if empty.size:
        row = empty[0]
        raise ValueError(f"region {row}: box {boxes[row].tolist()} has no area (need x1 > x0 and y1 > y0)")


def regions_sha256(images: np.ndarray, boxes: np.ndarray, image_index: np.ndarray) -> str:
    """sha256 over the images' bytes (with their dtype and shape), the boxes as float32 and image_index as int64."""
    digest = hashlib.sha256()
    images = np.ascontiguousarray(images)
    digest.update(f"images|{images.dtype}|{images.shape}|".encode())
    digest.update(images.tobytes())
    digest.update(b"|boxes|")
    digest.update(np.ascontiguousarray(boxes, dtype=np.float32).tobytes())
    digest.update(b"|image_index|")
    digest.update(np.ascontiguousarray(image_index, dtype=np.int64).tobytes())
    return digest.hexdigest()


def region_cache_meta(
    teacher: nn.Module, images: np.ndarray, boxes: np.ndarray, image_index: np.ndarray, context: float
) -> dict[str, Any]:
    """What a region cache is made from: the teacher (class, weights' sha256, input size and normalization), the
    regions (`regions_sha256`) and their count, the crop context and the vldistill version."""
    spec = teacher.input_spec
    return {
        "kind": KIND,
        "teacher": {
            "class": type(teacher).__name__,
            "sha256": state_dict_sha256(teacher),
            "image_size": int(spec.image_size),
            "image_mean": [float(v) for v in spec.image_mean],
            "image_std": [float(v) for v in spec.image_std],
        },
        "regions": regions_sha256(images, boxes, image_index),
        "count": int(len(boxes)),
        "context": float(context),
        "vldistill": __version__,
    }


def _teacher_embeddings(
    teacher: nn.Module, images: np.ndarray, boxes: np.ndarray, image_index: np.ndarray, context: float,
    device: torch.device,
) -> np.ndarray:
    """(R, D) float32 L2-normalized teacher embeddings of the crops of these regions (one batch, inference mode)."""
    spec = teacher.input_spec
    used, local = np.unique(image_index, return_inverse=True)  # only the batch's images, re-indexed
    crops = crop_regions(
        torch.from_numpy(np.ascontiguousarray(images[used])), torch.from_numpy(boxes), torch.from_numpy(local),
        context, spec.image_size,
    )
    mean = torch.tensor(spec.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    embeddings = teacher.encode_image(((crops - mean) / std).to(device))
    return F.normalize(embeddings.float(), dim=-1).cpu().numpy()


def _mismatch(error: CacheMismatchError, root: Path) -> CacheMismatchError:
    return CacheMismatchError(
        f"region cache: {error}\ndelete {root} to build it again for this teacher, these regions and context",
        error.differences,
    )


def build_region_cache(
    teacher: nn.Module,
    images: np.ndarray,
    boxes: np.ndarray,
    image_index: np.ndarray,
    root: Path,
    *,
    context: float = 1.5,
    batch_size: int = 256,
    shard_rows: int = 4096,
    progress: bool = True,
) -> CacheReader:
    """The cache at `root` of the teacher's L2-normalized image embeddings of each region's crop (`crop_regions` at
    the teacher's image size, normalized with its mean/std), one row per region in field REGION_FIELD: reused when
    complete with the same meta (`region_cache_meta`), resumed at its first missing shard when started with the same
    settings, else built in batches of `batch_size` in eval mode without gradients. A cache made for another
    teacher, regions or context raises CacheMismatchError naming the differing meta keys. Under several processes
    the first builds and the others wait for it to finish."""
    images, boxes, image_index = np.asarray(images), np.asarray(boxes), np.asarray(image_index)
    _check_regions(images, boxes, image_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(root)
    boxes = boxes.astype(np.float32)
    meta = region_cache_meta(teacher, images, boxes, image_index, context)
    if process_rank()[0] != 0:
        return _wait_for_cache(root, meta)
    try:
        reader = CacheReader.open(root, expected_meta=meta)
        logger.info("reusing the teacher's region embeddings in %s (%d regions)", root, reader.total_rows)
        return reader
    except (CacheNotFoundError, CacheIncompleteError):
        pass
    except CacheMismatchError as error:
        raise _mismatch(error, root) from None
    fields = {REGION_FIELD: (int(teacher.embed_dim), "float32")}
    try:
        writer = CacheWriter.open(root, meta, fields, len(boxes), shard_rows)
    except CacheMismatchError as error:
        raise _mismatch(error, root) from None
    first = writer.next_shard()
    done = len(boxes) if first is None else first[0]
    if done:
        logger.info("resuming the region cache in %s at region %d of %d", root, done, len(boxes))
    with inference(teacher) as device, tqdm(
        total=len(boxes), initial=done, desc="teacher region crops", unit="region", disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for index in range(writer.next_index(), writer.num_shards):
            begin, stop = writer.shard_range(index)
            chunks = []
            for start in range(begin, stop, batch_size):
                end = min(stop, start + batch_size)
                chunks.append(
                    _teacher_embeddings(teacher, images, boxes[start:end], image_index[start:end], context, device)
                )
                bar.update(end - start)
            writer.write_shard(index, {REGION_FIELD: np.concatenate(chunks)})
    writer.finish()
    return CacheReader.open(root, expected_meta=meta)


def _wait_for_cache(root: Path, meta: dict[str, Any]) -> CacheReader:
    """The reader of the cache at `root` once the first process has finished it with `meta` (checked every
    WAIT_SECONDS; a launcher ends this process if the first one fails)."""
    while True:
        try:
            return CacheReader.open(root, expected_meta=meta)
        except (CacheNotFoundError, CacheIncompleteError, CacheMismatchError):
            time.sleep(WAIT_SECONDS)


def region_embeddings(reader: CacheReader, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), D) float32 tensor of the stored teacher embeddings of region rows `rows`."""
    return torch.from_numpy(reader.rows(REGION_FIELD, np.asarray(rows)))
