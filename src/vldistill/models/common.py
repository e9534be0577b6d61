"""Pieces the Hugging Face teacher adapters share: eager attention on request, the joint forward pass
of a CLIP-like model, the logit-scale clamp, the tokenizer a folder may hold, the token settings a
CLIP student needs for that tokenizer, and an HF config as stable JSON data."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from vldistill.models.signals import Signals, tower_signals


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# open_clip clamps the learned temperature so logits never exceed this scale.
MAX_LOGIT_SCALE = 100.0
PREPROCESSOR_FILE = "preprocessor_config.json"
# Config entries that describe where or how a model was loaded, not what it computes.
VOLATILE_CONFIG_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "architectures"})


@contextmanager
def eager_attention(*models: PreTrainedModel, enabled: bool = True) -> Iterator[None]:
    """Run the block with every model on eager attention (the only kind that returns attention maps),
    then restore each model's own implementation. Does nothing when `enabled` is False."""
    previous = [model.config._attn_implementation for model in models]
    try:
        if enabled:
            for model, impl in zip(models, previous):
                if impl != "eager":
                    model.set_attn_implementation("eager")
        yield
    finally:
        for model, impl in zip(models, previous):
            if model.config._attn_implementation != impl:
                model.set_attn_implementation(impl)


def joint_forward(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    logit_scale: torch.Tensor,
    *,
    mask_text: bool,
    hidden_states: bool,
    attentions: bool,
    **extra: torch.Tensor,
) -> Signals:
    """One forward pass of a Hugging Face image-text model with both towers (CLIPModel, SiglipModel) as a
    Signals: the text tower reads `attention_mask` only with `mask_text`; hidden states and
    attention maps on request (eager attention for this call only); `extra` fields such as logit_bias."""
    text_inputs = {"attention_mask": attention_mask} if mask_text else {}
    with eager_attention(model, enabled=attentions):
        out = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            output_hidden_states=hidden_states,
            output_attentions=attentions,
            **text_inputs,
        )
    return tower_signals(
        out.image_embeds, out.text_embeds, logit_scale, out.vision_model_output, out.text_model_output,
        attention_mask, hidden_states=hidden_states, attentions=attentions, **extra,
    )


@torch.no_grad()
def clamp_log_scale_(log_scale: torch.Tensor) -> None:
    """Clamp a learned log logit scale in place to [0, ln 100], as CLIP and open_clip do."""
    log_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def load_tokenizer_if_present(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False
) -> Optional[PreTrainedTokenizerBase]:
    """The tokenizer saved in a local folder (None when it holds no tokenizer files), or a hub id's."""
    path = Path(name_or_path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def text_token_settings_from(
    tokenizer: Optional[PreTrainedTokenizerBase], max_position_embeddings: int, *, owner: str
) -> dict[str, Any]:
    """vocab_size, pad/bos/eos token ids and max_position_embeddings that a CLIP student text tower
    must use to read `tokenizer`'s ids. BERT-style tokenizers have no bos/eos: [CLS] and [SEP] stand
    in. The student pools at the first eos id, which must not be 2 (HF CLIP reads eos_token_id == 2 as a
    legacy config and pools at the largest id instead)."""
    if tokenizer is None:
        raise ValueError(f"{owner} has no tokenizer: give one (tokenizer=...) or load from a folder that holds one")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if eos is None:
        raise ValueError(f"{owner}'s tokenizer has neither an eos nor a sep token: a CLIP student cannot pool texts")
    if eos == 2:
        raise ValueError(
            f"{owner}'s tokenizer ends texts with token id 2 ({tokenizer.convert_ids_to_tokens(2)!r}); HF CLIP treats "
            "eos_token_id 2 as a legacy config and would pool at the largest token id instead: re-number the "
            "tokenizer's vocabulary so its eos token is not id 2"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{owner}'s tokenizer has no pad token: set tokenizer.pad_token before building a student")
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "max_position_embeddings": max_position_embeddings,
    }


def square_image_size(image_size: int | list[int] | tuple[int, int], *, where: str) -> int:
    """The side of a square image size given as an int or a (height, width) pair."""
    if isinstance(image_size, int):
        return image_size
    height, width = image_size
    if height != width:
        raise ValueError(f"only square images are supported, {where} has image_size {image_size}")
    return height


def stable_config(config: PretrainedConfig) -> dict[str, Any]:
    """A HF config as JSON data without its volatile entries (private `_*` keys, dtype, versions), so a
    freshly built model and the same model reloaded from disk describe themselves alike."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if not (str(k).startswith("_") or k in VOLATILE_CONFIG_KEYS)}
        return value

    return json.loads(json.dumps(clean(config.to_dict()), default=str))
