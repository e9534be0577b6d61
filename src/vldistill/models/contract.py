"""The model contract: what training, the teacher cache and evaluation use from a dual encoder, and from
a captioning model (`Captioner`, e.g. models/blip_caption.py), which is not one.

Every adapter registered in `models.adapters` (CLIP, SigLIP, two-tower) satisfies `DualEncoder`, so
callers ask the model what they need instead of checking its class or reading its Hugging Face config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from transformers import CLIPModel, PreTrainedTokenizerBase

from vldistill.models.inputs import InputSpec
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec


@runtime_checkable
class DualEncoder(Protocol):
    """A model with an image tower and a text tower embedding into one space (an `nn.Module`).

    input_spec: image size, mean/std, text length and padding its batches are prepared with.
    embed_dim: size of the shared embedding space.
    logit_scale: exp(temperature) multiplying cosine similarities (a scalar tensor).
    logit_bias: the learned bias added to every scaled similarity (SigLIP), None when the family has none.
    """

    @property
    def input_spec(self) -> InputSpec: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def logit_scale(self) -> torch.Tensor: ...

    @property
    def logit_bias(self) -> Optional[torch.Tensor]: ...

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, embed_dim)."""

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, embed_dim)."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Both towers on paired images and texts, with hidden states / attention maps on request."""

    def clamp_logit_scale(self) -> None:
        """Keep the learned temperature within [0, ln 100] (called after every optimizer step)."""

    def text_token_settings(self) -> dict[str, Any]:
        """vocab_size, pad/bos/eos token ids and max_position_embeddings of a CLIP student reading this
        model's tokenizer."""

    def architecture_spec(self) -> Optional[DualEncoderSpec]:
        """The tower spec (layers, width, heads, MLP ratio, patch size) the layer-wise losses map layers
        with, None when the family cannot be described by one."""

    def inheritable_clip(self) -> Optional[CLIPModel]:
        """The HF CLIPModel whose config and weights a CLIP student may inherit, None for other families."""

    def architecture_config(self) -> dict[str, Any]:
        """The architecture as JSON data (the teacher cache records and compares it)."""

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write a folder that `models.loading.load_dual_encoder_any` reads back, atomically, with
        `tokenizer` (default: the model's own) and the run metadata `vldistill.json` when given."""


@runtime_checkable
class BuildsStudents(Protocol):
    """A teacher family whose students are models of its own kind (BLIP retrieval: a smaller BLIP with its ITM
    head; BLIP captioning: a smaller captioner); training asks such a teacher for its student instead of
    building a CLIP one."""

    def build_student(self, spec: DualEncoderSpec, inherit: bool) -> "DualEncoder | Captioner":
        """A fresh student with `spec`'s modules, this teacher's input spec and tokenizer, inheriting its
        weights where shapes allow when `inherit`."""


@runtime_checkable
class Captioner(Protocol):
    """An image captioning model: an image encoder and a text decoder reading it (an `nn.Module`).

    input_spec: image size, mean/std, caption length and padding its batches are prepared with.
    tokenizer: what its captions are tokenized and its generated ids decoded with.
    signal_names: the signals its forward can return (and so its students'), which losses are checked against.
    """

    signal_names: frozenset[str]

    @property
    def input_spec(self) -> InputSpec: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Teacher-forced captions: `token_logits` (B, T, V), position t predicting token t + 1, with hidden
        states / attention maps on request."""

    def caption_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) next-token targets aligned with `token_logits`, -100 where no token is to be predicted."""

    def generate_captions(self, pixel_values: torch.Tensor, max_length: int, num_beams: int = 1) -> list[str]:
        """A caption per image of at most `max_length` tokens, special tokens removed."""

    def architecture_config(self) -> dict[str, Any]:
        """The architecture as JSON data (the teacher cache records and compares it)."""

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write a folder its loader reads back, atomically, with `tokenizer` (default: the model's own) and
        the run metadata `vldistill.json` when given."""
