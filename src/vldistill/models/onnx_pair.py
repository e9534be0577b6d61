"""An exported ONNX image/text encoder pair as a vldistill dual encoder, run by onnxruntime: the folder that
`vldistill export MODEL --format onnx` writes (see `vldistill.export.onnx`) loads with
`models.loading.load_dual_encoder_any`, so `vldistill eval DIR` scores the shipped artifact itself.

Folder format:
  onnx_pair.json           {"format": "vldistill-onnx-pair", "version": 1, "precision": "fp32" | "int8",
                           "graphs": {"image": {"file", "inputs", "output"}, "text": {...}}, "opset",
                           "embed_dim", "logit_scale", "logit_bias", "input_spec": {...}, "source": {"model",
                           "model_type", "parameters"}, ...}; it marks the folder
  image_encoder.onnx       pixel_values (batch, 3, H, W) float32 -> image_embeds (batch, D), L2-normalized
  text_encoder.onnx        input_ids, attention_mask (batch, sequence) int64 -> text_embeds (batch, D), L2-normalized
  preprocessor_config.json the Hugging Face image processor of the source model
  tokenizer files          the source model's tokenizer
  int8/                    (optional) the same pair with onnxruntime dynamic-int8 graphs, itself such a folder

onnxruntime is an optional dependency (`pip install 'vldistill[deploy]'`): it is imported when a pair is
loaded, never when this module is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.extras import require
from vldistill.fileio import atomic_directory
from vldistill.models.adapters import register_adapter
from vldistill.models.common import PREPROCESSOR_FILE, load_tokenizer_if_present, text_token_settings_from
from vldistill.models.inputs import InputSpec
from vldistill.models.io import write_metadata
from vldistill.models.locate import ModelNotFoundError, NotAModelError, read_json_object, require_tokenizer
from vldistill.models.signals import Signals

PAIR_FILE = "onnx_pair.json"
PAIR_FORMAT = "vldistill-onnx-pair"
PAIR_VERSION = 1
IMAGE_GRAPH, TEXT_GRAPH = "image_encoder.onnx", "text_encoder.onnx"
IMAGE_INPUTS, TEXT_INPUTS = ("pixel_values",), ("input_ids", "attention_mask")
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embeds", "text_embeds"
INT8_DIR = "int8"
PRECISIONS = ("fp32", "int8")
REQUIRED_KEYS = ("precision", "graphs", "embed_dim", "logit_scale", "logit_bias", "input_spec")


def onnxruntime_module():
    """The onnxruntime module, or a MissingExtraError saying how to install it."""
    return require("onnxruntime", "deploy", "running an exported ONNX pair")


def spec_as_dict(spec: InputSpec) -> dict[str, Any]:
    """An input spec as the JSON object `onnx_pair.json` stores."""
    return {
        "image_size": spec.image_size,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
        "max_text_length": spec.max_text_length,
        "text_padding": spec.text_padding,
    }


def spec_from_dict(data: Any, where: str) -> InputSpec:
    """The input spec stored in `onnx_pair.json` (`where` names the file in errors)."""
    keys = ("image_size", "image_mean", "image_std", "max_text_length", "text_padding")
    if not isinstance(data, dict) or any(key not in data for key in keys):
        raise NotAModelError(f"{where}: input_spec must be an object with {', '.join(keys)}")
    return InputSpec(
        image_size=int(data["image_size"]),
        image_mean=tuple(float(v) for v in data["image_mean"]),
        image_std=tuple(float(v) for v in data["image_std"]),
        max_text_length=int(data["max_text_length"]),
        text_padding=data["text_padding"],
    )


def read_pair_description(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated `onnx_pair.json` of an export folder: format and version this vldistill reads, the
    required keys, a known precision, and both graph files present."""
    folder = Path(folder)
    path = folder / PAIR_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} is not an ONNX export folder: it has no {PAIR_FILE}")
    description = read_json_object(path, "an ONNX pair description")
    found = (description.get("format"), description.get("version"))
    if found != (PAIR_FORMAT, PAIR_VERSION):
        raise NotAModelError(
            f"{path}: format {found[0]!r} version {found[1]!r}, this vldistill reads {PAIR_FORMAT!r} version {PAIR_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in description]
    if missing:
        raise NotAModelError(f"{path} lacks {', '.join(missing)}")
    if description["precision"] not in PRECISIONS:
        raise NotAModelError(f"{path}: precision must be one of {', '.join(PRECISIONS)}, got {description['precision']!r}")
    for tower in ("image", "text"):
        graph = description["graphs"].get(tower) if isinstance(description["graphs"], dict) else None
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
            raise NotAModelError(f"{path}: graphs.{tower}.file is missing")
        if not (folder / graph["file"]).is_file():
            raise ModelNotFoundError(f"{folder} is a damaged ONNX export: {PAIR_FILE} names {graph['file']}, which is missing")
    return description


def session_options(threads: Optional[int] = None):
    """onnxruntime session options running each graph on `threads` intra-op threads (default: as many as
    torch uses, so the two runtimes are compared on the same cores) and one inter-op thread. Its worker
    threads sleep between calls instead of spinning (onnxruntime's default): spinning threads take the cores
    from whatever runs next in the process (a PyTorch model in an interleaved comparison, the teacher of a
    cascade), which made the PyTorch models measured beside an ONNX pair up to 6x slower here."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxDualEncoder(nn.Module):
    """An exported image/text encoder pair run by onnxruntime on CPU, seen through the dual-encoder
    interface: normalized embeddings, input spec, logit scale and bias, for evaluation and inference. It
    has no PyTorch weights and does not train: hidden states and attention maps need the source model.

    folder: an export folder (see the module docstring). tokenizer: its tokenizer (default: the folder's).
    threads: onnxruntime intra-op threads (default: torch's thread count).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        threads: Optional[int] = None,
    ) -> None:
        super().__init__()
        ort = onnxruntime_module()
        self.folder = Path(folder)
        self.description = read_pair_description(self.folder)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_if_present(self.folder)
        self._input_spec = spec_from_dict(self.description["input_spec"], str(self.folder / PAIR_FILE))
        options = session_options(threads)
        self.sessions = {
            tower: ort.InferenceSession(
                str(self.folder / self.description["graphs"][tower]["file"]), options, providers=["CPUExecutionProvider"]
            )
            for tower in ("image", "text")
        }
        self.text_inputs = tuple(node.name for node in self.sessions["text"].get_inputs())

    def __repr__(self) -> str:
        return f"OnnxDualEncoder({str(self.folder)!r}, precision={self.precision!r})"

    @property
    def precision(self) -> str:
        """"fp32" or "int8": the graphs' weights."""
        return self.description["precision"]

    @property
    def input_spec(self) -> InputSpec:
        """Image size and normalization, text length and padding of the source model."""
        return self._input_spec

    @property
    def embed_dim(self) -> int:
        """Size of the shared image-text embedding space."""
        return int(self.description["embed_dim"])

    @property
    def logit_scale(self) -> torch.Tensor:
        """The source model's exponentiated temperature (a scalar)."""
        return torch.tensor(float(self.description["logit_scale"]))

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        """The source model's logit bias (SigLIP), None when it has none."""
        bias = self.description["logit_bias"]
        return None if bias is None else torch.tensor(float(bias))

    def num_parameters(self) -> int:
        """The source model's parameter count (the graphs hold the same weights, int8 or fp32)."""
        return int(self.description.get("source", {}).get("parameters") or 0)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D) from the image graph."""
        pixels = np.ascontiguousarray(pixel_values.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.sessions["image"].run(None, {IMAGE_INPUTS[0]: pixels})[0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, D) from the text graph (an absent mask means every token is real)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        feed = {name: np.ascontiguousarray(given[name].detach().cpu().numpy(), dtype=np.int64) for name in self.text_inputs}
        return torch.from_numpy(self.sessions["text"].run(None, feed)[0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Embeddings of paired images and texts with the logit scale (and bias); hidden states and attention
        maps cannot be asked of an exported pair."""
        if output_hidden_states or output_attentions:
            raise ValueError(
                f"{self.folder} is an exported ONNX pair: it returns embeddings only; hidden states and attention "
                f"maps need the PyTorch model it was exported from ({self.description.get('source', {}).get('model')})"
            )
        return Signals(
            image_embeds=self.encode_image(pixel_values),
            text_embeds=self.encode_text(input_ids, attention_mask),
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            text_attention_mask=attention_mask,
        )

    def clamp_logit_scale(self) -> None:
        """Nothing to clamp: the exported temperature is fixed."""

    def text_token_settings(self) -> dict[str, Any]:
        """Vocabulary size, special token ids and text length a CLIP student reading this pair's tokenizer uses."""
        return text_token_settings_from(self.tokenizer, self.input_spec.max_text_length, owner="OnnxDualEncoder")

    def architecture_spec(self) -> None:
        """None: the layer-wise losses need a PyTorch CLIP."""
        return None

    def inheritable_clip(self) -> None:
        """None: an ONNX pair has no weights a student can inherit."""
        return None

    def architecture_config(self) -> dict[str, Any]:
        """What the pair computes, as JSON data: precision, graphs, embedding size, logit scale and bias,
        input spec and opset (not how it was checked or measured)."""
        keys = ("format", "version", "precision", "graphs", "opset", "embed_dim", "logit_scale", "logit_bias", "input_spec")
        return {key: self.description.get(key) for key in keys}

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Copy this pair (its description, both graphs and any external weight files beside them, the image
        processor config) to `out_dir` atomically, with `tokenizer` (default: its own) and the run metadata
        `vldistill.json` when given; the int8 sub-folder of an fp32 export is not copied."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        graphs = [self.description["graphs"][tower]["file"] for tower in ("image", "text")]
        files = [PAIR_FILE, PREPROCESSOR_FILE, *graphs, *(f"{graph}.data" for graph in graphs)]
        with atomic_directory(out_dir) as tmp:
            for name in files:
                if (self.folder / name).is_file():
                    shutil.copy2(self.folder / name, tmp / name)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if metadata is not None:
                write_metadata(tmp, metadata)
        return Path(out_dir)


@register_adapter("onnx", f"a vldistill ONNX export folder: {PAIR_FILE}", marker=PAIR_FILE)
def load_onnx_pair(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[OnnxDualEncoder, PreTrainedTokenizerBase]:
    """An export folder as an OnnxDualEncoder run by onnxruntime, with its tokenizer. Attention maps cannot be
    asked of it; `trust_remote_code` is not used."""
    if attentions:
        raise ValueError(f"{name_or_path} is an exported ONNX pair: it computes no attention maps")
    model = OnnxDualEncoder(name_or_path)
    return model, require_tokenizer(model.tokenizer, name_or_path)


def write_pair_description(folder: str | os.PathLike, description: dict[str, Any]) -> Path:
    """Write `description` as the `onnx_pair.json` of a folder being assembled."""
    path = Path(folder) / PAIR_FILE
    path.write_text(json.dumps({"format": PAIR_FORMAT, "version": PAIR_VERSION, **description}, indent=2) + "\n")
    return path
