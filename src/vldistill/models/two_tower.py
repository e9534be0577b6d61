"""A generic two-tower dual encoder: any HF vision backbone and any HF text encoder, each followed by
a bias-free linear projection to a shared space, L2-normalized, and a learnable logit scale, as in
LiT (Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"), where pretrained
towers are locked and only the heads (and temperature) train.

Folder format (written atomically):
  two_tower.json     {"format": "vldistill-two-tower", "version": 1, "projection_dim", "vision_pooling",
                     "text_pooling"}
  vision/            the vision backbone's `save_pretrained` (+ preprocessor_config.json when known)
  text/              the text backbone's `save_pretrained` (+ its tokenizer when known)
  heads.safetensors  vision_projection.weight, text_projection.weight, log_logit_scale
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from vldistill.fileio import atomic_directory
from vldistill.models.adapters import register_adapter
from vldistill.models.common import (
    PREPROCESSOR_FILE,
    clamp_log_scale_,
    eager_attention,
    load_tokenizer_if_present,
    square_image_size,
    stable_config,
    text_token_settings_from,
)
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD, InputSpec
from vldistill.models.io import write_metadata
from vldistill.models.locate import (
    ModelNotFoundError, checked_source, hub_errors, local_folder, read_json_object, require_tokenizer,
)
from vldistill.models.signals import Signals, tower_signals

TWO_TOWER_FILE = "two_tower.json"
TWO_TOWER_FORMAT = "vldistill-two-tower"
TWO_TOWER_VERSION = 1
HEADS_FILE = "heads.safetensors"
VISION_DIR, TEXT_DIR = "vision", "text"
VISION_POOLINGS = ("cls", "mean", "pooler")
TEXT_POOLINGS = ("mean", "cls")
# CLIP's initial temperature 0.07, stored as a log scale.
INIT_LOG_LOGIT_SCALE = math.log(1 / 0.07)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states (B, N, W) over real tokens only (mask (B, N) of 1/0), as
    sentence-transformers' mean pooling computes it."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def read_image_processor_config(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The preprocessor_config.json of a local model folder, or None when it has none (or is a hub id)."""
    path = Path(folder) / PREPROCESSOR_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_two_tower_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated two_tower.json of a saved two-tower folder."""
    path = Path(folder) / TWO_TOWER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a two-tower folder: it has no {TWO_TOWER_FILE}")
    config = read_json_object(path, "a two-tower config")
    differences = [
        f"{key} is {config.get(key)!r}, expected {expected!r}"
        for key, expected in (("format", TWO_TOWER_FORMAT), ("version", TWO_TOWER_VERSION))
        if config.get(key) != expected
    ]
    if differences:
        raise ValueError(f"{path} is not a two-tower folder this vldistill reads: {'; '.join(differences)}")
    missing = [key for key in ("projection_dim", "vision_pooling", "text_pooling") if key not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return config


def load_backbone(name_or_path: str | os.PathLike, *, attentions: bool, trust_remote_code: bool) -> PreTrainedModel:
    """An HF backbone through AutoModel (eager attention when attention maps will be asked for); a path
    that holds no model, or a hub id the hub cannot serve, raises a one-line error naming it."""
    folder, _ = checked_source(name_or_path)
    with hub_errors(name_or_path, local=folder is not None):
        return AutoModel.from_pretrained(
            name_or_path, attn_implementation="eager" if attentions else None, trust_remote_code=trust_remote_code
        )


def load_text_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool) -> Optional[PreTrainedTokenizerBase]:
    """The tokenizer of a text backbone's folder (None when it holds none) or hub id."""
    with hub_errors(name_or_path, local=local_folder(name_or_path) is not None):
        return load_tokenizer_if_present(name_or_path, trust_remote_code=trust_remote_code)


def saved_part(folder: Path, name: str) -> Path:
    """`folder`/`name` of a saved two-tower folder, which must exist."""
    path = folder / name
    if not path.exists():
        raise ModelNotFoundError(f"{folder} is a damaged two-tower folder: it has no {name}")
    return path


def backbone_width(model: PreTrainedModel, tower: str) -> int:
    """The hidden size of a backbone's output tokens."""
    width = getattr(model.config, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"the {tower} backbone ({type(model).__name__}) has no integer config.hidden_size to project")
    return width


class TwoTowerDualEncoder(nn.Module):
    """Vision backbone + text encoder, each with a bias-free linear head to `projection_dim`, and a
    learnable logit scale initialized to 1/0.07 (LiT; see the module docstring).

    vision_pooling: "cls" (token 0 of last_hidden_state), "mean" (mean of all its tokens) or "pooler"
        (the backbone's pooler_output). text_pooling: "mean" (attention-mask-weighted mean, as
        sentence-transformers) or "cls" (token 0).
    tokenizer / image_processor_config: the text tokenizer and the vision backbone's preprocessor
        config, kept to save with the model and to derive `text_token_settings` / `input_spec`.
    """

    def __init__(
        self,
        vision: PreTrainedModel,
        text: PreTrainedModel,
        projection_dim: int,
        vision_pooling: str = "cls",
        text_pooling: str = "mean",
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        image_processor_config: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if vision_pooling not in VISION_POOLINGS:
            raise ValueError(f"vision_pooling must be one of {', '.join(VISION_POOLINGS)}, got {vision_pooling!r}")
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {', '.join(TEXT_POOLINGS)}, got {text_pooling!r}")
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be positive, got {projection_dim}")
        self.vision = vision
        self.text = text
        self.projection_dim = projection_dim
        self.vision_pooling = vision_pooling
        self.text_pooling = text_pooling
        self.vision_projection = nn.Linear(backbone_width(vision, "vision"), projection_dim, bias=False)
        self.text_projection = nn.Linear(backbone_width(text, "text"), projection_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(INIT_LOG_LOGIT_SCALE))
        self.tokenizer = tokenizer
        self.image_processor_config = image_processor_config
        self.backbones_frozen = False

    @classmethod
    def from_backbones(
        cls,
        vision_name_or_path: str | os.PathLike,
        text_name_or_path: str | os.PathLike,
        projection_dim: int = 512,
        vision_pooling: str = "cls",
        text_pooling: str = "mean",
        attentions: bool = False,
        trust_remote_code: bool = False,
    ) -> "TwoTowerDualEncoder":
        """Pretrained backbones (AutoModel, plus the text tokenizer and the vision preprocessor config
        when their folders hold them) with fresh projection heads and logit scale."""
        kwargs = {"attentions": attentions, "trust_remote_code": trust_remote_code}
        return cls(
            load_backbone(vision_name_or_path, **kwargs),
            load_backbone(text_name_or_path, **kwargs),
            projection_dim,
            vision_pooling,
            text_pooling,
            tokenizer=load_text_tokenizer(text_name_or_path, trust_remote_code=trust_remote_code),
            image_processor_config=read_image_processor_config(vision_name_or_path),
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, attentions: bool = False, trust_remote_code: bool = False
    ) -> "TwoTowerDualEncoder":
        """Load a folder written by `save_pretrained` (refusing another format or version)."""
        path = Path(path)
        config = read_two_tower_config(path)
        kwargs = {"attentions": attentions, "trust_remote_code": trust_remote_code}
        model = cls(
            load_backbone(saved_part(path, VISION_DIR), **kwargs),
            load_backbone(saved_part(path, TEXT_DIR), **kwargs),
            config["projection_dim"],
            config["vision_pooling"],
            config["text_pooling"],
            tokenizer=load_tokenizer_if_present(path / TEXT_DIR, trust_remote_code=trust_remote_code),
            image_processor_config=read_image_processor_config(path / VISION_DIR),
        )
        model.load_heads(saved_part(path, HEADS_FILE))
        return model

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write the folder described in the module docstring to `out_dir`, atomically, with `tokenizer`
        (default: its own, if any) in text/ and the run metadata `vldistill.json` when given."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with atomic_directory(out_dir) as tmp:
            if metadata is not None:
                write_metadata(tmp, metadata)
            config = {
                "format": TWO_TOWER_FORMAT,
                "version": TWO_TOWER_VERSION,
                "projection_dim": self.projection_dim,
                "vision_pooling": self.vision_pooling,
                "text_pooling": self.text_pooling,
            }
            (tmp / TWO_TOWER_FILE).write_text(json.dumps(config, indent=2) + "\n")
            self.vision.save_pretrained(tmp / VISION_DIR)
            if self.image_processor_config is not None:
                processor = json.dumps(self.image_processor_config, indent=2)
                (tmp / VISION_DIR / PREPROCESSOR_FILE).write_text(processor + "\n")
            self.text.save_pretrained(tmp / TEXT_DIR)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / TEXT_DIR)
            save_file({name: p.detach().contiguous() for name, p in self.head_parameters().items()}, tmp / HEADS_FILE)
        return Path(out_dir)

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters outside the two backbones: both projections and the log logit scale."""
        return {
            name: param
            for name, param in self.named_parameters()
            if not name.startswith(("vision.", "text."))
        }

    @torch.no_grad()
    def load_heads(self, file: str | os.PathLike) -> None:
        """Copy the projections and logit scale saved in a heads.safetensors file into this model."""
        tensors = load_file(file)
        heads = self.head_parameters()
        if set(tensors) != set(heads):
            raise ValueError(f"{file} holds {sorted(tensors)}, expected {sorted(heads)}")
        for name, param in heads.items():
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"{file}: {name} has shape {tuple(tensors[name].shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(tensors[name])

    def freeze_backbones(self) -> None:
        """Lock both backbones (LiT): no gradients, and kept in eval mode (no dropout) even under
        `train()`, so only the heads and the logit scale learn."""
        for param in [*self.vision.parameters(), *self.text.parameters()]:
            param.requires_grad_(False)
        self.backbones_frozen = True
        self.vision.eval()
        self.text.eval()

    def train(self, mode: bool = True) -> "TwoTowerDualEncoder":
        """nn.Module.train, except that frozen backbones stay in eval mode."""
        super().train(mode)
        if self.backbones_frozen:
            self.vision.eval()
            self.text.eval()
        return self

    @property
    def input_spec(self) -> InputSpec:
        """The vision config's image size, the vision preprocessor's mean/std (CLIP's when unknown), the
        text config's max_position_embeddings, batches padded to their longest text."""
        image_size = getattr(self.vision.config, "image_size", None)
        if image_size is None:
            raise ValueError(f"the vision backbone's config ({type(self.vision.config).__name__}) has no image_size")
        processor = self.image_processor_config or {}
        return InputSpec(
            image_size=square_image_size(image_size, where="the vision backbone's config"),
            image_mean=tuple(processor.get("image_mean", CLIP_MEAN)),
            image_std=tuple(processor.get("image_std", CLIP_STD)),
            max_text_length=self.text.config.max_position_embeddings,
            text_padding="longest",
        )

    def text_token_settings(self) -> dict[str, Any]:
        """Vocabulary size, special token ids (BERT-style: bos=[CLS], eos=[SEP], pad=[PAD]) and text length
        a CLIP student reading the text tokenizer must use."""
        return text_token_settings_from(
            self.tokenizer, self.text.config.max_position_embeddings, owner="TwoTowerDualEncoder"
        )

    @property
    def embed_dim(self) -> int:
        """Size of the shared image-text embedding space."""
        return self.projection_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        """The exponentiated temperature that multiplies cosine similarities (a scalar)."""
        return self.log_logit_scale.exp()

    @property
    def logit_bias(self) -> None:
        """The two-tower model adds no bias to its logits."""
        return None

    def pool_image(self, outputs: ModelOutput) -> torch.Tensor:
        """(B, W) image features from the vision backbone's outputs, by `vision_pooling`."""
        if self.vision_pooling == "pooler":
            if outputs.pooler_output is None:
                name = type(self.vision).__name__
                raise ValueError(f"{name} returns no pooler_output: use vision_pooling 'cls' or 'mean'")
            return outputs.pooler_output
        hidden = outputs.last_hidden_state
        if hidden.ndim != 3:
            raise ValueError(
                f"vision_pooling {self.vision_pooling!r} needs token states (B, N, W), {type(self.vision).__name__} "
                f"returns {tuple(hidden.shape)}: use vision_pooling 'pooler'"
            )
        return hidden[:, 0] if self.vision_pooling == "cls" else hidden.mean(dim=1)

    def pool_text(self, outputs: ModelOutput, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, W) text features from the text encoder's outputs, by `text_pooling`."""
        hidden = outputs.last_hidden_state
        return hidden[:, 0] if self.text_pooling == "cls" else masked_mean(hidden, attention_mask)

    def _run_vision(self, pixel_values: torch.Tensor, **flags: bool) -> tuple[ModelOutput, torch.Tensor]:
        outputs = self.vision(pixel_values=pixel_values, **flags)
        return outputs, F.normalize(self.vision_projection(self.pool_image(outputs)), dim=-1)

    def _run_text(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], **flags: bool
    ) -> tuple[ModelOutput, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.text(input_ids=input_ids, attention_mask=attention_mask, **flags)
        return outputs, F.normalize(self.text_projection(self.pool_text(outputs, attention_mask)), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D): normalize(W_image @ pooled features)."""
        return self._run_vision(pixel_values)[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, D): normalize(W_text @ pooled features)."""
        return self._run_text(input_ids, attention_mask)[1]

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Embed a batch of paired images and texts, with each backbone's hidden states / attention maps
        on request (eager attention for that call only)."""
        flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        with eager_attention(self.vision, self.text, enabled=output_attentions):
            vision, image_embeds = self._run_vision(pixel_values, **flags)
            text, text_embeds = self._run_text(input_ids, attention_mask, **flags)
        return tower_signals(
            image_embeds, text_embeds, self.logit_scale, vision, text, attention_mask,
            hidden_states=output_hidden_states, attentions=output_attentions,
        )

    def clamp_logit_scale(self) -> None:
        """Keep the learned log temperature within [0, ln 100], as CLIP and open_clip do."""
        clamp_log_scale_(self.log_logit_scale)

    def architecture_spec(self) -> None:
        """None: the layer-wise losses map layers of CLIP towers only."""
        return None

    def inheritable_clip(self) -> None:
        """None: a CLIP student cannot inherit a two-tower model's weights."""
        return None

    def architecture_config(self) -> dict[str, Any]:
        """Both backbones' configs as stable JSON data, and the head settings."""
        return {
            "vision": stable_config(self.vision.config),
            "text": stable_config(self.text.config),
            "projection_dim": self.projection_dim,
            "vision_pooling": self.vision_pooling,
            "text_pooling": self.text_pooling,
        }


@register_adapter("two-tower", f"a vldistill two-tower folder: {TWO_TOWER_FILE}", marker=TWO_TOWER_FILE)
def load_two_tower(
    folder: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[TwoTowerDualEncoder, PreTrainedTokenizerBase]:
    """A folder written by `TwoTowerDualEncoder.save_pretrained`, and the tokenizer in its text/ folder."""
    model = TwoTowerDualEncoder.from_pretrained(folder, attentions=attentions, trust_remote_code=trust_remote_code)
    return model, require_tokenizer(model.tokenizer, Path(folder) / TEXT_DIR)
