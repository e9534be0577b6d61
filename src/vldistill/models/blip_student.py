"""Smaller BLIP students configured per module, and weight inheritance from a BLIP teacher.

A BLIP model (transformers' `BlipForImageTextRetrieval` or `BlipForConditionalGeneration`) has a ViT vision
tower and a BERT-style text transformer whose every layer holds self-attention, cross-attention to the
image tokens and an MLP: the retrieval model's text encoder embeds texts alone (ITC, cross-attention
skipped) and fuses them with the image (ITM) with the same layers; the captioning model's decoder is the
same kind of layer stack. A student is described per module by a `DualEncoderSpec`: `vision` (depth,
width, heads, MLP ratio, patch size), `text` (the text transformer: its depth is also the number of fusion
layers) and `projection_dim` (the ITC embedding size).

Inheritance follows models/inherit.py (TinyCLIP's manual inheritance): student layer i of each module takes
the teacher's layer `uniform_layer_map(...)[i]` (every k-th, ending at the last), and every tensor its
leading channels; the vision tower's fused qkv projection is sliced per q, k and v.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from transformers import BlipConfig, PreTrainedModel

from vldistill.models.common import square_image_size
from vldistill.models.inherit import check_inheritable, uniform_layer_map
from vldistill.models.spec import DualEncoderSpec, tower_spec_from_config

# Per-layer keys of every BLIP module: vision_model.encoder.layers.N..., text_encoder.encoder.layer.N...,
# text_decoder.bert.encoder.layer.N... (the module is everything before the layer index).
_LAYER_KEY = re.compile(r"^(?P<module>.+\.encoder\.layers?)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Fields a student keeps from its teacher so inherited weights compute what they did in the teacher.
_KEPT_TOWER_FIELDS = ("hidden_act", "layer_norm_eps", "initializer_range")
_KEPT_TEXT_FIELDS = (
    "vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "is_decoder", "label_smoothing",
)


def spec_from_blip_config(config: BlipConfig) -> DualEncoderSpec:
    """The per-module spec of a BLIP config: vision tower, text transformer, ITC projection size."""
    vision, text = config.vision_config, config.text_config
    return DualEncoderSpec(
        vision=tower_spec_from_config(vision, square_image_size(vision.patch_size, where="the BLIP vision config's patch_size")),
        text=tower_spec_from_config(text),
        projection_dim=config.image_text_hidden_size,
    )


def blip_student_config(teacher: BlipConfig, spec: DualEncoderSpec) -> BlipConfig:
    """A student `BlipConfig` with `spec`'s modules (vision depth/width/heads/MLP, text transformer
    depth/width/heads/MLP, projection size) and the teacher's image size, tokenizer settings, activations,
    layer-norm epsilons and initializer ranges."""
    spec.validate("student")
    image_size = square_image_size(teacher.vision_config.image_size, where="the BLIP vision config")
    if image_size % spec.vision.patch_size:
        raise ValueError(
            f"the teacher's image size {image_size} is not divisible by "
            f"student.vision.patch_size {spec.vision.patch_size}"
        )
    vision, text = teacher.vision_config, teacher.text_config
    vision_config = {
        **{name: getattr(vision, name) for name in _KEPT_TOWER_FIELDS},
        "hidden_size": spec.vision.width,
        "intermediate_size": int(round(spec.vision.width * spec.vision.mlp_ratio)),
        "num_hidden_layers": spec.vision.layers,
        "num_attention_heads": spec.vision.heads,
        "image_size": image_size,
        "patch_size": spec.vision.patch_size,
    }
    text_config = {
        **{name: getattr(text, name) for name in (*_KEPT_TOWER_FIELDS, *_KEPT_TEXT_FIELDS)},
        "hidden_size": spec.text.width,
        "intermediate_size": int(round(spec.text.width * spec.text.mlp_ratio)),
        "num_hidden_layers": spec.text.layers,
        "num_attention_heads": spec.text.heads,
    }
    return BlipConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_text_hidden_size=spec.projection_dim,
        logit_scale_init_value=teacher.logit_scale_init_value,
        label_smoothing=teacher.label_smoothing,
        initializer_range=teacher.initializer_range,
        initializer_factor=teacher.initializer_factor,
    )


def _layer_counts(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of layers of each module (by key prefix) in a state dict."""
    indices: dict[str, set[int]] = defaultdict(set)
    for key in state:
        match = _LAYER_KEY.match(key)
        if match:
            indices[match["module"]].add(int(match["index"]))
    return {module: len(found) for module, found in indices.items()}


def _inherited(source: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """The leading channels of a teacher tensor in the student's `shape`; a fused qkv projection (its first
    dimension three stacked blocks) takes the leading channels of each block."""
    if source.ndim != len(shape) or any(s > t for s, t in zip(shape, source.shape)):
        raise ValueError(f"cannot inherit {key}: student shape {tuple(shape)} vs teacher {tuple(source.shape)}")
    if key.endswith((".qkv.weight", ".qkv.bias")):
        blocks = source.reshape(3, source.shape[0] // 3, *source.shape[1:])
        sliced = blocks[(slice(None), slice(0, shape[0] // 3), *(slice(0, n) for n in shape[1:]))]
        return sliced.reshape(shape)
    return source[tuple(slice(0, n) for n in shape)]


@torch.no_grad()
def inherit_blip_weights(student: PreTrainedModel, teacher: PreTrainedModel) -> dict[str, list[int]]:
    """Copy a BLIP teacher's weights into a student of the same class (every k-th layer of each module,
    leading channels); return each module's layer map (student layer i <- teacher layer map[i])."""
    if type(student) is not type(teacher):
        raise ValueError(f"a {type(student).__name__} student cannot inherit from a {type(teacher).__name__} teacher")
    check_inheritable(spec_from_blip_config(student.config), spec_from_blip_config(teacher.config))
    if student.config.vision_config.image_size != teacher.config.vision_config.image_size:
        raise ValueError("student and teacher image sizes differ; position embeddings cannot be inherited")
    for name in ("vocab_size", "max_position_embeddings"):
        if getattr(student.config.text_config, name) != getattr(teacher.config.text_config, name):
            raise ValueError(f"student and teacher text_config.{name} differ; text embeddings cannot be inherited")
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    teacher_layers = _layer_counts(teacher_state)
    layer_maps = {
        module: uniform_layer_map(layers, teacher_layers[module])
        for module, layers in _layer_counts(student_state).items()
    }
    new_state = {}
    for key, value in student_state.items():
        match = _LAYER_KEY.match(key)
        source_key = (
            f"{match['module']}.{layer_maps[match['module']][int(match['index'])]}.{match['rest']}" if match else key
        )
        if source_key not in teacher_state:
            raise ValueError(f"cannot inherit {key}: the teacher has no {source_key}")
        new_state[key] = _inherited(teacher_state[source_key], value.shape, key).clone()
    student.load_state_dict(new_state)
    return layer_maps
