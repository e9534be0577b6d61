"""BLIP captioning models (transformers' `BlipForConditionalGeneration`) as teachers and students.

A `BlipCaptioner` is an image encoder and a text decoder cross-attending to its image tokens. Its forward
pass reads teacher-forced captions and returns `Signals`: `token_logits` (B, T, V), where position t
predicts token t + 1 of the caption, and on request the vision tower's and the decoder's hidden states,
self-attention and cross-attention maps. `caption_labels` gives the targets aligned with those logits.

Captions start with the decoder's BOS token (BLIP's [DEC]); a batch whose first token is another one
(a BERT tokenizer's [CLS]) has it replaced, as BLIP does before decoding. Generation stops at the
decoder's sep token (the tokenizer's sep, else its eos).

A saved captioner is a plain HF folder (`config.json` with model_type "blip" and architectures
["BlipForConditionalGeneration"], weights, tokenizer, `preprocessor_config.json`); `load_blip_captioner`
reads one back, and `is_captioning_config` tells a captioning folder's config from a retrieval one's.

A captioner builds its own students (contract.BuildsStudents, `build_student`): smaller captioners per module
(models/blip_caption_student.py) sharing its tokenizer. It has no embedding space and no learned temperature
(its `clamp_logit_scale` has nothing to clamp), so the contrastive losses cannot train it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from transformers import BlipConfig, BlipForConditionalGeneration, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from vldistill.fileio import atomic_directory
from vldistill.models.blip_caption_student import MODULES, inherit_captioner_weights, student_captioner_config
from vldistill.models.common import eager_attention, load_tokenizer_if_present, square_image_size, stable_config
from vldistill.models.groups import ParameterGroups, tower_groups
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD, InputSpec, image_normalization
from vldistill.models.io import write_metadata
from vldistill.models.locate import require_tokenizer
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec, TowerSpec, tower_spec_from_config

logger = logging.getLogger(__name__)

# BLIP normalizes images as OpenAI CLIP does (BlipImageProcessor's defaults).
BLIP_MEAN, BLIP_STD = CLIP_MEAN, CLIP_STD
CAPTIONING_ARCHITECTURE = "BlipForConditionalGeneration"
IGNORE_INDEX = -100  # the target value cross-entropy skips (PyTorch's and HF's default)
# What a captioner's forward can return (and so its students'): the caption signals and, on request, the
# vision tower's and the decoder's layers; no embeddings, ITM or text-encoder signals.
CAPTIONER_SIGNALS = frozenset({
    "token_logits", "caption_labels", "text_attention_mask", "image_hidden_states", "image_attentions",
    "decoder_hidden_states", "decoder_attentions", "decoder_cross_attentions",
})


def is_captioning_config(config: Mapping[str, Any]) -> bool:
    """Whether a BLIP folder's config.json data describes a captioning model (its `architectures` name
    BlipForConditionalGeneration) rather than an image-text retrieval one."""
    return CAPTIONING_ARCHITECTURE in (config.get("architectures") or [])


def blip_token_settings(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """vocab_size and the bos / eos / sep / pad ids a BLIP text decoder reading `tokenizer` needs: BOS starts
    a caption (the tokenizer's bos, else its cls), generation stops at sep (its sep, else its eos)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for name, value in (("bos (or cls)", bos), ("eos (or sep)", eos), ("pad", tokenizer.pad_token_id)):
        if value is None:
            raise ValueError(f"the tokenizer has no {name} token: a BLIP captioning decoder cannot read its captions")
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "sep_token_id": sep,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tower_config(spec: TowerSpec) -> dict[str, int]:
    """The HF size fields of one BLIP tower (vision encoder or text decoder) for `spec`."""
    return {
        "num_hidden_layers": spec.layers,
        "hidden_size": spec.width,
        "num_attention_heads": spec.heads,
        "intermediate_size": round(spec.width * spec.mlp_ratio),
    }


def captioner_config(
    token_settings: Mapping[str, int],
    *,
    image_size: int,
    vision: TowerSpec,
    decoder: TowerSpec,
    max_text_length: int,
) -> BlipConfig:
    """A BlipConfig for a captioner: a `vision` tower over `image_size` images (its patch size required),
    a `decoder` over `max_text_length` positions with the tokenizer's `token_settings`
    (`blip_token_settings`)."""
    vision.validate("vision")
    decoder.validate("decoder")
    if vision.patch_size is None:
        raise ValueError("vision.patch_size is required for the image tower")
    config = BlipConfig(
        vision_config={**tower_config(vision), "image_size": image_size, "patch_size": vision.patch_size},
        text_config={**tower_config(decoder), **token_settings, "max_position_embeddings": max_text_length},
    )
    config.architectures = [CAPTIONING_ARCHITECTURE]
    return config


class BlipCaptioner(nn.Module):
    """A `BlipForConditionalGeneration` with its tokenizer seen through the `Captioner` interface."""

    signal_names = CAPTIONER_SIGNALS  # what its forward can return (and so its students', build_student)

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        image_mean: tuple[float, ...] = BLIP_MEAN,
        image_std: tuple[float, ...] = BLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, trust_remote_code: bool = False
    ) -> "BlipCaptioner":
        """A captioner from a local folder or hub id holding a BLIP captioning model and its tokenizer."""
        model = BlipForConditionalGeneration.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        tokenizer = require_tokenizer(
            load_tokenizer_if_present(name_or_path, trust_remote_code=trust_remote_code), name_or_path
        )
        return cls(model, tokenizer, *image_normalization(name_or_path, BLIP_MEAN, BLIP_STD))

    @property
    def input_spec(self) -> InputSpec:
        """Image size and normalization, caption length and padding this model takes."""
        return InputSpec(
            image_size=square_image_size(self.model.config.vision_config.image_size, where="the BLIP vision config"),
            image_mean=self.image_mean,
            image_std=self.image_std,
            max_text_length=self.model.config.text_config.max_position_embeddings,
        )

    @property
    def bos_token_id(self) -> int:
        """The token every caption starts with (BLIP's [DEC])."""
        return self.model.config.text_config.bos_token_id

    def clamp_logit_scale(self) -> None:
        """Nothing to clamp: a captioner has no logit scale (the training loop calls this after every step)."""

    def decoder_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`input_ids` with the first token of every caption set to the decoder's BOS (a copy when it changes)."""
        if bool((input_ids[:, 0] == self.bos_token_id).all()):
            return input_ids
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.bos_token_id
        return input_ids

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Signals:
        """Teacher-forced captioning of paired images and captions: `token_logits` (B, T, V), position t
        predicting token t + 1, the `text_attention_mask`, and on request the vision tower's and the decoder's
        hidden states and attention maps (eager attention for this call only)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        with eager_attention(self.model, enabled=output_attentions):
            vision = self.model.vision_model(pixel_values=pixel_values, **flags)
            decoder = self.model.text_decoder(
                input_ids=self.decoder_input_ids(input_ids),
                attention_mask=attention_mask,
                encoder_hidden_states=vision.last_hidden_state,
                use_cache=False,
                **flags,
            )
        return Signals(
            token_logits=decoder.logits,
            caption_labels=self.caption_labels(input_ids, attention_mask),
            text_attention_mask=attention_mask,
            image_hidden_states=vision.hidden_states if output_hidden_states else None,
            image_attentions=vision.attentions if output_attentions else None,
            decoder_hidden_states=decoder.hidden_states if output_hidden_states else None,
            decoder_attentions=decoder.attentions if output_attentions else None,
            decoder_cross_attentions=decoder.cross_attentions if output_attentions else None,
        )

    @staticmethod
    def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 1) -> torch.Tensor:
        """(B, T) next-token targets aligned with `token_logits`: position t holds token t + 1, IGNORE_INDEX
        (-100) where that token is padding, lies in the first `prompt_length` tokens (the BOS, and a prompt
        such as "a picture of" when captions start with one, as BLIP masks them) or is past the end."""
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1 (the BOS token is never a target), got {prompt_length}")
        targets = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        targets[:, :prompt_length] = IGNORE_INDEX
        return torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGNORE_INDEX)], dim=1)

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor, max_length: int, num_beams: int = 1) -> list[str]:
        """A caption per image, decoded greedily (`num_beams` 1) or by beam search, of at most `max_length`
        tokens after the BOS (the closing sep token included), with special tokens removed."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = self.model.generate(
            pixel_values=pixel_values, max_new_tokens=max_length, num_beams=num_beams, do_sample=False
        )
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def architecture_config(self) -> dict[str, Any]:
        """The BLIP config as stable JSON data."""
        return stable_config(self.model.config)

    def architecture_spec(self) -> DualEncoderSpec:
        """The per-module spec the layer-wise losses map layers with: the vision tower, and the decoder as
        `decoder` and as the text transformer `text` (the captioner has no text-only pass, so no text_*
        signals; `projection_dim` is the config's image_text_hidden_size, which no captioning layer uses)."""
        config = self.model.config
        vision, text = config.vision_config, config.text_config
        decoder = tower_spec_from_config(text)
        return DualEncoderSpec(
            vision=tower_spec_from_config(vision, square_image_size(vision.patch_size, where="the BLIP vision config's patch_size")),
            text=decoder,
            projection_dim=config.image_text_hidden_size,
            decoder=decoder,
        )

    def parameter_groups(self) -> ParameterGroups:
        """Its parameter groups by name prefix (models/groups.py): the vision tower, the decoder (with its LM
        head) and each of their layers (vision.layers.N, decoder.layers.N)."""
        config = self.model.config
        return {
            **tower_groups("vision", ("model.vision_model.",), "model.vision_model.encoder.layers",
                           config.vision_config.num_hidden_layers),
            **tower_groups("decoder", ("model.text_decoder.",), "model.text_decoder.bert.encoder.layer",
                           config.text_config.num_hidden_layers),
        }

    def build_student(self, spec: DualEncoderSpec, inherit: bool) -> "BlipCaptioner":
        """A fresh captioning student (contract.BuildsStudents) with `spec.vision` and `spec.decoder` (None:
        `spec.text`, the student's text transformer, as a BLIP retrieval student's text and fusion layers are
        one stack), this model's tokenizer and image normalization, inheriting both modules' weights when
        `inherit` (see `build_student_captioner`). A captioner has no fusion encoder: `spec.fusion` is refused."""
        if spec.fusion is not None:
            raise ValueError(
                "student.model.fusion is set, but a captioning student has no fusion encoder (vision tower and "
                "text decoder only): shape its decoder with student.model.decoder"
            )
        decoder = spec.decoder if spec.decoder is not None else spec.text
        return build_student_captioner(self, vision=spec.vision, decoder=decoder, inherit=MODULES if inherit else ())

    def num_parameters(self) -> int:
        """Total parameter count of the vision tower and the decoder."""
        return sum(p.numel() for p in self.model.parameters())

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write an HF BLIP captioning folder (config, weights, `tokenizer` (default: the model's own), image
        processor, and `vldistill.json` when `metadata` is given) to `out_dir`, atomically."""
        return save_blip_folder(self.model, tokenizer or self.tokenizer, self.input_spec, out_dir, metadata)


def build_student_captioner(
    teacher: BlipCaptioner,
    *,
    vision: Optional[TowerSpec] = None,
    decoder: Optional[TowerSpec] = None,
    inherit: Iterable[str] = MODULES,
    seed: Optional[int] = None,
) -> BlipCaptioner:
    """A student of `teacher` with the given module shapes (blip_caption_student.student_captioner_config),
    randomly initialized (from `seed`; None: from the global generator as it stands, e.g. seeded by the run),
    then each module in `inherit` ("vision", "decoder") taken from the teacher; it shares the teacher's
    tokenizer and image normalization."""
    config = student_captioner_config(teacher.model.config, vision=vision, decoder=decoder)
    if seed is not None:
        torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    layer_maps = inherit_captioner_weights(model, teacher.model, inherit)
    if layer_maps:
        logger.info("captioning student inherits teacher layers %s", layer_maps)
    return BlipCaptioner(model, teacher.tokenizer, teacher.image_mean, teacher.image_std)


def save_blip_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: InputSpec,
    out_dir: str | os.PathLike,
    metadata: Optional[dict[str, Any]] = None,
) -> Path:
    """Write an HF BLIP folder (any BLIP head: config, safetensors weights, `tokenizer`, a BLIP image processor
    config of `spec`'s size and normalization, and `vldistill.json` when `metadata` is given) to `out_dir`,
    atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        BlipImageProcessorPil(
            size={"height": spec.image_size, "width": spec.image_size},
            image_mean=list(spec.image_mean),
            image_std=list(spec.image_std),
        ).save_pretrained(tmp)
        if metadata is not None:
            write_metadata(tmp, metadata)
    return out_dir


def load_blip_captioner(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[BlipCaptioner, PreTrainedTokenizerBase]:
    """A BLIP captioning folder or hub id as a BlipCaptioner with its folder's image normalization, and the
    tokenizer it holds (`attentions` is accepted as every loader's is: BLIP always computes attention
    eagerly, so its maps are available)."""
    model = BlipCaptioner.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, model.tokenizer
