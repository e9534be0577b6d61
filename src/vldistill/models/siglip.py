"""Adapter that makes a Hugging Face `SiglipModel` a vldistill dual encoder.

SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training") scores a pair with
sigmoid(exp(t) * cos + b): the adapter returns t exponentiated as `logit_scale` and b as `logit_bias`.

How its towers pool (read in transformers' `modeling_siglip.py`):
- the vision tower has no CLS token: a multi-head attention pooling head (a learned probe attending
  over all patch tokens) gives the image embedding, so its hidden states are (B, patches, W);
- the text tower takes the hidden state of the LAST position, `last_hidden_state[:, -1]`, whatever
  token sits there (the source says it "may be padding"). SigLIP was trained with every text padded to
  the full length (pad = eos, "sticky eos") and without an attention mask (big_vision, open_clip's
  SigLIP towers), so the input spec asks for max-length padding and the text tower is run without the
  attention mask; the mask still goes into the output for token-level losses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, SiglipModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vldistill.fileio import atomic_directory
from vldistill.models.adapters import register_adapter
from vldistill.models.groups import ParameterGroups, tower_groups
from vldistill.models.common import (
    clamp_log_scale_,
    joint_forward,
    load_tokenizer_if_present,
    square_image_size,
    stable_config,
    text_token_settings_from,
)
from vldistill.models.inputs import InputSpec, image_normalization
from vldistill.models.io import write_metadata
from vldistill.models.locate import require_tokenizer
from vldistill.models.signals import Signals

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class SiglipDualEncoder(nn.Module):
    """A `SiglipModel` seen through the dual-encoder interface (see the module docstring for pooling)."""

    def __init__(
        self,
        model: SiglipModel,
        image_mean: tuple[float, ...] = SIGLIP_MEAN,
        image_std: tuple[float, ...] = SIGLIP_STD,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> None:
        super().__init__()
        if not model.config.vision_config.vision_use_head:
            raise ValueError(
                "the SigLIP vision config has vision_use_head=False: without its pooling head there is no image "
                "embedding"
            )
        self.model = model
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        attentions: bool = False,
        trust_remote_code: bool = False,
    ) -> "SiglipDualEncoder":
        """Load a SigLIP checkpoint (local folder or hub id) with its tokenizer when it has one; image
        mean/std from the folder's preprocessor_config.json, else SigLIP's 0.5/0.5."""
        model = SiglipModel.from_pretrained(
            name_or_path,
            attn_implementation="eager" if attentions else "sdpa",
            trust_remote_code=trust_remote_code,
        )
        mean, std = image_normalization(name_or_path, SIGLIP_MEAN, SIGLIP_STD)
        tokenizer = load_tokenizer_if_present(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, mean, std, tokenizer)

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write the model, `tokenizer` (default: its own, if any), a SigLIP image processor config and,
        when given, the run metadata `vldistill.json` to `out_dir`, atomically; the folder loads back with
        `from_pretrained` and `SiglipModel.from_pretrained`."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with atomic_directory(out_dir) as tmp:
            if metadata is not None:
                write_metadata(tmp, metadata)
            self.model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            size = self.input_spec.image_size
            SiglipImageProcessorPil(
                size={"height": size, "width": size}, image_mean=list(self.image_mean), image_std=list(self.image_std)
            ).save_pretrained(tmp)
        return Path(out_dir)

    @property
    def input_spec(self) -> InputSpec:
        """Image size and normalization; texts padded to the full text length, as SigLIP was trained."""
        return InputSpec(
            image_size=square_image_size(self.model.config.vision_config.image_size, where="the SigLIP vision config"),
            image_mean=self.image_mean,
            image_std=self.image_std,
            max_text_length=self.model.config.text_config.max_position_embeddings,
            text_padding="max_length",
        )

    def text_token_settings(self) -> dict[str, Any]:
        """Vocabulary size, special token ids (from the tokenizer: SigLIP configs often keep CLIP's
        default ids) and text length a CLIP student reading this tokenizer must use."""
        return text_token_settings_from(
            self.tokenizer, self.model.config.text_config.max_position_embeddings, owner="SiglipDualEncoder"
        )

    @property
    def embed_dim(self) -> int:
        """Size of the shared image-text embedding space (the text head's output size)."""
        return self.model.config.text_config.projection_size

    @property
    def logit_scale(self) -> torch.Tensor:
        """The exponentiated temperature t that multiplies cosine similarities (a scalar)."""
        return self.model.logit_scale.exp().squeeze()

    @property
    def logit_bias(self) -> torch.Tensor:
        """The learned bias b added to every scaled similarity (a scalar)."""
        return self.model.logit_bias.squeeze()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D) from the attention-pooling head."""
        return F.normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, D) from the last position; `attention_mask` is accepted for
        the common interface but not used (SigLIP's text tower was trained unmasked)."""
        return F.normalize(self.model.get_text_features(input_ids=input_ids).pooler_output, dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Embed a batch of paired images and texts (logits = logit_scale * cos + logit_bias), with
        hidden states / attention maps on request (eager attention for that call only)."""
        return joint_forward(
            self.model, pixel_values, input_ids, attention_mask, self.logit_scale,
            mask_text=False, hidden_states=output_hidden_states, attentions=output_attentions,
            logit_bias=self.logit_bias,
        )

    def clamp_logit_scale(self) -> None:
        """Keep the learned log temperature within [0, ln 100], as CLIP and open_clip do."""
        clamp_log_scale_(self.model.logit_scale)

    def architecture_spec(self) -> None:
        """None: the layer-wise losses map layers of CLIP towers only."""
        return None

    def parameter_groups(self) -> ParameterGroups:
        """Its parameter groups by name prefix (models/groups.py): each tower with its pooling head, and each
        encoder layer (vision.layers.N, text.layers.N); the logit scale and bias are in neither tower."""
        config = self.model.config
        return {
            **tower_groups("vision", ("model.vision_model.",), "model.vision_model.encoder.layers",
                           config.vision_config.num_hidden_layers),
            **tower_groups("text", ("model.text_model.",), "model.text_model.encoder.layers",
                           config.text_config.num_hidden_layers),
        }

    def inheritable_clip(self) -> None:
        """None: a CLIP student cannot inherit a SigLIP model's weights."""
        return None

    def architecture_config(self) -> dict[str, Any]:
        """The SigLIP config as stable JSON data."""
        return stable_config(self.model.config)


@register_adapter("siglip", "an HF SiglipModel")
def load_siglip(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[SiglipDualEncoder, PreTrainedTokenizerBase]:
    """A SigLIP checkpoint (folder or hub id) as a SiglipDualEncoder, and the tokenizer it holds."""
    model = SiglipDualEncoder.from_pretrained(name_or_path, attentions=attentions, trust_remote_code=trust_remote_code)
    return model, require_tokenizer(model.tokenizer, name_or_path)
