"""The inputs a profile feeds a model: random pixels of its image size, and a realistic caption tokenized by
its own tokenizer to a chosen number of tokens."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

CAPTION = "a photo of a small red circle to the left of a large blue square on a white background"
TEXT_INPUT = (
    "a caption in plain English, repeated until it fills the text length and tokenized by the model's own "
    "tokenizer (special tokens included, no padding: every position is a real token); the text length is the "
    "model's maximum unless a shorter one is asked for"
)


def caption_tokens(tokenizer: PreTrainedTokenizerBase, length: int) -> tuple[list[int], list[int]]:
    """The input ids and attention mask of `CAPTION`, repeated as often as needed and truncated to exactly
    `length` tokens (padded only if the tokenizer cannot produce that many, e.g. a tiny vocabulary that
    merges everything)."""
    if length < 1:
        raise ValueError(f"a text length must be >= 1, got {length}")
    text = CAPTION
    for _ in range(12):  # 4,096 copies of the caption at most
        if len(tokenizer(text, truncation=True, max_length=length)["input_ids"]) >= length:
            break
        text = f"{text} {text}"
    encoded = tokenizer(text, padding="max_length", truncation=True, max_length=length)
    return list(encoded["input_ids"]), list(encoded["attention_mask"])


def text_batch(tokenizer: PreTrainedTokenizerBase, length: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` copies of `caption_tokens(tokenizer, length)` as (input_ids, attention_mask) tensors."""
    ids, mask = caption_tokens(tokenizer, length)
    return torch.tensor([ids] * batch_size), torch.tensor([mask] * batch_size)


def image_batch(image_size: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """`batch_size` images of standard-normal pixels (what a normalized image looks like), seeded."""
    return torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
