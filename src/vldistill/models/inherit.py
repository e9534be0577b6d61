"""TinyCLIP-style weight inheritance: initialize a student from a subset of the teacher's weights.

Layers: student layer i takes teacher layer `layer_map[i]` (by default every k-th layer, ending at
the last one). Channels: every student tensor takes the leading slice of the matching teacher tensor
(first rows/columns), as in TinyCLIP's manual inheritance. A student deeper or wider than its
teacher, or one with another patch size, image size or vocabulary, cannot inherit: we say which.
"""

from __future__ import annotations

import re

import torch
from transformers import CLIPModel

from vldistill.models.spec import DualEncoderSpec
from vldistill.models.student import spec_from_clip_config

_LAYER_KEY = re.compile(r"^(?P<tower>text_model|vision_model)\.encoder\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer index for each student layer: every k-th layer (k = teacher/student, rounded up
    where it does not divide), the last one always included."""
    return [-(-(i + 1) * teacher_layers // student_layers) - 1 for i in range(student_layers)]


def check_inheritable(student: DualEncoderSpec, teacher: DualEncoderSpec, where: str = "student") -> None:
    """Raise ValueError naming the field when `student` cannot take its weights from `teacher`."""
    for tower in ("vision", "text"):
        s, t = getattr(student, tower), getattr(teacher, tower)
        for name in ("layers", "width"):
            if getattr(s, name) > getattr(t, name):
                raise ValueError(
                    f"{where}.{tower}.{name} = {getattr(s, name)} exceeds the teacher's {getattr(t, name)}; "
                    "weight inheritance needs a student no deeper or wider than its teacher "
                    "(turn inheritance off to train the student from scratch)"
                )
        if s.width * s.mlp_ratio > t.width * t.mlp_ratio + 1e-6:
            raise ValueError(
                f"{where}.{tower}.mlp_ratio gives an MLP of {int(s.width * s.mlp_ratio)} channels, more than the "
                f"teacher's {int(t.width * t.mlp_ratio)}; weight inheritance cannot widen layers"
            )
    if student.vision.patch_size != teacher.vision.patch_size:
        raise ValueError(
            f"{where}.vision.patch_size = {student.vision.patch_size} differs from the teacher's "
            f"{teacher.vision.patch_size}; the patch embedding cannot be inherited"
        )
    if student.projection_dim > teacher.projection_dim:
        raise ValueError(
            f"{where}.projection_dim = {student.projection_dim} exceeds the teacher's {teacher.projection_dim}"
        )


def _teacher_key(key: str, layer_maps: dict[str, list[int]]) -> str:
    match = _LAYER_KEY.match(key)
    if not match:
        return key
    index = layer_maps[match["tower"]][int(match["index"])]
    return f"{match['tower']}.encoder.layers.{index}.{match['rest']}"


def _leading_slice(source: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    if source.ndim != len(shape) or any(s > t for s, t in zip(shape, source.shape)):
        raise ValueError(f"cannot inherit {key}: student shape {tuple(shape)} vs teacher {tuple(source.shape)}")
    return source[tuple(slice(0, n) for n in shape)]


@torch.no_grad()
def inherit_weights(student: CLIPModel, teacher: CLIPModel) -> dict[str, int]:
    """Copy teacher weights into `student` (every k-th layer, leading channels); return counts of layers used."""
    student_spec, teacher_spec = spec_from_clip_config(student.config), spec_from_clip_config(teacher.config)
    check_inheritable(student_spec, teacher_spec)
    if student.config.vision_config.image_size != teacher.config.vision_config.image_size:
        raise ValueError("student and teacher image sizes differ; position embeddings cannot be inherited")
    if student.config.text_config.vocab_size != teacher.config.text_config.vocab_size:
        raise ValueError("student and teacher vocabularies differ; token embeddings cannot be inherited")
    layer_maps = {
        "vision_model": uniform_layer_map(student_spec.vision.layers, teacher_spec.vision.layers),
        "text_model": uniform_layer_map(student_spec.text.layers, teacher_spec.text.layers),
    }
    teacher_state = teacher.state_dict()
    new_state = {}
    for key, value in student.state_dict().items():
        source_key = _teacher_key(key, layer_maps)
        if source_key not in teacher_state:
            raise ValueError(f"cannot inherit {key}: the teacher has no {source_key}")
        new_state[key] = _leading_slice(teacher_state[source_key], value.shape, key).clone()
    student.load_state_dict(new_state)
    return {"vision_layers": len(layer_maps["vision_model"]), "text_layers": len(layer_maps["text_model"])}
