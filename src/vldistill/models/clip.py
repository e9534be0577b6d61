"""Adapter that makes a Hugging Face `CLIPModel` a vldistill dual encoder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from vldistill.models.adapters import register_adapter
from vldistill.models.common import clamp_log_scale_, joint_forward, load_tokenizer_if_present, stable_config
from vldistill.models.groups import ParameterGroups, tower_groups
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD, InputSpec, image_normalization
from vldistill.models.io import save_dual_encoder
from vldistill.models.locate import require_tokenizer
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec
from vldistill.models.student import spec_from_clip_config


class CLIPDualEncoder(nn.Module):
    """A `CLIPModel` seen through the dual-encoder interface: normalized embeddings and a logit scale."""

    def __init__(
        self,
        model: CLIPModel,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        attentions: bool = False,
        trust_remote_code: bool = False,
    ) -> "CLIPDualEncoder":
        """Load a CLIP checkpoint from a local folder or a hub id (eager attention if maps are needed)."""
        model = CLIPModel.from_pretrained(
            name_or_path,
            attn_implementation="eager" if attentions else "sdpa",
            trust_remote_code=trust_remote_code,
        )
        return cls(model, *image_normalization(name_or_path))

    @property
    def input_spec(self) -> InputSpec:
        """Image size and normalization, text length and padding this model takes."""
        return InputSpec(
            image_size=self.model.config.vision_config.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            max_text_length=self.model.config.text_config.max_position_embeddings,
        )

    def text_token_settings(self) -> dict[str, int]:
        """Vocabulary size, special token ids and text length a student sharing this tokenizer must use."""
        text = self.model.config.text_config
        return {
            "vocab_size": text.vocab_size,
            "pad_token_id": text.pad_token_id,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "max_position_embeddings": text.max_position_embeddings,
        }

    @property
    def embed_dim(self) -> int:
        """Size of the shared image-text embedding space."""
        return self.model.config.projection_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        """The exponentiated temperature that multiplies cosine similarities."""
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> None:
        """CLIP adds no bias to its logits."""
        return None

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D)."""
        return F.normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, D)."""
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(features.pooler_output, dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Embed a batch of paired images and texts, with hidden states / attention maps on request
        (attention maps need eager attention: the model switches to it for that call only)."""
        return joint_forward(
            self.model, pixel_values, input_ids, attention_mask, self.logit_scale,
            mask_text=True, hidden_states=output_hidden_states, attentions=output_attentions,
        )

    def clamp_logit_scale(self) -> None:
        """Keep the learned temperature within [0, ln 100] as CLIP and open_clip do."""
        clamp_log_scale_(self.model.logit_scale)

    def architecture_spec(self) -> DualEncoderSpec:
        """The tower spec of the CLIP config (what the layer-wise losses map layers with)."""
        return spec_from_clip_config(self.model.config)

    def parameter_groups(self) -> ParameterGroups:
        """Its parameter groups by name prefix (models/groups.py): each tower with its projection, and each
        encoder layer (vision.layers.N, text.layers.N); the logit scale is in neither tower."""
        config = self.model.config
        return {
            **tower_groups("vision", ("model.vision_model.", "model.visual_projection."), "model.vision_model.encoder.layers",
                           config.vision_config.num_hidden_layers),
            **tower_groups("text", ("model.text_model.", "model.text_projection."), "model.text_model.encoder.layers",
                           config.text_config.num_hidden_layers),
        }

    def inheritable_clip(self) -> CLIPModel:
        """The CLIPModel itself: a CLIP student may inherit its config and weights."""
        return self.model

    def architecture_config(self) -> dict[str, Any]:
        """The CLIP config as stable JSON data."""
        return stable_config(self.model.config)

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write an HF CLIP folder (config, weights, `tokenizer`, image processor, and `vldistill.json` when
        `metadata` is given) to `out_dir`, atomically; a CLIP adapter keeps no tokenizer, so one is required."""
        if tokenizer is None:
            raise ValueError("CLIPDualEncoder.save_pretrained needs the tokenizer to save with the model")
        return save_dual_encoder(self, tokenizer, out_dir, metadata=metadata)

    def num_parameters(self) -> int:
        """Total parameter count of both towers and projections."""
        return sum(p.numel() for p in self.model.parameters())


@register_adapter("clip", "an HF CLIPModel")
def load_clip(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[CLIPDualEncoder, PreTrainedTokenizerBase]:
    """A CLIP checkpoint (folder or hub id) as a CLIPDualEncoder with its folder's image normalization,
    and the tokenizer it holds."""
    model = CLIPDualEncoder.from_pretrained(name_or_path, attentions=attentions, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer_if_present(name_or_path, trust_remote_code=trust_remote_code)
    return model, require_tokenizer(tokenizer, name_or_path)
