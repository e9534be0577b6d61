"""Quantize a saved student to int8 and ship it only when measured.

- Post-training: `Int8CLIPDualEncoder.from_float` (models/quantized.py) quantizes every Linear layer to int8
  (weights now, activations dynamically per call).
- Quantization-aware training: `prepare_qat` puts `QuantSimLinear` in place of every Linear layer, a float
  layer computing what the int8 kernels will (fake quantization with straight-through gradients), so that a
  fine-tune (train/qat.py: distillation from the teacher through the training loop) learns weights that
  survive rounding; `convert_qat` then quantizes the trained weights.
- `ship_quantized` measures the fp32 model and the int8 candidates side by side (zero-shot acc1, retrieval
  R@1 both ways, image latency at batch 1, throughput, size on disk), and writes the chosen candidate's folder
  only when its acc1 is at most `max_drop` below fp32 (the accuracy gate); otherwise it writes nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.config import EvalConfig
from vldistill.data.bundle import DataBundle
from vldistill.eval.suite import evaluate_model
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.io import read_metadata
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.quantized import Int8CLIPDualEncoder, Int8Recipe
from vldistill.profile.throughput import compare_image_throughput, speedup

logger = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 0.01  # one point of zero-shot top-1 accuracy
LATENCY_TRIALS = 200  # timed batch-1 calls per model (interleaved)
THROUGHPUT_TRIALS = 9
ACTIVATION_LEVELS = 127  # activations are quantized to [0, 127] (the x86 kernels' reduced range)
WEIGHT_HALF_RANGE = 127.5  # symmetric int8 weights: scale = max |w| / 127.5, values clamped to [-128, 127]
EPS = torch.finfo(torch.float32).eps
MEASURED = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")


class QuantSimLinear(nn.Linear):
    """A Linear layer in float that computes what its int8 counterpart (models/quantized.py) will: the input
    rounded per tensor to 128 levels over [min(x, 0), max(x, 0)] of this call, the weight rounded to
    symmetric int8 (one scale per tensor or per output channel), gradients passed straight through the
    rounding. It holds the same `weight` and `bias` parameters as the layer it replaces."""

    def __init__(self, linear: nn.Linear, per_channel: bool) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the int8 kernels see fp32 inputs
            weight = fake_quantize_weight(self.weight, self.per_channel)
            return F.linear(fake_quantize_activation(x.float()), weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain Linear holding this layer's parameters."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded as the int8 kernels quantize an input: asymmetric over [0, 127] with the range of this
    tensor (0 always representable), straight-through gradient."""
    low, high = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
    scale = ((high - low) / ACTIVATION_LEVELS).clamp(min=EPS)
    zero_point = torch.round(-low / scale).clamp(0, ACTIVATION_LEVELS).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, ACTIVATION_LEVELS)


def fake_quantize_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """`weight` rounded to symmetric int8 as the int8 layers store it (scale max |w| / 127.5 per tensor or
    per output row), straight-through gradient."""
    magnitude = weight.detach().abs()
    if per_channel:
        scale = (magnitude.amax(dim=1) / WEIGHT_HALF_RANGE).clamp(min=EPS)
        zeros = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zeros, 0, -128, 127)
    scale = (magnitude.max() / WEIGHT_HALF_RANGE).clamp(min=EPS)
    return torch.fake_quantize_per_tensor_affine(weight, scale, torch.zeros((), dtype=torch.int32), -128, 127)


def _swap_linears(module: nn.Module, make) -> None:
    """Replace, in place, every child of `module` (recursively) that `make(child)` maps to a new module."""
    for name, child in module.named_children():
        new = make(child)
        if new is not None:
            setattr(module, name, new)
        else:
            _swap_linears(child, make)


def prepare_qat(student: CLIPDualEncoder, recipe: Int8Recipe = Int8Recipe()) -> CLIPDualEncoder:
    """A copy of `student` whose Linear layers simulate int8 as `recipe` says (QuantSimLinear), for
    quantization-aware training; `student` is left as it is."""
    prepared = copy.deepcopy(student)
    _swap_linears(prepared.model, lambda m: QuantSimLinear(m, recipe.per_channel) if type(m) is nn.Linear else None)
    return prepared


def convert_qat(student: CLIPDualEncoder, recipe: Int8Recipe = Int8Recipe()) -> Int8CLIPDualEncoder:
    """The int8 model of a student trained with `prepare_qat`: its weights quantized as `recipe` says."""
    plain = copy.deepcopy(student)
    _swap_linears(plain.model, lambda m: m.to_linear() if isinstance(m, QuantSimLinear) else None)
    return Int8CLIPDualEncoder.from_float(plain, recipe)


def load_fp32_student(model_dir: str | os.PathLike) -> tuple[CLIPDualEncoder, PreTrainedTokenizerBase]:
    """The float CLIP student at `model_dir` with its tokenizer; ValueError for another kind of model."""
    model, tokenizer = load_dual_encoder_any(model_dir)
    if isinstance(model, Int8CLIPDualEncoder) or not isinstance(model, CLIPDualEncoder):
        raise ValueError(f"{model_dir} holds a {type(model).__name__}; quantization takes a float CLIP folder")
    return model.eval(), tokenizer


def load_quantized(folder: str | os.PathLike) -> tuple[Int8CLIPDualEncoder, PreTrainedTokenizerBase]:
    """The int8 model and tokenizer of a folder written by `vldistill quantize` (the same loader
    `load_dual_encoder_any` and `vldistill eval` use)."""
    model, tokenizer = load_dual_encoder_any(folder)
    if not isinstance(model, Int8CLIPDualEncoder):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not an int8 model written by vldistill quantize")
    return model, tokenizer


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size of the files under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def measure_models(
    models: Mapping[str, CLIPDualEncoder],
    folders: Mapping[str, Path],
    tokenizer: PreTrainedTokenizerBase,
    data: DataBundle,
    eval_cfg: EvalConfig,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per model: zero-shot acc1 and retrieval R@1 both ways on `data` (see eval.suite.evaluate_model),
    parameters, size on disk of its folder (all files), image-tower latency at batch 1 (median and 95th
    percentile ms) and throughput at `eval_cfg.throughput_batch_size` (images/s). The timings interleave the
    models trial by trial (see profile.throughput.compare_image_throughput); every model after the first
    also gets its latency and throughput speed-up over the first (median of per-trial ratios)."""
    figures: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        evaluation = evaluate_model(model.eval(), tokenizer, data, eval_cfg, name, progress=progress, throughput=False)
        figures[name] = {key: evaluation["summary"][key] for key in MEASURED}
        figures[name]["params"] = model.num_parameters()
        figures[name]["size_bytes"] = folder_bytes(folders[name])
    sizes = {name: model.input_spec.image_size for name, model in models.items()}
    latency = compare_image_throughput(models, sizes, batch_size=1, trials=LATENCY_TRIALS, warmup=10)
    batch = eval_cfg.throughput_batch_size
    throughput = compare_image_throughput(models, sizes, batch_size=batch, trials=THROUGHPUT_TRIALS)
    first = next(iter(models))
    for name in models:
        seconds = sorted(latency[name].seconds)
        figures[name]["latency_ms_p50"] = 1000 * seconds[len(seconds) // 2]
        figures[name]["latency_ms_p95"] = 1000 * seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))]
        figures[name]["images_per_second"] = throughput[name].median
        figures[name]["throughput_batch_size"] = batch
        if name != first:
            figures[name]["latency_speedup"] = speedup(latency[name], latency[first])["median"]
            figures[name]["throughput_speedup"] = speedup(throughput[name], throughput[first])["median"]
    return figures


@dataclass
class QuantizeReport:
    """What `ship_quantized` measured and decided: the figures per model (`fp32` first), which one was the
    `candidate`, its acc1 drop below fp32 against `max_drop`, and where it was written (None: refused)."""

    method: str
    figures: dict[str, dict[str, Any]]
    candidate: str
    max_drop: float
    drop: float
    accepted: bool
    out: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for vldistill.json and JSON output."""
        return {
            "method": self.method, "candidate": self.candidate, "max_drop": self.max_drop, "acc1_drop": self.drop,
            "accepted": self.accepted, "out": str(self.out) if self.out is not None else None, "figures": self.figures,
            "notes": self.notes,
        }

    def format(self) -> str:
        """A fixed-width table of the figures, then the gate's verdict."""
        header = (f"{'model':<10}{'acc1':>8}{'T->I R@1':>10}{'I->T R@1':>10}{'lat b1 ms':>11}{'speed-up':>10}"
                  f"{'img/s':>10}{'size KB':>10}")
        rows = [header]
        for name, m in self.figures.items():
            rows.append(
                f"{name:<10}{m['acc1']:>8.3f}{m['image_retrieval_recall@1']:>10.3f}{m['text_retrieval_recall@1']:>10.3f}"
                f"{m['latency_ms_p50']:>11.3f}{m.get('latency_speedup', 1.0):>9.2f}x{m['images_per_second']:>10,.0f}"
                f"{m['size_bytes'] / 1024:>10,.0f}"
            )
        verdict = (
            f"{self.candidate}: acc1 drop {self.drop * 100:.1f} points from fp32 (allowed: {self.max_drop * 100:.1f}): "
            + ("accepted" if self.accepted else "REFUSED, nothing written")
        )
        return "\n".join([*rows, *self.notes, verdict])


def acc1_drop(figures: Mapping[str, Mapping[str, Any]], candidate: str) -> float:
    """How far `candidate`'s zero-shot acc1 lies below fp32's (negative: above); ValueError when the data
    gave no acc1 (the gate cannot pass a model it did not measure)."""
    base, found = figures["fp32"]["acc1"], figures[candidate]["acc1"]
    if base is None or found is None:
        raise ValueError(
            "the accuracy gate needs zero-shot acc1, but the evaluation data has no classes: "
            "set data.classes (a folder per class) in the config"
        )
    return base - found


def check_paths(model_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Raise ValueError when `out` is the folder of the model being quantized (it would be replaced)."""
    if Path(out).resolve() == Path(model_dir).resolve():
        raise ValueError(f"--out {out} is the model being quantized: choose another folder, the fp32 model is kept")


def check_max_drop(max_drop: float) -> None:
    """Raise ValueError unless `max_drop` (a fraction of acc1; negative: a gain the model must show) lies in
    [-1, 1]."""
    if not -1.0 <= max_drop <= 1.0:
        raise ValueError(f"--max-drop is a share of accuracy in [-1, 1] (0.01 = one point), got {max_drop}")


def ship_quantized(
    fp32: CLIPDualEncoder,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Mapping[str, Int8CLIPDualEncoder],
    candidate: str,
    out: str | os.PathLike,
    data: DataBundle,
    eval_cfg: EvalConfig,
    *,
    method: str,
    metadata: Mapping[str, Any],
    max_drop: float = DEFAULT_MAX_DROP,
    progress: bool = False,
) -> QuantizeReport:
    """Measure `fp32` and the int8 `candidates` together (see `measure_models`; sizes from their folders
    written to a staging folder beside `out`), then write `candidates[candidate]` to `out` with `metadata`
    and the report under `quantization` in its vldistill.json, only when its acc1 is at most `max_drop` below
    fp32's. A refused model leaves `out` untouched."""
    check_max_drop(max_drop)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = {"fp32": fp32, **candidates}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.staging-") as staging:
        folders = {name: model.save_pretrained(Path(staging) / name, tokenizer=tokenizer) for name, model in models.items()}
        figures = measure_models(models, folders, tokenizer, data, eval_cfg, progress)
    drop = acc1_drop(figures, candidate)
    accepted = drop <= max_drop + 1e-9
    notes = [
        f"note: {name} is slower than fp32 at batch 1 ({m['latency_speedup']:.2f}x); int8 pays on wider layers"
        for name, m in figures.items() if m.get("latency_speedup", 1.0) < 1.0
    ]
    report = QuantizeReport(method, figures, candidate, max_drop, drop, accepted, out if accepted else None, notes)
    if accepted:
        recipe = candidates[candidate].recipe
        candidates[candidate].save_pretrained(
            out, {**metadata, "quantization": {**report.as_dict(), "recipe": recipe.as_dict()}}, tokenizer=tokenizer
        )
        logger.info(f"wrote the {candidate} model to {out}")
    return report


def quantize_dynamic_int8(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    data: DataBundle,
    eval_cfg: EvalConfig,
    *,
    recipe: Int8Recipe = Int8Recipe(),
    max_drop: float = DEFAULT_MAX_DROP,
    progress: bool = False,
) -> QuantizeReport:
    """Post-training int8 quantization of the float CLIP student at `model_dir`, measured against it and
    written to `out` only when the accuracy gate passes (see `ship_quantized`)."""
    check_max_drop(max_drop)
    check_paths(model_dir, out)
    fp32, tokenizer = load_fp32_student(model_dir)
    metadata = {**read_metadata(model_dir), "source": str(model_dir)}
    int8 = Int8CLIPDualEncoder.from_float(fp32, recipe)
    return ship_quantized(
        fp32, tokenizer, {"int8": int8}, "int8", out, data, eval_cfg,
        method="dynamic-int8", metadata=metadata, max_drop=max_drop, progress=progress,
    )
