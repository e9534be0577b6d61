"""Image preprocessing without torchvision: PIL images of any mode -> RGB uint8 HWC arrays of one size,
and uint8 HWC arrays -> normalized float CHW tensors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vldistill.models.inputs import CLIP_MEAN, CLIP_STD

# Integer greyscale modes (16-bit, and Pillow's 32-bit "I", which 16-bit PGM/TIFF files open as): values 0..65535.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What transparent pixels show: white, as a web page behind the image would.
BACKGROUND = (255, 255, 255)


def to_pixel_values(images: np.ndarray | torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Convert uint8 images (N, H, W, 3) to float (N, 3, H, W), scaled to [0, 1] and normalized."""
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any Pillow mode as 8-bit RGB on the right scale: integer greyscale (WIDE_GREY_MODES)
    maps 0..65535 to 0..255 (Pillow's own conversion clips at 255); float greyscale ("F") maps 0..1
    to 0..255, or is clipped to 0..255 when a value exceeds 1; an alpha channel or transparent colour
    is composited over BACKGROUND; every other mode (L, 1, P, CMYK, YCbCr, ...) by Pillow's convert."""
    if image.mode in WIDE_GREY_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if image.mode in WIDE_GREY_MODES:
            values = values / 257  # 65535 / 255
        elif np.nanmax(values, initial=0.0) <= 1:
            values = values * 255
        grey = np.clip(np.rint(np.nan_to_num(values, nan=0.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", image.size, BACKGROUND)
        rgb.paste(rgba, mask=rgba)
        return rgb
    return image.convert("RGB")


def fit_image(image: Image.Image, image_size: int) -> np.ndarray:
    """An opened image as RGB uint8 (image_size, image_size, 3) (see to_rgb): shorter side resized
    (bicubic), centre crop."""
    image = to_rgb(image)
    scale = image_size / min(image.size)
    width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
