"""Evaluate one dual encoder on a data bundle's test split: zero-shot classification, retrieval (and,
for a model with an ITM head, retrieval re-ranked by it), size and image throughput; results as
CLIP_benchmark-style records."""

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
from vldistill.data.templates import expand_templates
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.eval.embed import Tokenize, inference
from vldistill.eval.rerank import MatchesPairs, model_pair_scorer, rerankable_ks, reranked_retrieval_metrics
from vldistill.eval.results import make_result, write_result
from vldistill.eval.retrieval import RetrievalEmbeddings, embed_for_retrieval, recalls_from_scores
from vldistill.eval.zeroshot import classification_metrics, per_class_accuracy, unreported_note, zero_shot_logits
from vldistill.models.inputs import InputSpec
from vldistill.profile.throughput import count_parameters, images_per_second

SUMMARY_KEYS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
# The ITM re-ranked R@1 both ways: in every summary, None for a model without an ITM head.
ITM_SUMMARY_KEYS = ("itm_image_retrieval_recall@1", "itm_text_retrieval_recall@1")
TOP_K = (1, 5)  # zero-shot accuracies computed (acc5 only with more than 5 classes)
RETRIEVAL_KS = (1, 5, 10)  # retrieval recall depths
ITM_PREFIX = "itm_"


def pixel_batches(images: np.ndarray, spec: InputSpec, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 images (N, H, W, 3) as the model's normalized pixel values, `batch_size` images at a time
    (a whole benchmark split as float32 would take 4x the memory of its bytes)."""
    for start in range(0, len(images), batch_size):
        yield to_pixel_values(images[start : start + batch_size], spec.image_mean, spec.image_std)


def itm_retrieval_metrics(
    model: MatchesPairs,
    tokenize: Tokenize,
    images: np.ndarray,
    texts: list[str],
    embedded: RetrievalEmbeddings,
    spec: InputSpec,
    k: int,
    batch_size: int,
    progress: bool = True,
) -> dict:
    """The recalls after ITM re-ranking of each query's top `k` contrastive candidates (eval/rerank.py, BLIP's
    protocol; k = min(k, candidates) each way), keys prefixed "itm_", at the depths of RETRIEVAL_KS that
    re-ranking decides (`rerankable_ks`): the `uint8` `images` (N_img, H, W, 3) and `texts` (N_txt) are
    scored pair by pair with the model's ITM head, `batch_size` pairs at a time."""
    n_images, n_texts = embedded.positives.shape
    ks = rerankable_ks(RETRIEVAL_KS, k, n_images, n_texts)

    def pixels(indices: torch.Tensor) -> torch.Tensor:
        return to_pixel_values(images[indices.numpy()], spec.image_mean, spec.image_std)

    with inference(model):
        recalls = reranked_retrieval_metrics(
            embedded.similarity(), model_pair_scorer(model, pixels, tokenize, texts), embedded.positives, k, ks,
            batch_size=batch_size, progress=progress,
        )
    return {ITM_PREFIX + key: value for key, value in recalls.items()}


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
    A model with an ITM head (`MatchesPairs`: BLIP retrieval) also has the recalls after re-ranking each
    query's top `cfg.rerank_k` candidates by ITM score plus similarity (`itm_retrieval_metrics`), in the
    retrieval record as `itm_*` with `rerank_k`, and in the summary as ITM_SUMMARY_KEYS (None without one).
    Zero-shot classification runs on `data.zeroshot` when the data has one (else `acc1` is None), with the
    templates `cfg.templates` names (`expand_templates`; null: the data's);
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
    embedded = embed_for_retrieval(
        model, tokenize, pixel_batches(test.images, spec, cfg.batch_size), texts=test.captions,
        text_to_image=test.caption_images(), match=cfg.retrieval_match, batch_size=cfg.batch_size, progress=progress,
    )
    similarity = embedded.similarity()
    retrieval = recalls_from_scores(similarity, similarity.T, embedded.positives, RETRIEVAL_KS)
    reranking: dict = {}
    if isinstance(model, MatchesPairs):
        retrieval.update(itm_retrieval_metrics(
            model, tokenize, test.images, test.captions, embedded, spec, cfg.rerank_k, cfg.batch_size, progress,
        ))
        reranking = {"rerank_k": cfg.rerank_k}
    records = {
        "zeroshot_retrieval": make_result(
            data.name, model_name, "zeroshot_retrieval", retrieval, retrieval_match=cfg.retrieval_match,
            images=len(test), captions=len(test.captions), **reranking, data_quality=data.quality.summary(),
        ),
    }
    zeroshot: dict[str, float] = {}
    if data.zeroshot is not None:
        logits = zero_shot_logits(
            model, tokenize, pixel_batches(data.zeroshot.images, spec, cfg.batch_size), data.classnames,
            expand_templates(cfg.templates) if cfg.templates else data.templates, batch_size=cfg.batch_size,
            progress=progress,
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
    figures = {**zeroshot, **retrieval}
    summary = {"params": count_parameters(model), **{key: figures.get(key) for key in (*SUMMARY_KEYS, *ITM_SUMMARY_KEYS)}}
    if throughput:
        summary["images_per_second"] = images_per_second(model, spec.image_size, batch_size=cfg.throughput_batch_size)
    return {"records": records, "summary": summary}
