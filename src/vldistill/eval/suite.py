"""Evaluate one dual encoder on a data bundle's test split: zero-shot classification, retrieval,
size and image throughput; results as CLIP_benchmark-style records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.config import EvalConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.eval.results import make_result, write_result
from vldistill.eval.retrieval import evaluate_retrieval
from vldistill.eval.zeroshot import classification_metrics, per_class_accuracy, unreported_note, zero_shot_logits
from vldistill.models.inputs import InputSpec
from vldistill.profile.throughput import count_parameters, images_per_second

SUMMARY_KEYS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
TOP_K = (1, 5)  # zero-shot accuracies computed (acc5 only with more than 5 classes)


def pixel_batches(images: np.ndarray, spec: InputSpec, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 images (N, H, W, 3) as the model's normalized pixel values, `batch_size` images at a time
    (a whole benchmark split as float32 would take 4x the memory of its bytes)."""
    for start in range(0, len(images), batch_size):
        yield to_pixel_values(images[start : start + batch_size], spec.image_mean, spec.image_std)


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: DataBundle,
    cfg: EvalConfig,
    model_name: str,
    results_dir: Optional[Path] = None,
    progress: bool = True,
    throughput: bool = True,
) -> dict:
    """Zero-shot and retrieval records for `model` (any loaded dual encoder: CLIP, SigLIP, two-tower) on
    `data.test`, plus a flat summary of key figures.

    Retrieval runs over the test split's distinct images and all their captions (see
    `retrieval_metrics`): a text hits when its image is among the top K, an image when any of its
    captions is. A hit needs the paired item (`cfg.retrieval_match="pair"`, as CLIP_benchmark
    scores), or also any item with an identical caption (`"identical_caption"`, for templated captions).
    Zero-shot classification runs on `data.zeroshot` when the data has one (else `acc1` is None);
    acc5 only with more than 5 classes (the record's `note` says when it is left out); the record's `per_class`
    lists each class's samples and top-1 accuracy (`per_class_accuracy`). Images and
    texts are prepared as the model's `input_spec` says. Records are written to
    `results_dir/{model_name}_{task}.json` when given. The summary's `images_per_second` is measured
    only with `throughput` (callers comparing several models measure them together instead, see
    profile.throughput.compare_image_throughput).
    """
    spec = model.input_spec
    tokenize = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)
    test = data.test
    retrieval = evaluate_retrieval(
        model, tokenize, pixel_batches(test.images, spec, cfg.batch_size), texts=test.captions,
        text_to_image=test.caption_images(), match=cfg.retrieval_match, batch_size=cfg.batch_size, progress=progress,
    )
    records = {
        "zeroshot_retrieval": make_result(
            data.name, model_name, "zeroshot_retrieval", retrieval, retrieval_match=cfg.retrieval_match,
            images=len(test), captions=len(test.captions), data_quality=data.quality.summary(),
        ),
    }
    zeroshot: dict[str, float] = {}
    if data.zeroshot is not None:
        logits = zero_shot_logits(
            model, tokenize, pixel_batches(data.zeroshot.images, spec, cfg.batch_size), data.classnames,
            cfg.templates or data.templates, batch_size=cfg.batch_size, progress=progress,
        )
        labels = torch.as_tensor(data.zeroshot.labels, dtype=torch.long)
        zeroshot = classification_metrics(logits, labels, TOP_K)
        note = unreported_note(TOP_K, len(data.classnames))
        records["zeroshot_classification"] = make_result(
            data.name, model_name, "zeroshot_classification", zeroshot, classes=len(data.classnames),
            **({"note": note} if note else {}), per_class=per_class_accuracy(logits, labels, data.classnames),
            data_quality=data.quality.summary(),
        )
    if results_dir is not None:
        for task, record in records.items():
            write_result(record, Path(results_dir) / f"{model_name}_{task}.json")
    summary = {"params": count_parameters(model), **{key: {**zeroshot, **retrieval}.get(key) for key in SUMMARY_KEYS}}
    if throughput:
        summary["images_per_second"] = images_per_second(model, spec.image_size, batch_size=cfg.throughput_batch_size)
    return {"records": records, "summary": summary}
