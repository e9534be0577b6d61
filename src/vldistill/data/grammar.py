"""The shapes data's words: colours, shapes, sizes and positions, the caption wordings (training
paraphrases, the canonical validation/test wording), zero-shot classes and prompts, and the vocabulary
they produce. Shared by the generator (synthetic) and caption augmentation (augment)."""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 230, 50),
    "purple": (160, 60, 220),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "cyan": (40, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.22, "large": 0.32}  # half-extent / image side
POSITIONS: dict[str, tuple[float, float]] = {  # (row, col) centre as a fraction of the side
    "top left": (0.25, 0.25), "top": (0.25, 0.5), "top right": (0.25, 0.75),
    "left": (0.5, 0.25), "center": (0.5, 0.5), "right": (0.5, 0.75),
    "bottom left": (0.75, 0.25), "bottom": (0.75, 0.5), "bottom right": (0.75, 0.75),
}
POSITION_PHRASES = {name: ("in the center" if name == "center" else f"at the {name}") for name in POSITIONS}

CANONICAL_CAPTION = "a {size} {colour} {shape} {position}"
TRAIN_CAPTIONS = (
    "a {size} {colour} {shape} {position}",
    "a photo of a {size} {colour} {shape} {position}",
    "a picture of a {colour} {shape} {position}",
    "a {colour} {shape} {position}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
    "{position} there is a {size} {colour} {shape}",
)
ZERO_SHOT_TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}")


def class_names() -> list[str]:
    """Zero-shot class names, size x colour x shape, in label order."""
    return [f"{size} {colour} {shape}" for size in SIZES for colour in COLOURS for shape in SHAPES]


def class_label(size: str, colour: str, shape: str) -> int:
    """Index of the class `size colour shape` in `class_names()`."""
    return (list(SIZES).index(size) * len(COLOURS) + list(COLOURS).index(colour)) * len(SHAPES) + SHAPES.index(shape)


def vocabulary() -> list[str]:
    """Every word the caption grammar and the zero-shot prompts can produce, sorted."""
    words: set[str] = set()
    for text in (*TRAIN_CAPTIONS, *ZERO_SHOT_TEMPLATES, *POSITION_PHRASES.values()):
        words.update(w for w in text.split() if "{" not in w)
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(SIZES)
    return sorted(words)
