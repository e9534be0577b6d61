"""Training-time augmentation without torchvision, for image-caption pairs.

Images (uint8 HWC, before normalization): random resized crop, horizontal flip, colour jitter
(brightness, contrast, saturation). Captions: template paraphrase, word swaps, word dropout.

Every random choice is drawn first into a small frozen params dataclass (`sample_*_params`, from a
`torch.Generator`), then applied deterministically (`apply_*_augment`), so a recorded view can be
replayed exactly (e.g. by a teacher cache). The order is fixed: crop -> flip -> brightness ->
contrast -> saturation for images, paraphrase -> left/right swap -> word swaps -> word dropout for
captions.

Two caption rules keep pairs correct:
- A horizontal flip swaps the words "left" and "right" in the caption (whole words, any case). This
  is exact for the shapes data and right for most natural captions ("all right" is the odd casualty).
- Paraphrase needs the sample's attributes (size, colour, shape, position; only the embedded shapes
  data has them): the caption is re-rendered with a random wording from `grammar.TRAIN_CAPTIONS`
  among those that state every attribute the original caption states. Without attributes it is a
  no-op.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from vldistill.data.grammar import POSITION_PHRASES, TRAIN_CAPTIONS

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision use
CROP_ATTEMPTS = 10
_MIRRORED = {"left": "right", "right": "left"}
_MIRROR_PATTERN = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_PLACEHOLDERS = ("size", "colour", "shape", "position")


@dataclass
class AugmentConfig:
    """Which augmentations run on training pairs (all off by default) and how strong they are.

    Probabilities are per sample (word ops: per word or word pair). A jitter strength s draws a
    factor uniformly from [max(0, 1 - s), 1 + s]; 0 turns it off.
    """

    crop_prob: float = 0.0
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    word_dropout_prob: float = 0.0
    word_swap_prob: float = 0.0
    paraphrase_prob: float = 0.0

    def validate(self, where: str) -> None:
        """Raise ValueError naming the first key whose value cannot be used."""
        for name in ("crop_prob", "flip_prob", "word_dropout_prob", "word_swap_prob", "paraphrase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{where}.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name} must be >= 0 (0: off), got {getattr(self, name)}")
        for name, upper in (("crop_scale", 1.0), ("crop_ratio", math.inf)):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1] <= upper:
                bound = "1" if upper == 1.0 else "inf"
                raise ValueError(f"{where}.{name} must be [low, high] with 0 < low <= high <= {bound}, got {low_high}")


@dataclass(frozen=True)
class ImageAugmentParams:
    """The drawn image view: crop box (top, left, height, width; None = whole image), flip, jitter factors."""

    crop: Optional[tuple[int, int, int, int]] = None
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    def is_identity(self) -> bool:
        """True when applying these params leaves the image unchanged."""
        return self == ImageAugmentParams()


@dataclass(frozen=True)
class TextAugmentParams:
    """The drawn caption edit: paraphrase wording (index into `grammar.TRAIN_CAPTIONS`, None = keep),
    left/right swap, adjacent swaps (word i with i + 1, in order) and dropped word positions."""

    wording: Optional[int] = None
    mirror: bool = False
    swaps: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()


@dataclass(frozen=True)
class AugmentParams:
    """Everything drawn for one pair; `text.mirror` follows `image.flip`."""

    image: ImageAugmentParams
    text: TextAugmentParams


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """A float drawn uniformly from [low, high)."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(generator: torch.Generator, high: int) -> int:
    """An integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator).item())


def _factor(generator: torch.Generator, strength: float) -> float:
    """A jitter factor from [max(0, 1 - strength), 1 + strength]; 1 (no draw) when strength is 0."""
    return _uniform(generator, max(0.0, 1.0 - strength), 1.0 + strength) if strength > 0 else 1.0


def _crop_box(generator: torch.Generator, cfg: AugmentConfig, size: int) -> tuple[int, int, int, int]:
    """A random box of area fraction in `crop_scale` and aspect (w / h) in `crop_ratio` (torchvision's
    RandomResizedCrop rule: up to 10 tries, then the centred box of the closest allowed aspect)."""
    area = size * size
    log_low, log_high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * _uniform(generator, *cfg.crop_scale)
        aspect = math.exp(_uniform(generator, log_low, log_high))
        width, height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < width <= size and 0 < height <= size:
            return _randint(generator, size - height + 1), _randint(generator, size - width + 1), height, width
    aspect = min(max(1.0, cfg.crop_ratio[0]), cfg.crop_ratio[1])
    width, height = (size, round(size / aspect)) if aspect >= 1 else (round(size * aspect), size)
    return (size - height) // 2, (size - width) // 2, height, width


def sample_image_params(generator: torch.Generator, cfg: AugmentConfig, image_size: int) -> ImageAugmentParams:
    """Draw one square image's view; disabled options draw nothing and keep their identity value."""
    crop = _crop_box(generator, cfg, image_size) if cfg.crop_prob and _uniform(generator) < cfg.crop_prob else None
    flip = bool(cfg.flip_prob) and _uniform(generator) < cfg.flip_prob
    return ImageAugmentParams(
        crop=crop,
        flip=flip,
        brightness=_factor(generator, cfg.brightness),
        contrast=_factor(generator, cfg.contrast),
        saturation=_factor(generator, cfg.saturation),
    )


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    """Luma of float (..., 3) pixels, shape (..., 1)."""
    return (pixels * pixels.new_tensor(GREY_WEIGHTS)).sum(-1, keepdim=True)


def apply_image_augment(image: torch.Tensor, params: ImageAugmentParams) -> torch.Tensor:
    """The view `params` describe of one uint8 (H, W, 3) image, as uint8 (H, W, 3) of the same size.

    The crop is resized back bilinearly (align_corners=False; always an upscale, so no antialiasing);
    brightness scales, contrast blends with the mean luma, saturation blends with the per-pixel luma,
    clamping to [0, 255] after each; the result is rounded once at the end.
    """
    image = torch.as_tensor(image)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 image of shape (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    if params.is_identity():
        return image
    height, width = image.shape[:2]
    pixels = image.float()
    if params.crop is not None:
        top, left, crop_h, crop_w = params.crop
        if top < 0 or left < 0 or crop_h < 1 or crop_w < 1 or top + crop_h > height or left + crop_w > width:
            raise ValueError(f"crop box {params.crop} (top, left, height, width) is outside a {height}x{width} image")
        window = pixels[top : top + crop_h, left : left + crop_w].permute(2, 0, 1).unsqueeze(0)
        pixels = F.interpolate(window, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    if params.flip:
        pixels = pixels.flip(1)
    if params.brightness != 1.0:
        pixels = (pixels * params.brightness).clamp(0, 255)
    if params.contrast != 1.0:
        mean = _grey(pixels).mean()
        pixels = (mean + params.contrast * (pixels - mean)).clamp(0, 255)
    if params.saturation != 1.0:
        grey = _grey(pixels)
        pixels = (grey + params.saturation * (pixels - grey)).clamp(0, 255)
    return pixels.round().clamp(0, 255).to(torch.uint8)


def _stated_attributes(caption: str, attributes: Mapping[str, str]) -> set[str]:
    """Which of size/colour/shape/position the shapes caption states (its words or position phrase)."""
    words = caption.split()
    stated = {key for key in ("size", "colour", "shape") if attributes[key] in words}
    if POSITION_PHRASES[attributes["position"]] in caption:
        stated.add("position")
    return stated


def _paraphrase_choices(caption: str, attributes: Mapping[str, str]) -> list[int]:
    """Indices of the TRAIN_CAPTIONS wordings that state every attribute `caption` states."""
    stated = _stated_attributes(caption, attributes)
    return [i for i, wording in enumerate(TRAIN_CAPTIONS) if all(f"{{{key}}}" in wording for key in stated)]


def _render(wording: int, attributes: Mapping[str, str]) -> str:
    """TRAIN_CAPTIONS[wording] filled in with the sample's attributes."""
    values = {key: attributes[key] for key in _PLACEHOLDERS}
    values["position"] = POSITION_PHRASES[values["position"]]
    return TRAIN_CAPTIONS[wording].format(**values)


def mirror_caption(caption: str) -> str:
    """The caption of a horizontally flipped image: whole words "left" and "right" exchanged (case kept)."""

    def swap(match: re.Match[str]) -> str:
        word = match.group()
        mirrored = _MIRRORED[word.lower()]
        return mirrored.upper() if word.isupper() else mirrored.capitalize() if word[0].isupper() else mirrored

    return _MIRROR_PATTERN.sub(swap, caption)


def _edit_base(caption: str, params: TextAugmentParams, attributes: Optional[Mapping[str, str]]) -> list[str]:
    """The caption's words after paraphrase and mirroring (what swaps and dropout index into)."""
    if params.wording is not None:
        if attributes is None:
            raise ValueError("a paraphrase (wording is set) needs the sample's attributes")
        caption = _render(params.wording, attributes)
    return (mirror_caption(caption) if params.mirror else caption).split()


def sample_text_params(
    generator: torch.Generator,
    cfg: AugmentConfig,
    caption: str,
    attributes: Optional[Mapping[str, str]] = None,
    mirror: bool = False,
) -> TextAugmentParams:
    """Draw one caption's edit; `mirror` comes from the image flip. Paraphrase draws only when
    `attributes` are given; dropout always keeps at least one word."""
    wording = None
    if attributes is not None and cfg.paraphrase_prob and _uniform(generator) < cfg.paraphrase_prob:
        choices = _paraphrase_choices(caption, attributes)
        wording = choices[_randint(generator, len(choices))]
    count = len(_edit_base(caption, TextAugmentParams(wording=wording, mirror=mirror), attributes))
    swaps: list[int] = []
    if cfg.word_swap_prob:
        position = 0
        while position < count - 1:
            if _uniform(generator) < cfg.word_swap_prob:
                swaps.append(position)
                position += 1  # a word moves at most one place
            position += 1
    dropped: list[int] = []
    if cfg.word_dropout_prob:
        dropped = [i for i in range(count) if _uniform(generator) < cfg.word_dropout_prob]
        if count and len(dropped) == count:
            dropped.pop(_randint(generator, count))
    return TextAugmentParams(wording=wording, mirror=mirror, swaps=tuple(swaps), dropped=tuple(dropped))


def apply_text_augment(caption: str, params: TextAugmentParams, attributes: Optional[Mapping[str, str]] = None) -> str:
    """The caption `params` describe: paraphrased (needs `attributes`), mirrored, swapped, words dropped."""
    if params == TextAugmentParams():
        return caption
    words = _edit_base(caption, params, attributes)
    for position in params.swaps:
        words[position], words[position + 1] = words[position + 1], words[position]
    dropped = set(params.dropped)
    return " ".join(word for i, word in enumerate(words) if i not in dropped)


def sample_params(
    generator: torch.Generator,
    cfg: AugmentConfig,
    image_size: int,
    caption: str,
    attributes: Optional[Mapping[str, str]] = None,
) -> AugmentParams:
    """Draw one pair's view: the image's, then the caption's (mirrored when the image is flipped)."""
    image = sample_image_params(generator, cfg, image_size)
    return AugmentParams(image, sample_text_params(generator, cfg, caption, attributes, mirror=image.flip))


def apply_augment(
    image: torch.Tensor, caption: str, params: AugmentParams, attributes: Optional[Mapping[str, str]] = None
) -> tuple[torch.Tensor, str]:
    """The pair's view `params` describe (replays a recorded view exactly)."""
    return apply_image_augment(image, params.image), apply_text_augment(caption, params.text, attributes)
