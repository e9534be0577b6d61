"""Export a dual encoder as an ONNX image/text encoder pair (the folder `models.onnx_pair` describes and loads),
checked against PyTorch, optionally with onnxruntime dynamic-int8 graphs that must keep zero-shot accuracy.

The graphs are written by `torch.onnx.export(..., dynamo=True)`, the exporter built on `torch.export`. The
legacy TorchScript exporter (`dynamo=False`) also exports tiny CLIP, SigLIP and two-tower models here, to the
same 1e-7 agreement and much faster (0.3-0.5 s against 8-13 s per model, both towers, on a shared machine);
it is not used because it is deprecated since torch 2.9 and records the one path it traced: a Python
condition on a shape inside transformers (the mask's padding length, SDPA's `is_causal`) becomes a constant
it only warns about. `torch.export` traces the shapes symbolically and refuses an export that would not hold
over the declared range (batch >= 1, text length 1..max_text_length). The exporter's per-node metadata (stack
traces with the exporting machine's file paths) is stripped: it doubled a small graph's file and is nothing a
user needs.

Both graphs output L2-normalized embeddings; the batch is dynamic in both and the text length in the text
graph, whose inputs are always (input_ids, attention_mask) (SigLIP's graph takes the mask and ignores it, as its
PyTorch model does). Each export is checked in onnxruntime against PyTorch at a batch size and a text length
other than the export's; a difference above `tolerance` (1e-4, fp32) refuses the export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.config import EvalConfig
from vldistill.data.bundle import DataBundle
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.extras import require
from vldistill.fileio import atomic_directory, write_text_atomic
from vldistill.models.common import PREPROCESSOR_FILE, load_tokenizer_if_present
from vldistill.models.contract import DualEncoder
from vldistill.models.inputs import InputSpec
from vldistill.models.io import image_processor_for
from vldistill.models.onnx_pair import (
    IMAGE_GRAPH,
    IMAGE_INPUTS,
    IMAGE_OUTPUT,
    INT8_DIR,
    PAIR_FILE,
    TEXT_GRAPH,
    TEXT_INPUTS,
    TEXT_OUTPUT,
    OnnxDualEncoder,
    onnxruntime_module,
    read_pair_description,
    spec_as_dict,
    write_pair_description,
)
from vldistill.profile.throughput import count_parameters

logger = logging.getLogger(__name__)

EXPORT_BATCH = 2  # the example batch the graphs are traced with
CHECK_BATCH = 3  # the batch they are checked at (another size: the batch axis must really be dynamic)
TOLERANCE = 1e-4  # largest max-abs difference of fp32 embeddings between onnxruntime and PyTorch
EXPORTER = "torch.onnx.export(dynamo=True)"
INT8_QUANTIZATION = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weights": "int8, one scale per tensor",
    "activations": "uint8, per tensor, from each call's range",
}
# Texts the example and check batches are tokenized from (any text works: the graphs take token ids).
EXAMPLE_TEXTS = (
    "a photo of a small red circle on the left",
    "two large blue squares",
    "a green triangle above a yellow star in the middle of the picture",
    "a dog",
)


class ExportMismatchError(ValueError):
    """An exported graph computes other embeddings than the PyTorch model (beyond the tolerance)."""


class Int8RefusedError(ValueError):
    """The int8 graphs lose more zero-shot accuracy than allowed; the message gives both figures."""


def export_modules() -> None:
    """Check that the libraries `torch.onnx.export(dynamo=True)` needs (onnx, onnxscript) are installed."""
    for module in ("onnx", "onnxscript"):
        require(module, "deploy", "ONNX export")


class ImageEncoder(nn.Module):
    """The image tower of a dual encoder as a module of its own: pixel_values -> normalized embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D)."""
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """The text tower of a dual encoder as a module of its own: (input_ids, attention_mask) -> normalized
    embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalized text embeddings (B, D)."""
        return self.model.encode_text(input_ids, attention_mask)


def text_lengths(spec: InputSpec) -> tuple[int, int]:
    """(export length, check length): the graphs are traced on short texts and checked at the full length
    (`max_text_length`, how SigLIP pads), two different lengths whenever the model takes more than 2 tokens."""
    longest = spec.max_text_length
    return max(2, min(8, longest - 1)), longest


def example_images(spec: InputSpec, batch: int, seed: int = 0) -> torch.Tensor:
    """`batch` random normalized images of the model's size (seeded)."""
    return torch.randn(batch, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(seed))


def example_tokens(tokenizer: PreTrainedTokenizerBase, batch: int, length: int) -> dict[str, torch.Tensor]:
    """`batch` texts tokenized and padded (or truncated) to exactly `length` tokens, as int64."""
    texts = [EXAMPLE_TEXTS[i % len(EXAMPLE_TEXTS)] for i in range(batch)]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {name: encoded[name].to(torch.int64) for name in TEXT_INPUTS}


def strip_node_metadata(program) -> None:
    """Remove the exporter's per-node metadata (stack traces, FX node names) from an ONNXProgram in place."""
    graphs = [program.model.graph, *program.model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            node.metadata_props.clear()
            node.doc_string = None


def export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, ...], output: str,
    dynamic_shapes: dict[str, dict[int, Any]], what: str,
) -> int:
    """Export `module` called on `args` to the ONNX file `path` (dynamo exporter, metadata stripped; weights
    beyond 2 GB go to `path`.data); returns the graph's opset. A failure of the exporter is one ValueError line
    naming `what`."""
    try:
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=list(input_names), output_names=[output],
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    except Exception as error:  # the exporter raises many kinds; the user needs which tower and why
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"could not export {what} to ONNX ({type(error).__name__}: {first})") from error
    strip_node_metadata(program)
    program.save(path, external_data=False)
    return program.model.opset_imports[""]


def export_graphs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> dict[str, Any]:
    """Write `image_encoder.onnx` and `text_encoder.onnx` of `model` into `folder`; returns the opset and the
    example batch size and text length they were traced with."""
    spec = model.input_spec
    export_length, _ = text_lengths(spec)
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=spec.max_text_length)
    tokens = example_tokens(tokenizer, EXPORT_BATCH, export_length)
    with torch.no_grad():
        opset = export_graph(
            ImageEncoder(model).eval(), (example_images(spec, EXPORT_BATCH),), folder / IMAGE_GRAPH, IMAGE_INPUTS,
            IMAGE_OUTPUT, {"pixel_values": {0: batch}}, "the image tower",
        )
        export_graph(
            TextEncoder(model).eval(), tuple(tokens[name] for name in TEXT_INPUTS), folder / TEXT_GRAPH, TEXT_INPUTS,
            TEXT_OUTPUT, {name: {0: batch, 1: sequence} for name in TEXT_INPUTS}, "the text tower",
        )
    return {"opset": opset, "batch_size": EXPORT_BATCH, "text_length": export_length}


@torch.inference_mode()
def max_abs_differences(
    reference: DualEncoder, pair: OnnxDualEncoder, tokenizer: PreTrainedTokenizerBase, batch: int, length: int
) -> dict[str, float]:
    """The largest absolute difference between the embeddings of `reference` and of the ONNX `pair`, per graph
    ("image", "text"), on `batch` random images and `batch` texts padded to `length` tokens."""
    images = example_images(pair.input_spec, batch, seed=1)
    tokens = example_tokens(tokenizer, batch, length)
    image = (reference.encode_image(images) - pair.encode_image(images)).abs().max()
    text = (reference.encode_text(**tokens) - pair.encode_text(**tokens)).abs().max()
    return {"image": float(image), "text": float(text)}


def write_preprocessing(folder: Path, spec: InputSpec, source: Optional[str | os.PathLike]) -> None:
    """The source model folder's `preprocessor_config.json`, or a CLIP image processor config reproducing the
    input spec's size and normalization when the source has none."""
    original = Path(source) / PREPROCESSOR_FILE if source is not None else None
    if original is not None and original.is_file():
        shutil.copy2(original, folder / PREPROCESSOR_FILE)
    else:
        image_processor_for(spec.image_size, spec.image_mean, spec.image_std).save_pretrained(folder)


def check_pair(model: DualEncoder, folder: Path, tokenizer: PreTrainedTokenizerBase, tolerance: float) -> dict[str, Any]:
    """Run the pair in `folder` in onnxruntime against `model` at `CHECK_BATCH` images and texts of the full
    length; raise ExportMismatchError naming each graph whose max abs difference exceeds `tolerance`."""
    _, length = text_lengths(model.input_spec)
    differences = max_abs_differences(model, OnnxDualEncoder(folder, tokenizer), tokenizer, CHECK_BATCH, length)
    wrong = {tower: diff for tower, diff in differences.items() if not diff <= tolerance}
    if wrong:
        graphs = {"image": IMAGE_GRAPH, "text": TEXT_GRAPH}
        found = "; ".join(
            f"{graphs[tower]} differs from PyTorch by {diff:.3g} (max abs) at batch {CHECK_BATCH}"
            + (f", text length {length}" if tower == "text" else "")
            for tower, diff in wrong.items()
        )
        raise ExportMismatchError(f"ONNX export refused, above the tolerance {tolerance:g}: {found}")
    return {"batch_size": CHECK_BATCH, "text_length": length, "tolerance": tolerance,
            "max_abs_diff": differences, "onnxruntime": onnxruntime_module().__version__}


def export_onnx(
    model: DualEncoder,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    *,
    source: Optional[str | os.PathLike] = None,
    model_type: Optional[str] = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export `model` (any PyTorch dual encoder) as an fp32 ONNX pair at `out_dir`, atomically: both graphs, the
    tokenizer, the image processor config (`source`'s when it is a folder holding one) and `onnx_pair.json`
    naming `source` and `model_type`. The pair is checked in onnxruntime first (see `check_pair`); a mismatch
    raises ExportMismatchError and leaves `out_dir` as it was. Returns the description written."""
    export_modules()
    if isinstance(model, OnnxDualEncoder):
        raise ValueError(f"{model.folder} is already an ONNX export: export its source model instead")
    training = model.training
    model.eval()
    try:
        with atomic_directory(out_dir) as tmp:
            traced = export_graphs(model, tokenizer, tmp)
            tokenizer.save_pretrained(tmp)
            write_preprocessing(tmp, model.input_spec, source)
            description = {
                "precision": "fp32",
                "graphs": {
                    "image": {"file": IMAGE_GRAPH, "inputs": list(IMAGE_INPUTS), "output": IMAGE_OUTPUT},
                    "text": {"file": TEXT_GRAPH, "inputs": list(TEXT_INPUTS), "output": TEXT_OUTPUT},
                },
                "opset": traced.pop("opset"),
                "embed_dim": model.embed_dim,
                "logit_scale": float(model.logit_scale.detach()),
                "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
                "input_spec": spec_as_dict(model.input_spec),
                "source": {
                    "model": None if source is None else str(source),
                    "model_type": model_type,
                    "parameters": count_parameters(model),
                },
                "exporter": {"name": EXPORTER, "torch": torch.__version__, "traced_with": traced},
            }
            write_pair_description(tmp, description)
            description["check"] = check_pair(model, tmp, tokenizer, tolerance)
            write_pair_description(tmp, description)
    finally:
        model.train(training)
    logger.info(
        "exported %s to %s (opset %d): max abs diff vs PyTorch %.2g (image), %.2g (text)", source or "the model",
        out_dir, description["opset"], description["check"]["max_abs_diff"]["image"],
        description["check"]["max_abs_diff"]["text"],
    )
    return read_pair_description(out_dir)


def quantize_graph(source: Path, target: Path) -> None:
    """Write the onnxruntime dynamic-int8 version of the graph `source` to `target`: onnxruntime's
    pre-processing (graph optimization and ONNX shape inference; its symbolic shape inference fails on the
    dynamo exporter's graphs, so it is skipped), then `quantize_dynamic` with int8 weights (one scale per
    tensor) and activations quantized to uint8 from each call's range."""
    quantization = require("onnxruntime.quantization", "deploy", "int8 ONNX graphs")
    shape_inference = require("onnxruntime.quantization.shape_inference", "deploy", "int8 ONNX graphs")
    large = Path(f"{source}.data").is_file()
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / source.name
        shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, save_as_external_data=large)
        quantization.quantize_dynamic(
            prepared, target, weight_type=quantization.QuantType.QInt8, use_external_data_format=large
        )


def zero_shot_figures(
    model: DualEncoder, tokenizer: PreTrainedTokenizerBase, data: DataBundle, cfg: EvalConfig, name: str, progress: bool
) -> dict[str, Optional[float]]:
    """acc1 and retrieval R@1 both ways of `model` on `data`, as `vldistill eval` measures them."""
    summary = evaluate_model(model, tokenizer, data, cfg, name, progress=progress, throughput=False)["summary"]
    return {key: summary[key] for key in SUMMARY_KEYS}


def update_pair_description(folder: Path, **changes: Any) -> dict[str, Any]:
    """Rewrite an export folder's `onnx_pair.json` atomically with `changes`."""
    description = {**read_pair_description(folder), **changes}
    write_text_atomic(folder / PAIR_FILE, json.dumps(description, indent=2) + "\n")
    return description


def write_int8_pair(folder: Path, target: Path) -> dict[str, Any]:
    """Write the onnxruntime dynamic-int8 version of the fp32 export in `folder` into `target` (a folder being
    assembled): both graphs quantized (see `quantize_graph`), the tokenizer and the image processor config, and
    its description (precision int8, how it was quantized). Returns that description."""
    description = read_pair_description(folder)
    if description["precision"] != "fp32":
        raise ValueError(f"{folder} holds {description['precision']} graphs: int8 graphs are made from an fp32 export")
    for graph in (IMAGE_GRAPH, TEXT_GRAPH):
        quantize_graph(folder / graph, target / graph)
    load_tokenizer_if_present(folder).save_pretrained(target)
    shutil.copy2(folder / PREPROCESSOR_FILE, target / PREPROCESSOR_FILE)
    dropped = ("format", "version", "check", "int8")
    int8 = {
        **{key: value for key, value in description.items() if key not in dropped},
        "precision": "int8",
        "quantization": INT8_QUANTIZATION,
    }
    write_pair_description(target, int8)
    return int8


def add_int8(
    folder: str | os.PathLike,
    data: DataBundle,
    cfg: EvalConfig,
    max_drop: float = 0.01,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize the fp32 pair in `folder` to onnxruntime dynamic int8 and keep it, as `folder`/int8 (an export
    folder itself), only if its zero-shot acc1 on `data` is at most `max_drop` below the fp32 pair's (0.01 = 1
    point). Returns the gate's figures, which both descriptions record; a refusal raises Int8RefusedError with
    both accuracies, removes any `folder`/int8 and records the refusal in the fp32 description."""
    folder = Path(folder)
    if data.zeroshot is None:
        raise ValueError(
            f"the int8 gate compares zero-shot acc1, but {data.name} has no zero-shot classes: set data.classes"
        )
    fp32 = OnnxDualEncoder(folder)
    tokenizer = fp32.tokenizer
    int8_dir = folder / INT8_DIR
    try:
        with atomic_directory(int8_dir) as tmp:
            description = write_int8_pair(folder, tmp)
            int8 = OnnxDualEncoder(tmp, tokenizer)
            figures = {
                precision: zero_shot_figures(pair, tokenizer, data, cfg, f"onnx-{precision}", progress)
                for precision, pair in (("fp32", fp32), ("int8", int8))
            }
            drop = figures["fp32"]["acc1"] - figures["int8"]["acc1"]
            _, length = text_lengths(fp32.input_spec)
            gate = {
                "data": data.name, "metric": "acc1", **figures, "acc1_drop": drop, "max_drop": max_drop,
                "accepted": drop <= max_drop,
                "max_abs_diff_vs_fp32": max_abs_differences(fp32, int8, tokenizer, CHECK_BATCH, length),
            }
            if not gate["accepted"]:
                raise Int8RefusedError(
                    f"int8 ONNX graphs refused: zero-shot acc1 on {data.name} is {figures['int8']['acc1']:.4f} (int8) "
                    f"against {figures['fp32']['acc1']:.4f} (fp32), a drop of {drop:.4f} > the allowed {max_drop:g} "
                    f"(--max-drop); {folder} keeps the fp32 pair only"
                )
            write_pair_description(tmp, {**description, "accuracy": gate})
    except Int8RefusedError:
        shutil.rmtree(int8_dir, ignore_errors=True)
        update_pair_description(folder, int8={"folder": None, **gate})
        raise
    update_pair_description(folder, int8={"folder": INT8_DIR, **gate})
    logger.info(
        "int8 ONNX pair kept at %s: acc1 %.4f (int8) against %.4f (fp32) on %s", int8_dir, figures["int8"]["acc1"],
        figures["fp32"]["acc1"], data.name,
    )
    return gate
