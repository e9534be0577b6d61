"""Image preprocessing without torchvision: uint8 HWC arrays -> normalized float CHW tensors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalization, also what CLIPImageProcessor uses by default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pixel_values(images: np.ndarray | torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Convert uint8 images (N, H, W, 3) to float (N, 3, H, W), scaled to [0, 1] and normalized."""
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def fit_image(image: Image.Image, image_size: int) -> np.ndarray:
    """An opened image as RGB uint8 (image_size, image_size, 3): shorter side resized (bicubic), centre crop."""
    image = image.convert("RGB")
    scale = image_size / min(image.size)
    width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
