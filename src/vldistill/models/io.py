"""Save and load dual encoders as plain Hugging Face folders, written atomically.

A saved folder holds `config.json`, `model.safetensors`, the tokenizer files, `preprocessor_config.json`
and, when given, a `vldistill.json` of run metadata (a student's whole folder, with its model card, is
written by `vldistill.export`). It loads with
`transformers.CLIPModel.from_pretrained(dir)` without vldistill installed, and with
`vldistill.models.loading.load_dual_encoder_any` (which loads every supported family).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vldistill.fileio import atomic_directory
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD

METADATA_FILE = "vldistill.json"


def image_processor_for(image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> CLIPImageProcessorPil:
    """The CLIP image processor that reproduces our preprocessing (resize, crop, normalization)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )


def save_dual_encoder(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    *,
    metadata: Optional[dict[str, Any]] = None,
) -> Path:
    """Write `model` (a CLIPDualEncoder) with its tokenizer and image processor as an HF folder at
    `out_dir`, atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_dual_encoder(model, tokenizer, tmp)
        if metadata is not None:
            write_metadata(tmp, metadata)
    return out_dir


def write_dual_encoder(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Write the HF files of `model` (a CLIPDualEncoder: config, weights, tokenizer, image processor) into a
    folder being assembled."""
    model.model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    spec = model.input_spec
    image_processor_for(spec.image_size, spec.image_mean, spec.image_std).save_pretrained(folder)


def write_metadata(folder: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write the run metadata `vldistill.json` into a model folder being assembled."""
    (Path(folder) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `vldistill.json` run metadata of a saved model, or {} when it has none."""
    path = Path(model_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
