"""An offline word-level tokenizer (built with `tokenizers`), saved with every model we write."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
# Ids 0-3. EOS must not be 2: HF CLIP treats eos_token_id == 2 as a legacy config and pools at argmax(id).
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


def words_in(texts: Iterable[str]) -> set[str]:
    """The lower-cased words (and punctuation marks) the word-level tokenizer would split `texts` into."""
    splitter = pre_tokenizers.Whitespace()
    return {word.lower() for text in texts for word, _ in splitter.pre_tokenize_str(text)}


def build_word_tokenizer(words: Iterable[str], max_length: int = 32) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `words` that wraps each text in BOS ... EOS."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(w.lower() for w in words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def make_tokenize(
    tokenizer: PreTrainedTokenizerBase, max_length: int, padding: str = "longest"
) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """A function texts -> {input_ids, attention_mask}, padded to the batch's longest text
    (`padding="longest"`) or always to `max_length` (`"max_length"`), truncated to `max_length`."""

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(
            list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    return tokenize
