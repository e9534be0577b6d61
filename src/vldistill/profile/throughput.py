"""Measure how fast a dual encoder embeds images on this machine."""

from __future__ import annotations

import time

import torch


def count_parameters(module: torch.nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def images_per_second(model, image_size: int, batch_size: int = 256, repeats: int = 5, warmup: int = 2) -> float:
    """Images embedded per second by `model.encode_image` on random pixels, median over `repeats` timed batches."""
    was_training = model.training
    model.eval()
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        model.encode_image(pixels)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode_image(pixels)
        timings.append(time.perf_counter() - start)
    model.train(was_training)
    return batch_size / sorted(timings)[len(timings) // 2]
