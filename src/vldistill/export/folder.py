"""The student folder: the Hugging Face model files, the `vldistill.json` run metadata and the model card
`README.md`, written together and atomically; the card is rewritten with the metrics once measured."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from transformers import PreTrainedTokenizerBase

from vldistill.export.model_card import student_card
from vldistill.fileio import atomic_directory, write_text_atomic
from vldistill.models.contract import DualEncoder
from vldistill.models.io import METADATA_FILE, read_metadata, write_metadata
from vldistill.profile.throughput import count_parameters

CARD_FILE = "README.md"


def export_student(
    student: DualEncoder,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | os.PathLike,
    metadata: Mapping[str, Any],
) -> Path:
    """Write `student` as a plain HF folder at `folder`, atomically: model files, `vldistill.json` (the run
    `metadata` plus the student's parameter count) and a model card saying how it was distilled."""
    folder = Path(folder)
    metadata = {**metadata, "params": count_parameters(student)}
    with atomic_directory(folder) as tmp:
        student.save_pretrained(tmp, tokenizer=tokenizer)  # each family writes its own HF files
        metadata["architecture"] = saved_architecture(tmp)
        write_metadata(tmp, metadata)
        (tmp / CARD_FILE).write_text(student_card(metadata, folder.name).content, encoding="utf-8")
    return folder


def saved_architecture(folder: Path) -> Optional[str]:
    """The HF class a saved model folder's config.json names (e.g. CLIPModel), None when it names none."""
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or [None]
    return architectures[0]


def write_card(
    folder: str | os.PathLike,
    metrics: Optional[Mapping[str, Optional[float]]] = None,
    dataset: Optional[str] = None,
    model_name: Optional[str] = None,
) -> Path:
    """Rewrite a saved student's `README.md` atomically from its `vldistill.json`, with `metrics` measured on
    `dataset` (None values left out) as the card's `model-index`; the model is named `model_name` (default:
    the folder's name)."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    if not metadata:
        raise FileNotFoundError(f"{folder / METADATA_FILE}: no run metadata to write a model card from")
    return write_text_atomic(folder / CARD_FILE, student_card(metadata, model_name or folder.name, metrics, dataset).content)
