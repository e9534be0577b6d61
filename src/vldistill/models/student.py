"""Build CLIP configs from tower specs, and smaller students that share a teacher's data interface."""

from __future__ import annotations

from typing import Optional

from transformers import CLIPConfig

from vldistill.models.spec import DualEncoderSpec, TowerSpec, tower_spec_from_config


def _tower_kwargs(tower: TowerSpec) -> dict:
    return {
        "hidden_size": tower.width,
        "intermediate_size": int(round(tower.width * tower.mlp_ratio)),
        "num_hidden_layers": tower.layers,
        "num_attention_heads": tower.heads,
        "hidden_act": "quick_gelu",
    }


def clip_config_from_spec(
    spec: DualEncoderSpec,
    *,
    image_size: int,
    vocab_size: int,
    max_text_length: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    vision_overrides: Optional[dict] = None,
    text_overrides: Optional[dict] = None,
) -> CLIPConfig:
    """A `CLIPConfig` for `spec` with the given image size and tokenizer (vocabulary and special ids);
    `*_overrides` set further tower fields (e.g. a teacher's `hidden_act` and `layer_norm_eps`)."""
    spec.validate("model")
    extra = [name for name in ("fusion", "decoder") if getattr(spec, name) is not None]
    if extra:
        raise ValueError(
            f"model.{extra[0]} is set, but a CLIP student has no {extra[0]} module (it applies to BLIP students); "
            f"remove student.model.{extra[0]}"
        )
    if image_size % spec.vision.patch_size:
        raise ValueError(f"image size {image_size} is not divisible by vision.patch_size {spec.vision.patch_size}")
    text_config = {
        **_tower_kwargs(spec.text),
        "vocab_size": vocab_size,
        "max_position_embeddings": max_text_length,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "projection_dim": spec.projection_dim,
        **(text_overrides or {}),
    }
    vision_config = {
        **_tower_kwargs(spec.vision),
        "image_size": image_size,
        "patch_size": spec.vision.patch_size,
        "projection_dim": spec.projection_dim,
        **(vision_overrides or {}),
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=spec.projection_dim)


INHERITED_TOWER_FIELDS = ("hidden_act", "layer_norm_eps")


def student_config_from_teacher(teacher_config: CLIPConfig, spec: DualEncoderSpec) -> CLIPConfig:
    """A student `CLIPConfig` with `spec`'s towers and the teacher's image size, tokenizer, activation
    and layer-norm epsilon (so inherited weights compute what they did in the teacher)."""
    text = teacher_config.text_config
    vision = teacher_config.vision_config
    return clip_config_from_spec(
        spec,
        image_size=teacher_config.vision_config.image_size,
        vocab_size=text.vocab_size,
        max_text_length=text.max_position_embeddings,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        vision_overrides={name: getattr(vision, name) for name in INHERITED_TOWER_FIELDS},
        text_overrides={name: getattr(text, name) for name in INHERITED_TOWER_FIELDS},
    )


def spec_from_clip_config(config: CLIPConfig) -> DualEncoderSpec:
    """Read back the tower spec of an existing `CLIPConfig` (e.g. a hub teacher's)."""
    return DualEncoderSpec(
        vision=tower_spec_from_config(config.vision_config, config.vision_config.patch_size),
        text=tower_spec_from_config(config.text_config),
        projection_dim=config.projection_dim,
    )


def student_config_for_tokens(spec: DualEncoderSpec, image_size: int, tokens: dict[str, int]) -> CLIPConfig:
    """A student `CLIPConfig` for a non-CLIP teacher: its image size and tokenizer settings
    (`text_token_settings()`: vocab_size, pad/bos/eos ids, max_position_embeddings)."""
    return clip_config_from_spec(
        spec,
        image_size=image_size,
        vocab_size=tokens["vocab_size"],
        max_text_length=tokens["max_position_embeddings"],
        pad_token_id=tokens["pad_token_id"],
        bos_token_id=tokens["bos_token_id"],
        eos_token_id=tokens["eos_token_id"],
    )
