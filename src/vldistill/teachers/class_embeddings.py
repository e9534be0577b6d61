"""The teacher's text embeddings of class names (prompt-ensembled over templates), computed once and stored beside a
run: what prompt distillation (PromptKD) and region distillation (ViLD) classify against."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from vldistill.data.tokenizer import make_tokenize
from vldistill.distributed import process_rank
from vldistill.eval.zeroshot import zero_shot_classifier
from vldistill.fileio import read_safetensors, write_safetensors_atomic
from vldistill.teachers.cache.meta import state_dict_sha256
from vldistill.trained import TrainedModel

logger = logging.getLogger(__name__)


def stored_class_embeddings(
    teacher: TrainedModel, classnames: list[str], templates: list[str], path: Path, batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(C, D) normalized, prompt-ensembled class-name embeddings of the teacher: read from `path` when it holds
    them for this teacher (same weights), class names and templates, else computed and written there atomically
    (a file written for other ones is replaced, with a warning)."""
    record = {"classnames": classnames, "templates": templates, "teacher": state_dict_sha256(teacher.model)}
    if path.is_file():
        try:
            tensors, metadata = read_safetensors(path)
            stored, meta = tensors["class_embeddings"], json.loads(metadata["record"])
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            raise ValueError(f"{path}: not a readable class-embedding file ({error}); delete it to recompute") from None
        if meta == record:
            logger.info("reusing the teacher's class embeddings in %s", path)
            return stored
        logger.warning("%s holds class embeddings of another teacher, class list or templates: recomputing", path)
    spec = teacher.model.input_spec
    tokenize = make_tokenize(teacher.tokenizer, spec.max_text_length, spec.text_padding)
    embeddings = zero_shot_classifier(teacher.model, tokenize, classnames, templates, batch_size, progress)
    if process_rank()[0] == 0:  # every process computes them alike; one writes
        write_safetensors_atomic(path, {"class_embeddings": embeddings.contiguous()}, {"record": json.dumps(record)})
    return embeddings
