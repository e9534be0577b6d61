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
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from vldistill.models.signals import (
    EnsembleWeights,
    SignalKind,
    layerwise,
    padded_concat,
    primary,
    register_signal,
)

ITM_BLOCKS = 3  # positives, negative text per image, negative image per text
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


register_signal(SignalKind(
    name="itm_logits",
    description="(3B, 2) image-text matching logits: positives, negative text per image, negative image per text",
    concat=concat_itm_logits,
    combine=mean_over_teachers,
    request="output_itm",
))
register_signal(SignalKind(
    name="itm_negatives",
    description="(2, B) batch-local indices of the ITM negatives: a text per image, an image per text",
    concat=concat_itm_negatives,
    combine=primary,
    request="output_itm",
    primary_only=True,
))
register_signal(SignalKind(
    name="token_logits",
    description="(B, T, V) a captioning decoder's next-token logits",
    concat=padded_concat((1,)),
    combine=mean_over_teachers,
))
register_signal(SignalKind(
    name="caption_labels",
    description="(B, T) the token each position of token_logits predicts, -100 where none (padding, BOS, prompt)",
    concat=concat_caption_labels,
    combine=primary,
))
for _module in ("fusion", "decoder"):
    register_signal(SignalKind(
        name=f"{_module}_hidden_states",
        description=f"the {_module}'s per-layer hidden states (embeddings, layer 1..L), each (B, N_text, W)",
        concat=layerwise(padded_concat((1,))),
        combine=primary,
        request="output_hidden_states",
        primary_only=True,
    ))
    register_signal(SignalKind(
        name=f"{_module}_attentions",
        description=f"the {_module}'s per-layer self-attention probabilities, each (B, heads, N_text, N_text)",
        concat=layerwise(padded_concat((2, 3))),
        combine=primary,
        request="output_attentions",
        primary_only=True,
    ))
    register_signal(SignalKind(
        name=f"{_module}_cross_attentions",
        description=f"the {_module}'s per-layer cross-attention to image tokens, each (B, heads, N_text, N_image)",
        concat=layerwise(padded_concat((2,))),
        combine=primary,
        request="output_attentions",
        primary_only=True,
    ))
