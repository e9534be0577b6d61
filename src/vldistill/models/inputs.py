"""What inputs a dual encoder expects: image size and normalization, text length and padding; which batch
entries are a model's inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# OpenAI CLIP's normalization, also what CLIPImageProcessor uses by default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_PADDINGS = ("longest", "max_length")
# The batch entries a dual encoder's forward takes.
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")


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


def inputs_for(batch: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """One model's inputs from a collated batch: its `MODEL_INPUTS`, prefixed `key.` when `key`, else
    the unprefixed ones (other batch entries, such as `sample_index`, `view` and `view_hash`, are not inputs)."""
    prefix = f"{key}." if key else ""
    return {name: batch[prefix + name] for name in MODEL_INPUTS if prefix + name in batch}
