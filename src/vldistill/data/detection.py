"""Region data for open-vocabulary region distillation (ViLD, issue 16): images with boxes and class names.

- `read_coco_detection`: a COCO-style detection file (`images[]: {id, file_name, width, height}`,
  `annotations[]: {image_id, bbox: [x, y, w, h], category_id}`, `categories[]: {id, name}`), boxes converted to
  (x0, y0, x1, y1) pixels and clipped to the image. Bad boxes are skipped and reported as (kind, example) entries
  for `DataQuality`: "box_empty" (zero or negative width or height, or nothing left inside the image after
  clipping: a box wholly outside it), "unknown_image" and "unknown_category" (an annotation naming an image or
  category the file does not list).
- `make_scenes`: the embedded generator's scenes, several shapes per image with their boxes; the class of an
  object is its colour and shape ("red circle": 40 classes), as `scene_class_names` lists them.
- `RegionSet` (images of one size with their objects) from either (`scene_regions`, `detection_regions`), and
  `region_proposals`: every object box plus random background boxes, the boxes a region model embeds.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from tqdm.auto import tqdm

from vldistill.data.grammar import COLOURS, SHAPES
from vldistill.data.images import decode_counted
from vldistill.data.quality import DataQuality, DataQualityError
from vldistill.data.synthetic import shape_mask

PathLike = Union[str, Path]
SCENE_OFFSETS = {"train": 0, "val": 3_000_017, "test": 4_000_037}
SCENE_SIZES = {"small": 0.10, "medium": 0.14, "large": 0.19}  # half-extent / image side
SHAPE_REACH = 1.2  # how far a shape's pixels reach from its centre, in half-extents (a diamond: 1.15)


@dataclass
class RegionImage:
    """One image's objects: boxes (N, 4) float32 (x0, y0, x1, y1) in pixels, and class indices (N,)."""

    boxes: np.ndarray
    labels: np.ndarray


@dataclass
class DetectionFile:
    """A detection file read: image paths in file order, their (width, height), their objects, the class names
    (in `categories` order), and the problems found ((kind, example) entries for DataQuality)."""

    path: Path
    images: list[Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    objects: list[RegionImage] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> Optional[tuple[float, float, float, float]]:
    """A COCO [x, y, w, h] box as (x0, y0, x1, y1) clipped to a width x height image; None when it is empty
    (w or h <= 0) or wholly outside the image."""
    if w <= 0 or h <= 0:
        return None
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno} is not valid JSON ({error.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "annotations", "categories")):
        raise ValueError(f"{path} is not a COCO detection file: it needs lists 'images', 'annotations' and 'categories'")
    return data


def read_coco_detection(path: PathLike, image_root: Optional[PathLike] = None) -> DetectionFile:
    """The images, boxes and classes of a COCO-style detection file (see the module docstring); images under
    `image_root` (default: the file's folder); class indices follow the file's `categories` order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detection file {path} does not exist")
    data = _load(path)
    root = Path(image_root) if image_root is not None else path.parent
    result = DetectionFile(path=path)
    category_index: dict = {}
    for position, category in enumerate(data["categories"]):
        try:
            category_index[category["id"]] = position
            result.classnames.append(str(category["name"]).strip())
        except (KeyError, TypeError):
            raise ValueError(f"{path}: categories[{position}] needs an 'id' and a 'name'") from None
    image_index: dict = {}
    boxes: list[list[tuple[float, float, float, float]]] = []
    labels: list[list[int]] = []
    for position, image in enumerate(data["images"]):
        try:
            image_index[image["id"]] = position
            result.images.append(root / image["file_name"])
            result.sizes.append((int(image["width"]), int(image["height"])))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: images[{position}] needs 'id', 'file_name', 'width' and 'height'") from None
        boxes.append([])
        labels.append([])
    for position, annotation in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{position}]"
        try:
            image_id, category_id, bbox = annotation["image_id"], annotation["category_id"], annotation["bbox"]
            x, y, w, h = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: annotations[{position}] needs 'image_id', 'category_id' and a 4-number 'bbox'") from None
        if image_id not in image_index:
            result.problems.append(("unknown_image", f"{where}: image_id {image_id!r} is not in images"))
            continue
        if category_id not in category_index:
            result.problems.append(("unknown_category", f"{where}: category_id {category_id!r} is not in categories"))
            continue
        row = image_index[image_id]
        width, height = result.sizes[row]
        box = clip_box(x, y, w, h, width, height)
        if box is None:
            result.problems.append(("box_empty", f"{where}: bbox {bbox} is empty or outside the {width}x{height} image"))
            continue
        boxes[row].append(box)
        labels[row].append(category_index[category_id])
    result.objects = [
        RegionImage(np.asarray(b, dtype=np.float32).reshape(-1, 4), np.asarray(l, dtype=np.int64)) for b, l in zip(boxes, labels)
    ]
    return result


def scene_class_names() -> list[str]:
    """The scenes' object classes, colour x shape ("red circle"), in label order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _place(rng: np.random.Generator, half: float, placed: list[tuple[float, float, float, float]], side: int) -> Optional[tuple[float, float]]:
    """A centre for an object of half-extent `half` inside the image and clear of the boxes `placed` (None
    after 50 tries)."""
    for _ in range(50):
        cy, cx = rng.uniform(half + 1, side - half - 1, size=2)
        box = (cx - half, cy - half, cx + half, cy + half)
        if all(box[2] <= p[0] or p[2] <= box[0] or box[3] <= p[1] or p[3] <= box[1] for p in placed):
            return cy, cx
    return None


def make_scene(rng: np.random.Generator, image_size: int, max_objects: int) -> tuple[np.ndarray, RegionImage]:
    """One (H, W, 3) uint8 scene of 1..max_objects non-overlapping shapes on noise, and their boxes and classes."""
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    background = rng.uniform(0, 60) + rng.normal(0, 8, size=(image_size, image_size, 1))
    image = np.repeat(background, 3, axis=2)
    colours, sizes = list(COLOURS), list(SCENE_SIZES)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
        half = SCENE_SIZES[sizes[rng.integers(len(sizes))]] * image_size
        centre = _place(rng, half * SHAPE_REACH, boxes, image_size)
        if centre is None:
            continue
        cy, cx = centre
        mask = shape_mask(shape, rows, cols, cy, cx, half)
        image[mask] = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 12, size=3)
        ys, xs = np.nonzero(mask)
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
        labels.append(colours.index(colour) * len(SHAPES) + SHAPES.index(shape))
    objects = RegionImage(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def make_scenes(split: str, size: int, seed: int = 0, image_size: int = 64, max_objects: int = 3) -> tuple[np.ndarray, list[RegionImage]]:
    """`size` scenes of split `split` (train, val or test), deterministic in `seed`: images (N, H, W, 3) uint8 and
    each image's objects, boxes tight around each shape's pixels."""
    if split not in SCENE_OFFSETS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SCENE_OFFSETS)}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    rng = np.random.default_rng(seed + SCENE_OFFSETS[split])
    scenes = [make_scene(rng, image_size, max_objects) for _ in range(size)]
    return np.stack([image for image, _ in scenes]), [objects for _, objects in scenes]


def check_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    """`boxes` as a float64 (N, 4) array; ValueError naming `name` for any other shape."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) boxes (x0, y0, x1, y1), got shape {boxes.shape}")
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union (float64) of boxes `a` (N, 4) and `b` (M, 4), each (x0, y0, x1, y1); a box
    with x1 < x0 or y1 < y0 has zero area, and a pair whose union has zero area gets IoU 0."""
    a, b = check_boxes(a, "a"), check_boxes(b, "b")
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class RegionSet:
    """Images of one size (N, S, S, 3) uint8 with each image's objects (boxes in those pixels), the class names
    their labels index, and what was skipped reading them (bad images in `quality`, bad boxes in `problems`)."""

    images: np.ndarray
    objects: list[RegionImage]
    classnames: list[str]
    quality: DataQuality = field(default_factory=DataQuality)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        """Side of the square images."""
        return int(self.images.shape[1])

    def problem_counts(self) -> dict[str, int]:
        """How many boxes were skipped, by kind."""
        return dict(Counter(kind for kind, _ in self.problems))


def scene_regions(split: str, size: int, seed: int = 0, image_size: int = 64, max_objects: int = 3) -> RegionSet:
    """The embedded scenes (`make_scenes`) as a RegionSet over `scene_class_names`."""
    images, objects = make_scenes(split, size, seed, image_size, max_objects)
    return RegionSet(images, objects, scene_class_names())


def fitted_boxes(boxes: np.ndarray, width: int, height: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a width x height image moved the way `transforms.fit_image` moves its pixels (shorter side resized to
    `image_size`, centre crop), clipped to the crop: the boxes that keep some area (M, 4) and which ones they are (M,)."""
    scale = image_size / min(width, height)
    resized_w, resized_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    left, top = (resized_w - image_size) // 2, (resized_h - image_size) // 2
    fitted = boxes * np.array([resized_w / width, resized_h / height] * 2, dtype=np.float32) - np.array([left, top] * 2, dtype=np.float32)
    fitted = np.clip(fitted, 0, image_size)
    kept = np.flatnonzero((fitted[:, 2] > fitted[:, 0]) & (fitted[:, 3] > fitted[:, 1]))
    return fitted[kept].astype(np.float32), kept


def detection_regions(path: PathLike, image_size: int, image_root: Optional[PathLike] = None, progress: bool = True) -> RegionSet:
    """A COCO-style detection file's images decoded at `image_size` (resized and centre-cropped as every image in
    vldistill) with their boxes moved alike. Bad images are skipped and counted in `quality` (DataQualityError when
    too many are bad); bad boxes, and boxes the centre crop cuts away ("box_cropped"), in `problems`."""
    read = read_coco_detection(path, image_root)
    quality, problems = DataQuality(), list(read.problems)
    images, kept_objects = [], []
    rows = zip(read.images, read.sizes, read.objects)
    for image_path, (width, height), objects in tqdm(rows, total=len(read.images), desc="detection images", disable=not progress):
        image = decode_counted(image_path, image_size, quality, True, str(image_path))
        if image is None:
            continue
        boxes, kept = fitted_boxes(objects.boxes, width, height, image_size)
        problems += [("box_cropped", f"{image_path.name}: box {objects.boxes[i].tolist()} lies outside the centre crop")
                     for i in sorted(set(range(len(objects.boxes))) - set(kept.tolist()))]
        images.append(image.numpy())
        kept_objects.append(RegionImage(boxes, objects.labels[kept]))
    if quality.over_threshold():
        raise DataQualityError(f"{path}: too many bad images\n{quality.report()}")
    if not images:
        raise ValueError(f"{path}: no readable image")
    return RegionSet(np.stack(images), kept_objects, read.classnames, quality, problems)


def background_boxes(
    rng: np.random.Generator, objects: np.ndarray, image_size: int, count: int, max_iou: float = 0.3,
    sizes: tuple[float, float] = (0.15, 0.45),
) -> np.ndarray:
    """`count` random boxes (count, 4) in an image_size image, each side a uniform share `sizes` of the image and
    overlapping every box of `objects` (K, 4) by IoU < `max_iou` (fewer when 100 tries find no such place)."""
    found: list[np.ndarray] = []
    for _ in range(100 * count):
        if len(found) == count:
            break
        w, h = rng.uniform(*sizes, size=2) * image_size
        x0, y0 = rng.uniform(0, image_size - w), rng.uniform(0, image_size - h)
        box = np.array([[x0, y0, x0 + w, y0 + h]], dtype=np.float32)
        if len(objects) == 0 or box_iou(box, objects).max() < max_iou:
            found.append(box[0])
    return np.asarray(found, dtype=np.float32).reshape(-1, 4)


@dataclass
class Proposals:
    """The boxes a region model embeds, over a RegionSet's images: boxes (R, 4), the image of each (R,), its class
    (R,; -1 for a background box) and whether it is an object box (R,)."""

    boxes: np.ndarray
    image_index: np.ndarray
    classes: np.ndarray

    @property
    def is_object(self) -> np.ndarray:
        """(R,) True for the boxes of objects, False for background boxes."""
        return self.classes >= 0

    def __len__(self) -> int:
        return len(self.boxes)


def region_proposals(regions: RegionSet, background: int, seed: int, max_iou: float = 0.3) -> Proposals:
    """Every object box of every image plus `background` random boxes per image clear of its objects
    (`background_boxes`, seeded): the class-agnostic proposals ViLD embeds, as a perfect proposal network would
    find the objects."""
    rng = np.random.default_rng(seed)
    boxes, index, classes = [], [], []
    for row, objects in enumerate(regions.objects):
        extra = background_boxes(rng, objects.boxes, regions.image_size, background, max_iou)
        boxes += [objects.boxes, extra]
        index.append(np.full(len(objects.boxes) + len(extra), row, dtype=np.int64))
        classes += [objects.labels, np.full(len(extra), -1, dtype=np.int64)]
    return Proposals(np.concatenate(boxes).astype(np.float32), np.concatenate(index), np.concatenate(classes))
