"""Measure how fast dual encoders embed images on this machine: warm-up, repeated timed trials, the median
and the spread, several models interleaved so that a change of machine load touches them alike."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping

import torch


def count_parameters(module: torch.nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Throughput:
    """Images per second of one model over repeated trials (one batch each): the median trial and the
    interquartile range (25th to 75th percentile), with every trial's seconds."""

    batch_size: int
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        """Images/s of the median trial."""
        return self.batch_size / statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(low, high) images/s: the 75th and 25th percentile trial times."""
        low, high = quartiles(self.seconds)
        return self.batch_size / high, self.batch_size / low

    def as_dict(self) -> dict[str, float]:
        """Plain figures for a results file: median, p25-p75 range and the number of trials."""
        low, high = self.spread
        return {"images_per_second": self.median, "images_per_second_p25": low, "images_per_second_p75": high,
                "trials": len(self.seconds)}


def quartiles(values) -> tuple[float, float]:
    """The 25th and 75th percentiles of `values` (linear interpolation; both the value itself for one value)."""
    values = list(values)
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@torch.inference_mode()
def compare_image_throughput(
    models: Mapping[str, torch.nn.Module],
    image_sizes: Mapping[str, int],
    batch_size: int = 256,
    trials: int = 9,
    warmup: int = 2,
) -> dict[str, Throughput]:
    """Images/s of each model's `encode_image` on a fixed random batch of its image size, in eval mode under
    `torch.inference_mode()`: `warmup` untimed batches each, then `trials` rounds in which every model embeds
    one timed batch in turn. Interleaving keeps the models' figures comparable when other work on the
    machine speeds up or slows down during the measurement."""
    states = {name: model.training for name, model in models.items()}
    pixels = {
        name: torch.randn(batch_size, 3, image_sizes[name], image_sizes[name], generator=torch.Generator().manual_seed(0))
        for name in models
    }
    try:
        for name, model in models.items():
            model.eval()
            for _ in range(warmup):
                model.encode_image(pixels[name])
        seconds: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(trials):
            for name, model in models.items():
                start = time.perf_counter()
                model.encode_image(pixels[name])
                seconds[name].append(time.perf_counter() - start)
    finally:
        for name, model in models.items():
            model.train(states[name])
    return {name: Throughput(batch_size, tuple(times)) for name, times in seconds.items()}


def speedup(fast: Throughput, slow: Throughput) -> dict[str, float]:
    """How many times faster `fast` embeds images than `slow`, from trials measured in the same rounds
    (`compare_image_throughput`): the median of the per-round ratios and their interquartile range."""
    ratios = [s / f for f, s in zip(fast.seconds, slow.seconds)]
    low, high = quartiles(ratios)
    return {"median": statistics.median(ratios), "p25": low, "p75": high}


def images_per_second(model, image_size: int, batch_size: int = 256, repeats: int = 5, warmup: int = 2) -> float:
    """Images embedded per second by `model.encode_image` on random pixels: the median of `repeats` timed
    batches after `warmup` (see `compare_image_throughput`)."""
    measured = compare_image_throughput({"model": model}, {"model": image_size}, batch_size, repeats, warmup)
    return measured["model"].median
