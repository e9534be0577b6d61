"""Embed images and texts with a dual encoder in inference mode, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]
Images = torch.Tensor | Iterable[torch.Tensor]


@contextmanager
def inference(model: nn.Module) -> Iterator[torch.device]:
    """Run `model` in eval + inference mode, yield its device, then restore every module's training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield _device(model)
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _image_batches(images: Images, batch_size: int) -> Iterable[torch.Tensor]:
    return images.split(batch_size) if isinstance(images, torch.Tensor) else images


def _concat(chunks: list[torch.Tensor], what: str) -> torch.Tensor:
    if not chunks:
        raise ValueError(f"no {what} to embed")
    return torch.cat(chunks).float().cpu()


def embed_images(
    model: nn.Module, images: Images, batch_size: int = 256, progress: bool = True
) -> torch.Tensor:
    """(N, D) image embeddings (float32, CPU) of a (N, 3, H, W) tensor or an iterable of image batches."""
    chunks = []
    with inference(model) as device:
        for batch in tqdm(_image_batches(images, batch_size), desc="embed images", disable=not progress):
            chunks.append(model.encode_image(batch.to(device)))
        return _concat(chunks, "images")


def embed_texts(
    model: nn.Module, tokenize: Tokenize, texts: list[str], batch_size: int = 256, progress: bool = True
) -> torch.Tensor:
    """(N, D) text embeddings (float32, CPU) of `texts`, tokenized `batch_size` texts at a time."""
    chunks = []
    starts = range(0, len(texts), batch_size)
    with inference(model) as device:
        for start in tqdm(starts, desc="embed texts", disable=not progress):
            tokens = tokenize(list(texts[start : start + batch_size]))
            chunks.append(
                model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            )
        return _concat(chunks, "texts")
