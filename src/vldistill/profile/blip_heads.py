"""Measure what BLIP's heads cost: FLOPs of scoring one image-text pair with the ITM head, FLOPs of generating
one caption, and captions per second, several captioners timed in interleaved rounds so that a change of
machine load touches them alike."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vldistill.profile.counts import count_flops
from vldistill.profile.throughput import Throughput, eval_mode, interleaved_trials


def itm_flops(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """FLOPs per pair of ITM-scoring N paired images and texts with a BLIP retrieval model, given the images'
    tokens (computed once per image in re-ranking, so not counted): the fusion (image-grounded text) encoder
    and the ITM head, what re-ranking pays for every candidate pair."""
    with eval_mode([model]), torch.inference_mode():
        image_tokens = model.image_tokens(pixel_values)
        return count_flops(lambda: model.itm_logits(image_tokens, input_ids, attention_mask)) / len(pixel_values)


def caption_flops(captioner: Any, pixel_values: torch.Tensor, max_length: int) -> float:
    """FLOPs per caption of greedily captioning `pixel_values` (N images) with at most `max_length` tokens
    each (the vision tower once, the decoder once per generated token: real images, so that every model
    writes captions of the length it really writes)."""
    with eval_mode([captioner]):
        return count_flops(lambda: captioner.generate_captions(pixel_values, max_length)) / len(pixel_values)


def compare_caption_throughput(
    captioners: Mapping[str, Any],
    pixel_values: torch.Tensor,
    max_length: int,
    trials: int = 7,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, Throughput]:
    """Captions per second of each captioner's greedy `generate_captions` on the same batch `pixel_values`
    (real images: a model stops at the length it really writes), in eval mode: `warmup` untimed rounds, then
    `trials` rounds in which every captioner captions the batch once in turn (see `interleaved_trials`)."""
    calls = {
        name: (lambda captioner=captioner: captioner.generate_captions(pixel_values, max_length))
        for name, captioner in captioners.items()
    }
    with eval_mode(captioners.values()):
        measured = interleaved_trials(calls, trials, warmup, progress=progress, desc="caption speed")
    return {name: Throughput(len(pixel_values), tuple(s for (s,) in per_round)) for name, per_round in measured.items()}
