"""BLIP teachers pretrained here (`teacher.family: blip`): the models, losses and fingerprints; train/runs.py
trains and saves them.

- The retrieval teacher is a `BlipForImageTextRetrieval` built from `teacher.model` (vision tower, text
  encoder, whose layers are also the fusion layers, and the ITC projection size), trained from scratch with
  BLIP's image-text contrastive and image-text matching losses (hard negatives sampled from in-batch
  similarity, as BLIP does).
- The captioning teacher is a `BlipForConditionalGeneration` with the vision tower of `teacher.model.vision`
  and a decoder of `teacher.model.decoder` (default: the text spec), trained with the captioning LM loss.

Both read the word tokenizer of CLIP teachers pretrained here (data/tokenizer.py): every text starts with its
BOS token, which the text encoder's first position reads as BLIP's [CLS] and the decoder as its [DEC] (it is
the decoder's bos_token_id), and ends with EOS, the decoder's sep token at which generation stops.

BLIP's vision config initializes the position and class embeddings with std 1e-10, so that a fresh tower sees
no patch positions; the teachers built here use 0.02 as every other layer does (NOTES.md, BLIP)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, PreTrainedTokenizerBase

from vldistill import __version__
from vldistill.binding import plain_digest
from vldistill.config import ExperimentConfig
from vldistill.data.bundle import DataBundle
from vldistill.models.blip import RETRIEVAL_ARCHITECTURE, BlipRetrievalEncoder
from vldistill.models.blip_caption import BlipCaptioner, blip_token_settings, captioner_config, tower_config
from vldistill.models.spec import DualEncoderSpec

VISION_INITIALIZER_RANGE = 0.02  # BLIP's default 1e-10 gives a fresh vision tower no position information
RETRIEVAL_LOSSES = {"clip": {"weight": 1.0}, "itm": {"weight": 1.0}}  # BLIP's ITC + ITM
CAPTIONING_LOSSES = {"lm": {"weight": 1.0}}  # BLIP's captioning cross-entropy (label smoothing 0.1)


def retrieval_config(
    spec: DualEncoderSpec, *, image_size: int, tokenizer: PreTrainedTokenizerBase, max_text_length: int
) -> BlipConfig:
    """A BlipConfig for a retrieval model of `spec` (vision tower over `image_size` images, text encoder of
    `max_text_length` positions with cross-attention in every layer, `projection_dim` ITC embeddings) reading
    `tokenizer`'s ids."""
    spec.validate("teacher.model")
    if image_size % spec.vision.patch_size:
        raise ValueError(
            f"data.image_size {image_size} is not divisible by teacher.model.vision.patch_size {spec.vision.patch_size}"
        )
    config = BlipConfig(
        vision_config={
            **tower_config(spec.vision),
            "image_size": image_size,
            "patch_size": spec.vision.patch_size,
            "initializer_range": VISION_INITIALIZER_RANGE,
        },
        text_config={
            **tower_config(spec.text),
            **blip_token_settings(tokenizer),
            "max_position_embeddings": max_text_length,
        },
        image_text_hidden_size=spec.projection_dim,
    )
    config.architectures = [RETRIEVAL_ARCHITECTURE]
    return config


def new_retrieval_teacher(
    cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, max_text_length: int
) -> BlipRetrievalEncoder:
    """A freshly initialized BLIP retrieval teacher of `teacher.model` over `data.image_size` images, holding
    `tokenizer` and drawing its ITM negatives with `cfg.seed` (seed the global RNG first for its weights)."""
    config = retrieval_config(
        cfg.teacher.model, image_size=cfg.data.image_size, tokenizer=tokenizer, max_text_length=max_text_length
    )
    return BlipRetrievalEncoder(BlipForImageTextRetrieval(config), tokenizer=tokenizer, itm_seed=cfg.seed)


def new_captioning_teacher(
    cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, max_text_length: int
) -> BlipCaptioner:
    """A freshly initialized BLIP captioning teacher: the vision tower of `teacher.model.vision` over
    `data.image_size` images and a decoder of `teacher.model.decoder` (default: `teacher.model.text`) of
    `max_text_length` positions, reading `tokenizer` (seed the global RNG first for its weights)."""
    vision = cfg.teacher.model.vision
    if cfg.data.image_size % vision.patch_size:
        raise ValueError(
            f"data.image_size {cfg.data.image_size} is not divisible by teacher.model.vision.patch_size {vision.patch_size}"
        )
    config = captioner_config(
        blip_token_settings(tokenizer),
        image_size=cfg.data.image_size,
        vision=vision,
        decoder=cfg.teacher.decoder_spec(),
        max_text_length=max_text_length,
    )
    config.vision_config.initializer_range = VISION_INITIALIZER_RANGE
    return BlipCaptioner(BlipForConditionalGeneration(config), tokenizer)


def _fingerprint(cfg: ExperimentConfig, data: DataBundle, role: str, modules: dict[str, Any]) -> str:
    payload = {
        "family": "blip",
        "role": role,
        "modules": modules,
        "train": asdict(cfg.teacher.train),
        "seed": cfg.seed,
        "data": data.fingerprint,
        "vldistill": __version__,
    }
    return plain_digest(payload)


def retrieval_fingerprint(cfg: ExperimentConfig, data: DataBundle) -> str:
    """Hash of everything that determines a BLIP retrieval teacher pretrained here: its vision tower, text
    encoder and projection size (not the captioning decoder), training, seed, data and version."""
    spec = cfg.teacher.model
    modules = {"vision": asdict(spec.vision), "text": asdict(spec.text), "projection_dim": spec.projection_dim}
    return _fingerprint(cfg, data, "retrieval", modules)


def captioning_fingerprint(cfg: ExperimentConfig, data: DataBundle) -> str:
    """Hash of everything that determines a BLIP captioning teacher pretrained here: its vision tower and
    decoder, training, seed, data and version."""
    modules = {"vision": asdict(cfg.teacher.model.vision), "decoder": asdict(cfg.teacher.decoder_spec())}
    return _fingerprint(cfg, data, "captioning", modules)
