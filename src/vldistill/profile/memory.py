"""Peak memory of a model as served, measured where nothing else lives: a fresh Python process per model.

The parent runs `python -m vldistill.profile.memory SPEC_JSON` for each model (several at once, see
`probe_memory`); the child imports torch and the model's loader, builds its input batch, notes its resident
set and resets the kernel's high-water mark, then loads the model and embeds one batch of images and one of
texts, and prints the high-water mark. A fresh process is what makes the figure honest: in a process that
has already loaded and freed other models, the allocator reuses freed memory and the new model looks
smaller than it is; and the figure counts everything a server pays for the model, whatever runs it
(PyTorch, an int8 module, an onnxruntime session), not only the tensors PyTorch allocates.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from tqdm.auto import tqdm

from vldistill.profile.inputs import image_batch

logger = logging.getLogger(__name__)

DEFAULT_LOADER = "vldistill.models.loading:load_dual_encoder_any"
MEMORY_METHOD = (
    "a fresh Python process per model, one torch thread: after importing torch and the model's loader and "
    "building the inputs, the resident set is noted and its high-water mark reset (/proc/self/clear_refs); "
    "the model is then loaded from its folder and embeds one batch of batch_size images and one of batch_size "
    "texts under torch.inference_mode(). process_peak_mb: the process's resident-set high-water mark (VmHWM), "
    "framework included; over_baseline_mb: that minus the resident set before loading (weights, activations, "
    "allocator slack and the kernel code the model first touches). Models of the same class and architecture "
    "config (differing only in their weights) share one probe"
)
MB = 2**20
STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class MemoryProbe:
    """How a fresh process rebuilds a model: `loader` ("module:function") is called with `path` and returns
    the model (an object with `encode_image(pixel_values)` and `encode_text(input_ids, attention_mask)`), or
    a tuple whose first item is the model (as `load_dual_encoder_any` returns (model, tokenizer))."""

    path: str
    loader: str = DEFAULT_LOADER


def _status_bytes(key: str) -> Optional[int]:
    """A `kB` field of /proc/self/status in bytes (None where there is no /proc)."""
    if not STATUS.is_file():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak() -> bool:
    """Reset this process's resident-set high-water mark to its current resident set (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    """This process's resident-set high-water mark in bytes (VmHWM, else getrusage's ru_maxrss)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _load_function(loader: str):
    """The function a "module:function" string names."""
    module, _, name = loader.partition(":")
    if not module or not name:
        raise ValueError(f"a memory probe's loader must be 'module:function', got {loader!r}")
    return getattr(importlib.import_module(module), name)


def measure(spec: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """In this process: load the model of `spec` (loader, path) and embed `batch_size` images of
    `image_size` and `batch_size` copies of the text (`input_ids`, `attention_mask`); the resident-set
    high-water mark in MB, and its rise over the resident set before loading (None without /proc)."""
    torch.set_num_threads(1)
    load = _load_function(spec["loader"])
    batch, size = spec["batch_size"], spec["image_size"]
    pixels = image_batch(size, batch)
    input_ids = torch.tensor([spec["input_ids"]] * batch)
    attention_mask = torch.tensor([spec["attention_mask"]] * batch)
    baseline = _status_bytes("VmRSS") if _reset_peak() else None
    loaded = load(spec["path"])
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.inference_mode():
        model.encode_image(pixels)
        model.encode_text(input_ids, attention_mask)
    peak = _peak_bytes()
    return {"process_peak_mb": peak / MB, "over_baseline_mb": None if baseline is None else (peak - baseline) / MB}


def _run_probe(spec: Mapping[str, Any], timeout: float) -> dict[str, Optional[float]]:
    """`measure(spec)` in a fresh interpreter; a failed or timed-out probe raises RuntimeError with the
    last line of the child's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vldistill.profile.memory", json.dumps(dict(spec))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_memory(
    specs: Mapping[str, Mapping[str, Any]],
    parallel: Optional[int] = None,
    timeout: float = 600.0,
    progress: bool = False,
) -> dict[str, Optional[dict[str, Optional[float]]]]:
    """Peak memory of each named model (see `measure` for a spec's keys), each in its own fresh process,
    `parallel` at a time (default: one per CPU core; memory does not depend on the neighbours, only the
    wall time does). A probe that fails is logged as a warning and gives None."""
    if not specs:
        return {}
    workers = max(1, min(parallel or os.cpu_count() or 1, len(specs)))
    results: dict[str, Optional[dict[str, Optional[float]]]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_probe, spec, timeout): name for name, spec in specs.items()}
        for future in tqdm(as_completed(futures), total=len(futures), desc="memory (fresh processes)",
                           unit="model", disable=not progress):
            name = futures[future]
            try:
                results[name] = future.result()
            except RuntimeError as error:
                logger.warning("memory of %s not measured: its probe process failed: %s", name, error)
                results[name] = None
    return {name: results[name] for name in specs}


def probe_spec(probe: MemoryProbe, image_size: int, input_ids: list[int], attention_mask: list[int], batch_size: int) -> dict[str, Any]:
    """The spec `measure` reads: how to load the model and the batch it embeds."""
    return {**asdict(probe), "image_size": image_size, "input_ids": input_ids, "attention_mask": attention_mask,
            "batch_size": batch_size}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
