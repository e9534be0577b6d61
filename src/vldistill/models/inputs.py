"""What inputs a dual encoder expects: image size and normalization, text length and padding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vldistill.data.transforms import CLIP_MEAN, CLIP_STD

TEXT_PADDINGS = ("longest", "max_length")


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its batch prepared.

    image_size: side of the square images its image tower takes.
    image_mean / image_std: per-channel normalization after scaling pixels to [0, 1].
    max_text_length: longest token sequence its text tower takes (longer texts are truncated).
    text_padding: "longest" (pad each batch to its longest text) or "max_length" (always pad to
        max_text_length, as SigLIP was trained).
    """

    image_size: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_text_length: int = 77
    text_padding: str = "longest"

    def __post_init__(self) -> None:
        if self.text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding must be one of {', '.join(TEXT_PADDINGS)}, got {self.text_padding!r}")


def image_normalization(
    model_dir: Optional[str | Path], mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean and std in a model folder's `preprocessor_config.json` (`mean`/`std` when the
    folder, the file or the key is absent, e.g. for a hub id)."""
    path = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return tuple(mean), tuple(std)
    config = json.loads(path.read_text())
    return tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
