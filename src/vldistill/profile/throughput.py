"""Measure how fast dual encoders embed on this machine: warm-up, repeated timed rounds, the median and the
spread, several models interleaved so that a change of machine load touches them alike."""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping, Optional, TypeVar

import torch
from tqdm.auto import tqdm

K = TypeVar("K", bound=Hashable)


def count_parameters(module: torch.nn.Module) -> int:
    """Total number of parameters (trainable or not); a model whose weights are not all `nn.Parameter`s (int8
    layers, an ONNX pair run by onnxruntime) counts them itself with `num_parameters()`."""
    own = getattr(module, "num_parameters", None)
    return own() if callable(own) else sum(p.numel() for p in module.parameters())


def quartiles(values) -> tuple[float, float]:
    """The 25th and 75th percentiles of `values` (linear interpolation; both the value itself for one value)."""
    values = list(values)
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def percentile(values, q: int) -> float:
    """The `q`-th percentile of `values` (0 < q < 100, linear interpolation; the value itself for one value)."""
    values = list(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass(frozen=True)
class Throughput:
    """Items per second of one model over repeated trials (one batch each): the median trial and the
    interquartile range (25th to 75th percentile), with every trial's seconds."""

    batch_size: int
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        """Items/s of the median trial."""
        return self.batch_size / statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(low, high) items/s: the 75th and 25th percentile trial times."""
        low, high = quartiles(self.seconds)
        return self.batch_size / high, self.batch_size / low

    @property
    def per_round(self) -> tuple[float, ...]:
        """Seconds of each round's trial (what `speedup` compares round by round)."""
        return self.seconds

    def as_dict(self, unit: str = "images") -> dict[str, float]:
        """Plain figures for a results file: `{unit}_per_second` (the median), its p25-p75 range and the
        number of trials."""
        low, high = self.spread
        return {f"{unit}_per_second": self.median, f"{unit}_per_second_p25": low, f"{unit}_per_second_p75": high,
                "trials": len(self.seconds)}


@dataclass(frozen=True)
class Latency:
    """Seconds of single calls (one input each), several per round: the median (p50) and the 95th
    percentile over every call."""

    seconds: tuple[tuple[float, ...], ...]  # per round, the seconds of each of its calls

    @property
    def calls(self) -> tuple[float, ...]:
        """Every call's seconds, round after round."""
        return tuple(s for round_seconds in self.seconds for s in round_seconds)

    @property
    def per_round(self) -> tuple[float, ...]:
        """The median call of each round (what `speedup` compares round by round)."""
        return tuple(statistics.median(round_seconds) for round_seconds in self.seconds)

    def as_dict(self) -> dict[str, float]:
        """Plain figures for a results file: p50 and p95 in milliseconds and the number of calls."""
        calls = self.calls
        return {"p50_ms": 1000 * statistics.median(calls), "p95_ms": 1000 * percentile(calls, 95), "calls": len(calls)}


@contextmanager
def no_gc() -> Iterator[None]:
    """Python's garbage collector collected once, then paused (a collection inside a timed call would be
    counted against it)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@torch.inference_mode()
def interleaved_trials(
    calls: Mapping[K, Callable[[], Any]],
    rounds: int,
    warmup: int = 2,
    repeats: Optional[Mapping[K, int]] = None,
    progress: bool = False,
    desc: str = "timing",
) -> dict[K, tuple[tuple[float, ...], ...]]:
    """Seconds of each call, under `torch.inference_mode()` with the garbage collector paused: `warmup`
    untimed rounds, then `rounds` rounds in which every call runs `repeats[key]` (default 1) timed times in
    turn, in the mapping's order. Interleaving keeps the figures comparable when other work on the machine
    speeds up or slows down during the measurement. Returns, per key, the seconds of its calls per round."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    repeats = {key: (repeats or {}).get(key, 1) for key in calls}
    seconds: dict[K, list[tuple[float, ...]]] = {key: [] for key in calls}
    with no_gc():
        for index in tqdm(range(warmup + rounds), desc=desc, unit="round", disable=not progress):
            for key, call in calls.items():
                times = []
                for _ in range(repeats[key]):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                if index >= warmup:
                    seconds[key].append(tuple(times))
    return {key: tuple(per_round) for key, per_round in seconds.items()}


@contextmanager
def eval_mode(models) -> Iterator[None]:
    """The given modules in eval mode for the block (objects that are not modules are left alone); each
    module's own mode is restored afterwards."""
    modules = [model for model in models if isinstance(model, torch.nn.Module)]
    states = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, state in zip(modules, states):
            module.train(state)


def compare_image_throughput(
    models: Mapping[str, torch.nn.Module],
    image_sizes: Mapping[str, int],
    batch_size: int = 256,
    trials: int = 9,
    warmup: int = 2,
) -> dict[str, Throughput]:
    """Images/s of each model's `encode_image` on a fixed random batch of its image size, in eval mode under
    `torch.inference_mode()`: `warmup` untimed batches each, then `trials` rounds in which every model embeds
    one timed batch in turn (see `interleaved_trials`)."""
    pixels = {
        name: torch.randn(batch_size, 3, image_sizes[name], image_sizes[name], generator=torch.Generator().manual_seed(0))
        for name in models
    }
    calls = {name: (lambda model=model, x=pixels[name]: model.encode_image(x)) for name, model in models.items()}
    with eval_mode(models.values()):
        measured = interleaved_trials(calls, trials, warmup)
    return {name: Throughput(batch_size, tuple(s for (s,) in per_round)) for name, per_round in measured.items()}


def speedup(fast, slow) -> dict[str, float]:
    """How many times faster `fast` is than `slow` (two `Throughput`s or two `Latency`s measured in the same
    rounds, see `interleaved_trials`): the median of the per-round ratios of seconds and their interquartile
    range."""
    ratios = [s / f for f, s in zip(fast.per_round, slow.per_round)]
    low, high = quartiles(ratios)
    return {"median": statistics.median(ratios), "p25": low, "p75": high}


def images_per_second(model, image_size: int, batch_size: int = 256, repeats: int = 5, warmup: int = 2) -> float:
    """Images embedded per second by `model.encode_image` on random pixels: the median of `repeats` timed
    batches after `warmup` (see `compare_image_throughput`)."""
    measured = compare_image_throughput({"model": model}, {"model": image_size}, batch_size, repeats, warmup)
    return measured["model"].median
