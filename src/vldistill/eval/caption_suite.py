"""Evaluate one captioning model on a data bundle's test split: a greedy caption per distinct image, scored
with corpus BLEU-1..4 and CIDEr-D (eval/captioning.py) against each image's reference captions; the result
as a CLIP_benchmark-style record."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from tqdm import tqdm

from vldistill.config import EvalConfig
from vldistill.data.bundle import DataBundle
from vldistill.eval.captioning import cider_d, corpus_bleu
from vldistill.eval.embed import inference
from vldistill.eval.results import CAPTIONING, make_result, write_result
from vldistill.eval.suite import pixel_batches
from vldistill.models.contract import Captioner
from vldistill.profile.blip_heads import compare_caption_throughput
from vldistill.profile.throughput import Throughput, count_parameters

CAPTION_SUMMARY_KEYS = ("bleu4", "cider")
EXAMPLES = 5  # images whose generated caption and references the record shows
NUM_BEAMS = 1  # greedy decoding
SPEED_IMAGES = 32  # test images each captioner captions per timed round


def generate_all(captioner: Captioner, data: DataBundle, cfg: EvalConfig, max_length: int, progress: bool) -> list[str]:
    """A greedy caption of at most `max_length` tokens for every image of `data.test`, `cfg.batch_size`
    images at a time."""
    spec = captioner.input_spec
    images = data.test.images
    captions: list[str] = []
    with inference(captioner) as device:
        batches = pixel_batches(images, spec, cfg.batch_size)
        total = -(-len(images) // cfg.batch_size)
        for pixel_values in tqdm(batches, total=total, desc="generate captions", disable=not progress):
            captions.extend(captioner.generate_captions(pixel_values.to(device), max_length, num_beams=NUM_BEAMS))
    if len(captions) != len(images):
        raise ValueError(f"the captioner returned {len(captions)} captions for {len(images)} images")
    return captions


def _reference_counts(references: list[list[str]]) -> dict[str, float]:
    counts = [len(refs) for refs in references]
    return {"min": min(counts), "mean": sum(counts) / len(counts), "max": max(counts)}


def caption_length(captioner: Captioner, model_name: str = "the captioner") -> int:
    """The most tokens a caption may have after its BOS token: the model's text length minus one."""
    max_length = captioner.input_spec.max_text_length - 1
    if max_length < 1:
        raise ValueError(f"{model_name} takes texts of {max_length + 1} token(s): no room for a caption after its BOS")
    return max_length


def speed_images(captioner: Captioner, data: DataBundle) -> torch.Tensor:
    """The first SPEED_IMAGES test images as `captioner`'s pixel values: what caption speed and FLOPs are measured on
    (real images, so that every model writes captions of the length it really writes)."""
    return next(pixel_batches(data.test.images[:SPEED_IMAGES], captioner.input_spec, SPEED_IMAGES))


def compare_caption_speed(
    captioners: Mapping[str, Captioner], data: DataBundle, progress: bool = False
) -> dict[str, Throughput]:
    """Captions per second of each captioner (all of one input spec and text length) on `speed_images`, timed
    together in interleaved rounds (profile.blip_heads.compare_caption_throughput)."""
    first = next(iter(captioners.values()))
    return compare_caption_throughput(captioners, speed_images(first, data), caption_length(first), progress=progress)


def evaluate_captioner(
    captioner: Captioner,
    data: DataBundle,
    cfg: EvalConfig,
    model_name: str,
    results_dir: Optional[Path] = None,
    progress: bool = True,
) -> dict:
    """The captioning record of `captioner` on `data.test` and a flat summary {params, bleu4, cider}.

    Each distinct test image gets one greedy caption of at most the model's text length minus its BOS
    token; the captions are scored as the COCO caption evaluation scores them, corpus BLEU-1..4 and
    CIDEr-D, against each image's references (`PairSplit.image_references`: the shapes data's several
    wordings, a Karpathy-format set's captions of the image). The record (task "captioning") holds the
    metrics (bleu1..bleu4, cider), the image count, references per image (min/mean/max), the decoding
    settings and the first EXAMPLES images' generated caption, references and CIDEr-D; it is written to
    `results_dir/{model_name}_captioning.json` when given."""
    test = data.test
    max_length = caption_length(captioner, model_name)
    generated = generate_all(captioner, data, cfg, max_length, progress)
    references = test.image_references()
    bleu = corpus_bleu(generated, references)
    cider, per_image = cider_d(generated, references)
    metrics = {"bleu4": bleu[3], "cider": cider, **{f"bleu{n}": score for n, score in enumerate(bleu, start=1)}}
    examples = [
        {"image": i, "generated": generated[i], "references": references[i], "cider": per_image[i]}
        for i in range(min(EXAMPLES, len(generated)))
    ]
    record = make_result(
        data.name, model_name, CAPTIONING, metrics,
        images=len(test),
        references_per_image=_reference_counts(references),
        decoding={"strategy": "greedy", "num_beams": NUM_BEAMS, "max_new_tokens": max_length},
        examples=examples,
        data_quality=data.quality.summary(),
    )
    if results_dir is not None:
        write_result(record, Path(results_dir) / f"{model_name}_{CAPTIONING}.json")
    summary = {"params": count_parameters(captioner), **{key: metrics[key] for key in CAPTION_SUMMARY_KEYS}}
    return {"records": {CAPTIONING: record}, "summary": summary}
