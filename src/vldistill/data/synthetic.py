"""The embedded default data: procedurally drawn coloured shapes with captions, from a seed.

Each image is a shape of one colour, one of three sizes, at one of nine positions on a noisy dark
background. Training captions vary their wording and sometimes leave out the size or position;
validation and test captions always state all four attributes in one canonical wording, so
retrieval on them has a well-defined answer (images that share an identical caption are
equivalent). Zero-shot classes are size x colour x shape ("a small red circle").

Validation and test images also carry reference captions for captioning metrics (`reference_captions`):
the canonical caption and every training wording that states all four attributes, so CIDEr's consensus
has several references per image, as COCO's five captions give it.
"""

from __future__ import annotations

import numpy as np

from vldistill.data.grammar import (
    CANONICAL_CAPTION,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_CAPTIONS,
    class_label,
)
from vldistill.data.pairs import PairSplit

SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}
ATTRIBUTES = ("size", "colour", "shape", "position")
# The wordings a reference caption may take: the canonical one, then every training wording stating all four attributes.
REFERENCE_WORDINGS = tuple(
    dict.fromkeys(
        [CANONICAL_CAPTION, *(w for w in TRAIN_CAPTIONS if all(f"{{{name}}}" in w for name in ATTRIBUTES))]
    )
)


def caption_for(wording: str, attrs: dict[str, str]) -> str:
    """`wording` filled with an image's attributes (its position as a phrase: "at the top left")."""
    return wording.format(**{**attrs, "position": POSITION_PHRASES[attrs["position"]]})


def reference_captions(attrs: dict[str, str]) -> list[str]:
    """An image's reference captions: its canonical caption first, then every other training wording that
    states all four attributes (`REFERENCE_WORDINGS`), filled with its attributes."""
    return [caption_for(wording, attrs) for wording in REFERENCE_WORDINGS]


def shape_mask(shape: str, rows: np.ndarray, cols: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of `shape` centred at (cy, cx) with half-extent r on the pixel grid."""
    dy, dx = rows - cy, cols - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up: the half-width grows from 0 at the top to r at the base
        inside_rows = (dy >= -r) & (dy <= r)
        return inside_rows & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.15
    if shape == "cross":
        arm = max(r * 0.35, 0.8)
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render(shape: str, colour: str, size: str, position: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one (H, W, 3) uint8 image: the shape with jittered place, size and colour on noise."""
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    fy, fx = POSITIONS[position]
    jitter = image_size * 0.04
    cy, cx = fy * image_size + rng.uniform(-jitter, jitter), fx * image_size + rng.uniform(-jitter, jitter)
    r = SIZES[size] * image_size * rng.uniform(0.9, 1.1)
    background = rng.uniform(0, 60) + rng.normal(0, 8, size=(image_size, image_size, 1))
    image = np.repeat(background, 3, axis=2)
    tint = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 12, size=3)
    image[shape_mask(shape, rows, cols, cy, cx, r)] = tint
    return np.clip(image, 0, 255).astype(np.uint8)


def make_split(split: str, size: int, seed: int = 0, image_size: int = 32) -> PairSplit:
    """Generate split `split` ("train", "val" or "test") with `size` samples, deterministic in `seed`;
    val and test images carry their `reference_captions`."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLIT_OFFSETS)}")
    rng = np.random.default_rng(seed + SPLIT_OFFSETS[split])
    colours, sizes, positions = list(COLOURS), list(SIZES), list(POSITIONS)
    images = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    captions, labels, attributes = [], np.empty(size, dtype=np.int64), []
    for i in range(size):
        attrs = {
            "colour": colours[rng.integers(len(colours))],
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "size": sizes[rng.integers(len(sizes))],
            "position": positions[rng.integers(len(positions))],
        }
        images[i] = render(attrs["shape"], attrs["colour"], attrs["size"], attrs["position"], image_size, rng)
        wording = TRAIN_CAPTIONS[rng.integers(len(TRAIN_CAPTIONS))] if split == "train" else CANONICAL_CAPTION
        captions.append(caption_for(wording, attrs))
        labels[i] = class_label(attrs["size"], attrs["colour"], attrs["shape"])
        attributes.append(attrs)
    references = None if split == "train" else [reference_captions(attrs) for attrs in attributes]
    return PairSplit(images=images, captions=captions, labels=labels, attributes=attributes, references=references)
