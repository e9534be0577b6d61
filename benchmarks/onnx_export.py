"""ONNX export of one model folder against the PyTorch model: export the fp32 pair and its onnxruntime
dynamic-int8 pair (no accuracy gate: every variant is measured), then print ONE JSON line:

    {"model", "variants", "threads", "onnxruntime", "export_seconds", "max_abs_diff", "size_bytes", "accuracy",
     "latency_ms", "items_per_second", "speedup", "settings", "data"}

Variants: "pytorch" (under torch.inference_mode()), "onnx-fp32" and "onnx-int8" (onnxruntime on CPU with as many
intra-op threads as torch), all called through the same encode_image / encode_text interface.
- max_abs_diff: each ONNX variant's embeddings against PyTorch's, per tower, on the export check's inputs
  (3 random images, 3 texts at the full text length).
- size_bytes: the weight files (model.safetensors for PyTorch; the two graphs for ONNX).
- accuracy: zero-shot acc1 and retrieval R@1 both ways on the test data (`--config`/`--set`, default the demo's
  shapes), rendered at the model's image size, as `vldistill eval` measures them.
- latency_ms: per tower ("image": one test image, "text": one caption), p50 / p95 over every single-item call.
- items_per_second: per tower, batches of --batch-size test images / captions (padded to their longest):
  median trial and p25 / p75.
- speedup: each ONNX variant against PyTorch per tower: latency (ratio of p50s) and throughput (median of the
  per-round ratios of batch times).
Every round calls every variant on every tower in turn (the order rotates from round to round), its single
items back to back, then one batch, so that a change of machine load touches the variants alike (and another
runtime's worker threads, spinning for a moment after its last call, touch at most the first single call).
Run it alone on the machine. Everything but the JSON line goes to stderr.

    python benchmarks/onnx_export.py demo_out/student
    python benchmarks/onnx_export.py demo_out/student --rounds 15 --latency-calls 20 --threads 1
    python benchmarks/onnx_export.py --tiny        # a tiny CLIP built here, 2 rounds (CI, seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import CLIPModel

from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import DataBundle, load_data
from vldistill.data.grammar import vocabulary
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.export.onnx import CHECK_BATCH, export_onnx, max_abs_differences, text_lengths, write_int8_pair
from vldistill.models import CLIPDualEncoder, clip_config_from_spec
from vldistill.models.loading import load_dual_encoder_any, model_type_of
from vldistill.models.onnx_pair import IMAGE_GRAPH, TEXT_GRAPH, OnnxDualEncoder, onnxruntime_module
from vldistill.profile.throughput import quartiles

VARIANTS = ("pytorch", "onnx-fp32", "onnx-int8")
TOWERS = ("image", "text")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model folder (any supported PyTorch dual encoder)")
    parser.add_argument("--tiny", action="store_true", help="a tiny CLIP built here on the tiny config's data")
    parser.add_argument("--config", default=None, help="experiment YAML whose data is evaluated (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, help="throughput batch (default 32)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9; 2 with --tiny)")
    parser.add_argument("--latency-calls", type=int, default=None,
                        help="single-item calls per variant, tower and round (default 10; 3 with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    args = parser.parse_args(argv)
    if bool(args.model) == args.tiny:
        parser.error("give a model folder, or --tiny (not both)")
    if args.tiny and args.config is None:
        args.config = str(packaged_config("tiny"))
    return args


def save_tiny_model(folder: Path) -> Path:
    """The tiny config's student architecture with seeded random weights, saved as a CLIP folder."""
    cfg = load_config(packaged_config("tiny"))
    tokenizer = build_word_tokenizer(vocabulary(), max_length=32)
    config = clip_config_from_spec(
        cfg.student.model, image_size=cfg.data.image_size, vocab_size=len(tokenizer), max_text_length=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return CLIPDualEncoder(CLIPModel(config)).save_pretrained(folder, tokenizer=tokenizer)


def weight_bytes(folder: Path, names: tuple[str, ...]) -> int:
    """Bytes of the files `names` in `folder` (and any external weights `name`.data beside them)."""
    files = [folder / file for name in names for file in (name, f"{name}.data")]
    return sum(path.stat().st_size for path in files if path.is_file())


def inputs(model, tokenizer, data: DataBundle, batch_size: int) -> dict[str, dict[str, tuple]]:
    """Per tower, the (args) of one single-item call and of one batch call, from the test split."""
    spec = model.input_spec
    tokenize = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)
    images = to_pixel_values(data.test.images[:batch_size], spec.image_mean, spec.image_std)
    captions = list(data.test.captions[:batch_size])
    one, many = tokenize(captions[:1]), tokenize(captions)
    return {
        "image": {"single": (images[:1],), "batch": (images,)},
        "text": {"single": (one["input_ids"], one["attention_mask"]), "batch": (many["input_ids"], many["attention_mask"])},
    }


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@torch.inference_mode()
def measure(models: dict, feeds: dict, rounds: int, latency_calls: int, batch_size: int) -> dict:
    """Interleaved timing of every variant on every tower: single-item call seconds and batch seconds per round."""
    encode = {"image": lambda model: model.encode_image, "text": lambda model: model.encode_text}
    for model in models.values():
        for tower in TOWERS:
            for kind in ("single", "batch"):
                for _ in range(2):  # warm-up: first calls allocate
                    encode[tower](model)(*feeds[tower][kind])
    single = {name: {tower: [] for tower in TOWERS} for name in models}
    batch = {name: {tower: [] for tower in TOWERS} for name in models}
    names = list(models)
    gc.collect()
    gc.disable()
    try:
        for round_index in range(rounds):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for tower in TOWERS:
                for name in order:
                    run = encode[tower](models[name])
                    one, many = feeds[tower]["single"], feeds[tower]["batch"]
                    for _ in range(latency_calls):
                        single[name][tower].append(timed(lambda run=run, one=one: run(*one)))
                    batch[name][tower].append(timed(lambda run=run, many=many: run(*many)))
    finally:
        gc.enable()
    return {"single": single, "batch": batch}


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (linear interpolation; the value itself for one value)."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(times: dict, batch_size: int) -> dict:
    """Latency p50/p95 (ms), items/s (median, p25, p75) and speed-ups against PyTorch from `measure`'s seconds."""
    latency = {name: {tower: {"p50": 1e3 * statistics.median(seconds), "p95": 1e3 * percentile(seconds, 95)}
                      for tower, seconds in towers.items()} for name, towers in times["single"].items()}
    rate = {}
    for name, towers in times["batch"].items():
        rate[name] = {}
        for tower, seconds in towers.items():
            low, high = quartiles(seconds)
            rate[name][tower] = {"median": batch_size / statistics.median(seconds), "p25": batch_size / high,
                                 "p75": batch_size / low}
    speedup = {
        name: {tower: {
            "latency": latency["pytorch"][tower]["p50"] / latency[name][tower]["p50"],
            "throughput": statistics.median(
                [base / other for base, other in zip(times["batch"]["pytorch"][tower], times["batch"][name][tower])]
            ),
        } for tower in TOWERS}
        for name in times["batch"] if name != "pytorch"
    }
    return {"latency_ms": latency, "items_per_second": rate, "speedup": speedup}


def main(argv: Optional[list[str]] = None) -> None:
    """Export, measure and print the JSON line."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.tiny else 9)
    latency_calls = args.latency_calls or (3 if args.tiny else 10)
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        source = save_tiny_model(work / "model") if args.tiny else Path(args.model)
        model, tokenizer = load_dual_encoder_any(source)
        model.eval()
        start = time.perf_counter()
        export_onnx(model, tokenizer, work / "onnx-fp32", source=source, model_type=model_type_of(source))
        export_seconds = time.perf_counter() - start
        (work / "onnx-int8").mkdir()
        write_int8_pair(work / "onnx-fp32", work / "onnx-int8")
        models = {"pytorch": model, **{name: OnnxDualEncoder(work / name) for name in VARIANTS[1:]}}
        _, length = text_lengths(model.input_spec)
        max_abs_diff = {name: max_abs_differences(model, models[name], tokenizer, CHECK_BATCH, length)
                        for name in VARIANTS[1:]}
        sizes = {"pytorch": weight_bytes(source, ("model.safetensors", "heads.safetensors")),
                 **{name: weight_bytes(work / name, (IMAGE_GRAPH, TEXT_GRAPH)) for name in VARIANTS[1:]}}
        data = load_data(dataclasses.replace(cfg.data, image_size=model.input_spec.image_size), progress=False)
        accuracy = {}
        for name, variant in models.items():
            summary = evaluate_model(variant, tokenizer, data, cfg.eval, name, progress=False, throughput=False)["summary"]
            accuracy[name] = {key: summary[key] for key in SUMMARY_KEYS}
            print(f"{name}: {accuracy[name]}", file=sys.stderr)
        feeds = inputs(model, tokenizer, data, args.batch_size)
        figures = summarize(measure(models, feeds, rounds, latency_calls, args.batch_size), args.batch_size)
    print(json.dumps({
        "model": "tiny" if args.tiny else str(source),
        "variants": list(VARIANTS),
        "threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime_module().__version__,
        "export_seconds": export_seconds,
        "max_abs_diff": max_abs_diff,
        "size_bytes": sizes,
        "accuracy": accuracy,
        **figures,
        "settings": {"rounds": rounds, "latency_calls": latency_calls, "batch_size": args.batch_size,
                     "text_padding": model.input_spec.text_padding},
        "data": data.name,
    }))


if __name__ == "__main__":
    main()
