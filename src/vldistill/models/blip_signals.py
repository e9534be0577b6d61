"""The signal kinds of BLIP-style models (DLIP): image-text matching through a fusion encoder, and a
captioning decoder. Registered here, beside the dual-encoder kinds of models/signals.py, so the BLIP
adapters, their losses and their tests share one contract:

- `itm_logits` (3B, 2): image-text matching logits (column 1: "matches") of three blocks of B rows each:
  the batch's pairs (image i, text i); each image with a negative text (image i, text itm_negatives[0, i]);
  a negative image with each text (image itm_negatives[1, j], text j). Labels: 1 for the first block, 0 for
  the other two.
- `itm_negatives` (2, B) long: the batch-local indices of those negatives (row 0: a text per image, row 1:
  an image per text), sampled BLIP-style from in-batch similarity (hard negatives). A model asked for ITM
  without negatives samples them from its own similarity and returns them; given a teacher's, a student
  scores the same pairs, which is what ITM distillation compares.
- `token_logits` (B, T, V): a captioning decoder's next-token logits over the vocabulary.
- `fusion_*` / `decoder_*`: per-layer hidden states, self-attention and cross-attention maps of the fusion
  (image-grounded text) encoder and of the decoder; on request, from the primary teacher.

The teacher cache (teachers/cache) stores a lone BLIP retrieval teacher's ITM: per sample (cache row) its
three pairs' logits as field `teacher0/itm` (3 x 2, in block order) and its negatives as field
`teacher0/itm_negatives` (2 cache rows, int64: the row whose caption is this row's image's negative, the row
whose image is this row's caption's negative). A batch read from the cache carries those negatives' inputs
under `ITM_NEGATIVE_KEY`-prefixed keys (and their rows as `itm_negative.rows`), which the student scores
instead of batch-local indices, so the cache returns `itm_logits` but no `itm_negatives`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vldistill.models.signals import (
    DUAL_ENCODER_SIGNALS,
    LAYER_MAPS_REFUSAL,
    EnsembleWeights,
    SignalKind,
    layerwise,
    padded_concat,
    primary,
    register_signal,
)

ITM_BLOCKS = 3  # positives, negative text per image, negative image per text
ITM_NEGATIVE_KEY = "itm_negative"  # batch-key prefix of the ITM negatives' inputs read from a teacher cache
ITM_NEGATIVE_ROWS = f"{ITM_NEGATIVE_KEY}.rows"  # (B, 2) their cache rows: negative text's, negative image's
IGNORE_INDEX = -100  # a caption label with no target (cross-entropy's ignore_index)


def concat_itm_logits(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' (3B_k, 2) ITM logits as one batch's: block by block, so the result keeps the layout
    [positives of every micro-batch, negative texts of every micro-batch, negative images of every one]."""
    blocks = [value.reshape(ITM_BLOCKS, -1, value.shape[-1]) for value in values]
    return torch.cat(blocks, dim=1).reshape(-1, values[0].shape[-1])


def concat_itm_negatives(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' (2, B_k) batch-local negative indices as one batch's: each shifted by the rows before it."""
    offsets, shifted = 0, []
    for value in values:
        shifted.append(value + offsets)
        offsets += value.shape[1]
    return torch.cat(shifted, dim=1)


def concat_caption_labels(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' (B_k, T_k) caption labels as one batch's, each padded to the longest with -100
    (no target), as `token_logits` are padded with zeros."""
    longest = max(value.shape[1] for value in values)
    return torch.cat([F.pad(value, (0, longest - value.shape[1]), value=IGNORE_INDEX) for value in values])


def mean_over_teachers(values: Sequence[torch.Tensor], weights: EnsembleWeights) -> torch.Tensor:
    """Several teachers' logits on the same rows (ITM pairs: the primary teacher's; caption tokens): their
    element-wise mean."""
    return torch.stack(list(values)).mean(dim=0)


def itm_rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(3B, 2) ITM logits in three blocks as (B, 6) per-sample rows: sample i's three pairs in block order."""
    return logits.float().reshape(ITM_BLOCKS, len(rows), -1).transpose(0, 1).reshape(len(rows), -1)


def itm_from_rows(stored: torch.Tensor) -> torch.Tensor:
    """(B, 6) per-sample ITM rows (see `itm_rows`) back in the (3B, 2) block layout."""
    return stored.reshape(stored.shape[0], ITM_BLOCKS, -1).transpose(0, 1).reshape(-1, stored.shape[1] // ITM_BLOCKS)


def negative_rows(negatives: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(2, B) batch-local ITM negatives of a batch at cache `rows` (B,) as (B, 2) cache rows (int64)."""
    return rows.to(negatives.device)[negatives].t().to(torch.int64)


def itm_width(model) -> Optional[int]:
    """Per-sample width of a model's cached ITM logits: 3 pairs x 2 classes when it scores ITM, else None."""
    return ITM_BLOCKS * 2 if getattr(model, "scores_itm", False) else None


def carried_by_batch(stored: torch.Tensor) -> None:
    """Cached ITM negatives are global cache rows: the batch carries their inputs, not batch-local indices."""
    return None


CAPTION_REFUSAL = (
    "which a cache does not store: a distribution over the whole vocabulary at every caption token, per sample"
)
register_signal(SignalKind(
    name="itm_logits",
    description="(3B, 2) image-text matching logits: positives, negative text per image, negative image per text",
    concat=concat_itm_logits,
    combine=mean_over_teachers,
    request="output_itm",
    cache_field="itm",
    cache_width=itm_width,
    cache_rows=itm_rows,
    cache_read=itm_from_rows,
))
register_signal(SignalKind(
    name="itm_negatives",
    description="(2, B) batch-local indices of the ITM negatives: a text per image, an image per text",
    concat=concat_itm_negatives,
    combine=primary,
    request="output_itm",
    primary_only=True,
    cache_field="itm_negatives",
    cache_width=lambda model: 2 if itm_width(model) else None,
    cache_dtype="int64",
    cache_rows=negative_rows,
    cache_read=carried_by_batch,
))
register_signal(SignalKind(
    name="token_logits",
    description="(B, T, V) a captioning decoder's next-token logits",
    concat=padded_concat((1,)),
    combine=mean_over_teachers,
    cache_refusal=CAPTION_REFUSAL,
))
register_signal(SignalKind(
    name="caption_labels",
    description="(B, T) the token each position of token_logits predicts, -100 where none (padding, BOS, prompt)",
    concat=concat_caption_labels,
    combine=primary,
    cache_refusal=CAPTION_REFUSAL,
))
for _module in ("fusion", "decoder"):
    register_signal(SignalKind(
        name=f"{_module}_hidden_states",
        description=f"the {_module}'s per-layer hidden states (embeddings, layer 1..L), each (B, N_text, W)",
        concat=layerwise(padded_concat((1,))),
        combine=primary,
        request="output_hidden_states",
        primary_only=True,
        cache_refusal=LAYER_MAPS_REFUSAL,
    ))
    register_signal(SignalKind(
        name=f"{_module}_attentions",
        description=f"the {_module}'s per-layer self-attention probabilities, each (B, heads, N_text, N_text)",
        concat=layerwise(padded_concat((2, 3))),
        combine=primary,
        request="output_attentions",
        primary_only=True,
        cache_refusal=LAYER_MAPS_REFUSAL,
    ))
    register_signal(SignalKind(
        name=f"{_module}_cross_attentions",
        description=f"the {_module}'s per-layer cross-attention to image tokens, each (B, heads, N_text, N_image)",
        concat=layerwise(padded_concat((2,))),
        combine=primary,
        request="output_attentions",
        primary_only=True,
        cache_refusal=LAYER_MAPS_REFUSAL,
    ))


# What a BLIP retrieval model (models/blip.py) can return: a dual encoder's signals, ITM and its fusion pass's
# layers (no captioning signals); a loss reading others cannot train a BLIP retrieval student.
BLIP_RETRIEVAL_SIGNALS = DUAL_ENCODER_SIGNALS | frozenset({
    "itm_logits", "itm_negatives", "fusion_hidden_states", "fusion_attentions", "fusion_cross_attentions",
})
