"""Evaluate one dual encoder on a data bundle's test split: zero-shot classification, retrieval,
size and image throughput; results as CLIP_benchmark-style records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from transformers import PreTrainedTokenizerBase

from vldistill.config import EvalConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.eval.results import make_result, write_result
from vldistill.eval.retrieval import evaluate_retrieval
from vldistill.eval.zeroshot import evaluate_zero_shot
from vldistill.models.clip import CLIPDualEncoder
from vldistill.profile.throughput import count_parameters, images_per_second

SUMMARY_KEYS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")


def evaluate_model(
    model: CLIPDualEncoder,
    tokenizer: PreTrainedTokenizerBase,
    data: DataBundle,
    cfg: EvalConfig,
    model_name: str,
    results_dir: Optional[Path] = None,
    progress: bool = True,
) -> dict:
    """Zero-shot and retrieval records for `model` on `data.test`, plus a flat summary of key figures.

    Zero-shot classification runs on `data.zeroshot` when the data has one (else `acc1` is None).
    Retrieval counts a hit when the retrieved caption (or image) is equivalent to the ground truth,
    i.e. has an identical caption (`cfg.retrieval_match="identical_caption"`), or only the paired
    item (`"pair"`). Records are written to `results_dir/{model_name}_{task}.json` when given.
    """
    max_length = model.model.config.text_config.max_position_embeddings
    tokenize = make_tokenize(tokenizer, max_length)
    pixels = to_pixel_values(data.test.images)
    retrieval = evaluate_retrieval(
        model, tokenize, pixels, data.test.captions, match=cfg.retrieval_match,
        batch_size=cfg.batch_size, progress=progress,
    )
    records = {
        "zeroshot_retrieval": make_result(
            data.name, model_name, "zeroshot_retrieval", retrieval, retrieval_match=cfg.retrieval_match,
            data_quality=data.quality.summary(),
        ),
    }
    zeroshot: dict[str, float] = {}
    if data.zeroshot is not None:
        zeroshot_pixels = pixels if data.zeroshot is data.test else to_pixel_values(data.zeroshot.images)
        zeroshot = evaluate_zero_shot(
            model, tokenize, zeroshot_pixels, data.zeroshot.labels.tolist(), data.classnames,
            cfg.templates or data.templates, batch_size=cfg.batch_size, progress=progress,
        )
        records["zeroshot_classification"] = make_result(
            data.name, model_name, "zeroshot_classification", zeroshot, data_quality=data.quality.summary()
        )
    if results_dir is not None:
        for task, record in records.items():
            write_result(record, Path(results_dir) / f"{model_name}_{task}.json")
    image_size = model.model.config.vision_config.image_size
    summary = {
        "params": count_parameters(model.model),
        **{key: {**zeroshot, **retrieval}.get(key) for key in SUMMARY_KEYS},
        "images_per_second": images_per_second(model, image_size, batch_size=cfg.throughput_batch_size),
    }
    return {"records": records, "summary": summary}
