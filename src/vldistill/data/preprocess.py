"""Turn raw views (uint8 images, caption strings) into one model's inputs."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD, InputSpec

Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


def model_pixel_values(
    images: torch.Tensor, image_size: Optional[int], image_mean: tuple[float, ...], image_std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 images (B, H, W, 3) as one model's float pixel values (B, 3, S, S): normalized with its mean/std,
    resized (bilinear, antialiased) when it takes another `image_size` (None: kept as they are)."""
    pixels = to_pixel_values(images, image_mean, image_std)
    if image_size is not None and pixels.shape[-1] != image_size:
        # Bilinear resampling is linear with weights summing to 1, so it commutes with normalization.
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True)
    return pixels


class BatchPreprocessor:
    """Images (B, H, W, 3) uint8 and captions -> {pixel_values, input_ids, attention_mask} for one model:
    normalized with its mean/std, resized (bilinear, antialiased) when it takes another image size,
    captions tokenized with its tokenizer and padding."""

    def __init__(
        self,
        tokenize: Tokenize,
        image_size: Optional[int] = None,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        self.tokenize = tokenize
        self.image_size = image_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @classmethod
    def for_model(cls, tokenizer: PreTrainedTokenizerBase, spec: InputSpec) -> "BatchPreprocessor":
        """The preprocessor a model with input spec `spec` and this tokenizer needs."""
        tokenize = make_tokenize(tokenizer, spec.max_text_length, padding=spec.text_padding)
        return cls(tokenize, spec.image_size, spec.image_mean, spec.image_std)

    def __call__(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        pixels = model_pixel_values(images, self.image_size, self.image_mean, self.image_std)
        return {"pixel_values": pixels, **self.tokenize(list(captions))}

    def same_as(self, other: "BatchPreprocessor") -> bool:
        """True when both produce identical inputs (same tokenizer function settings and image handling)."""
        return (
            self.tokenize is other.tokenize
            and (self.image_size, self.image_mean, self.image_std) == (other.image_size, other.image_mean, other.image_std)
        )
