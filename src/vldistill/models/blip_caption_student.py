"""BLIP captioning students configured per module (DLIP-style), with weight inheritance per module.

A student keeps its teacher's image size, vocabulary and special tokens, and takes its own vision tower and
text decoder shapes (`TowerSpec`: layers, width, heads, MLP ratio; None keeps the teacher's module as is),
and the teacher's other settings (activations, layer-norm epsilons, initializer ranges, label smoothing).
Each module named in `inherit` starts from the teacher's weights as models/inherit.py does for CLIP:
student layer i takes teacher layer `uniform_layer_map(...)[i]` (every k-th, the last one included), every
tensor the leading slice of the teacher's (BLIP's fused vision qkv projection sliced per q, k and v). A
module that is deeper or wider than the teacher's, or a vision tower with another patch size, cannot
inherit: the error names the field. Modules not inherited keep their random initialization.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional

import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from vldistill.models.blip_student import blip_student_config
from vldistill.models.common import square_image_size
from vldistill.models.inherit import uniform_layer_map
from vldistill.models.spec import DualEncoderSpec, TowerSpec, tower_spec_from_config

MODULES = ("vision", "decoder")
# Each module's parameter prefix and the pattern of its per-layer parameters.
_PREFIX = {"vision": "vision_model.", "decoder": "text_decoder."}
_LAYER_KEY = {
    "vision": re.compile(r"^(vision_model\.encoder\.layers\.)(\d+)(\..+)$"),
    "decoder": re.compile(r"^(text_decoder\.bert\.encoder\.layer\.)(\d+)(\..+)$"),
}
_FUSED_QKV = re.compile(r"self_attn\.qkv\.(weight|bias)$")


def captioner_modules(config: BlipConfig) -> dict[str, TowerSpec]:
    """The vision tower's and the decoder's shapes in a BLIP config, as TowerSpecs keyed by module."""
    vision, text = config.vision_config, config.text_config
    patch = square_image_size(vision.patch_size, where="the BLIP vision config")
    return {"vision": tower_spec_from_config(vision, patch), "decoder": tower_spec_from_config(text)}


def student_captioner_config(
    teacher: BlipConfig, *, vision: Optional[TowerSpec] = None, decoder: Optional[TowerSpec] = None
) -> BlipConfig:
    """The config of a student of `teacher`: its own `vision` tower and `decoder` shapes (None: the
    teacher's; a vision spec without patch size takes the teacher's), the teacher's image size, vocabulary,
    special tokens, caption length and other settings (models/blip_student.blip_student_config)."""
    modules = captioner_modules(teacher)
    vision = vision or modules["vision"]
    if vision.patch_size is None:
        vision = dataclasses.replace(vision, patch_size=modules["vision"].patch_size)
    decoder = decoder or modules["decoder"]
    vision.validate("student.vision")
    decoder.validate("student.decoder")
    spec = DualEncoderSpec(vision=vision, text=decoder, projection_dim=teacher.image_text_hidden_size)
    config = blip_student_config(teacher, spec)
    config.architectures = [BlipForConditionalGeneration.__name__]
    return config


def check_module_inheritable(student: BlipConfig, teacher: BlipConfig, module: str) -> None:
    """Raise ValueError naming the field when `module` of `student` cannot take the teacher's weights."""
    s, t = captioner_modules(student)[module], captioner_modules(teacher)[module]
    for name in ("layers", "width"):
        if getattr(s, name) > getattr(t, name):
            raise ValueError(
                f"student.{module}.{name} = {getattr(s, name)} exceeds the teacher's {getattr(t, name)}; weight "
                f"inheritance needs a module no deeper or wider than the teacher's (do not inherit {module})"
            )
    if round(s.width * s.mlp_ratio) > round(t.width * t.mlp_ratio):
        raise ValueError(
            f"student.{module}.mlp_ratio gives an MLP of {round(s.width * s.mlp_ratio)} channels, more than the "
            f"teacher's {round(t.width * t.mlp_ratio)}; weight inheritance cannot widen layers"
        )
    if module == "vision" and s.patch_size != t.patch_size:
        raise ValueError(
            f"student.vision.patch_size = {s.patch_size} differs from the teacher's {t.patch_size}; the patch "
            "and position embeddings cannot be inherited"
        )


def _leading_slice(source: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """The leading block of `source` of the student's `shape` (BLIP's fused qkv: the leading block of each
    of q, k and v)."""
    if _FUSED_QKV.search(key):
        parts = source.reshape(3, source.shape[0] // 3, *source.shape[1:])
        return _leading_slice(parts, torch.Size((3, shape[0] // 3, *shape[1:])), key + " (q, k, v)").reshape(shape)
    if source.ndim != len(shape) or any(s > t for s, t in zip(shape, source.shape)):
        raise ValueError(f"cannot inherit {key}: student shape {tuple(shape)} vs teacher {tuple(source.shape)}")
    return source[tuple(slice(0, n) for n in shape)]


@torch.no_grad()
def inherit_captioner_weights(
    student: BlipForConditionalGeneration, teacher: BlipForConditionalGeneration, modules: Iterable[str] = MODULES
) -> dict[str, list[int]]:
    """Copy the teacher's weights into the named `modules` of `student` (every k-th layer, leading
    channels); the teacher layer each student layer took, by module."""
    modules = list(modules)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise ValueError(f"unknown captioner module {', '.join(unknown)}; modules: {', '.join(MODULES)}")
    layer_maps = {}
    for module in modules:
        check_module_inheritable(student.config, teacher.config, module)
        layer_maps[module] = uniform_layer_map(
            captioner_modules(student.config)[module].layers, captioner_modules(teacher.config)[module].layers
        )
    teacher_state, new_state = teacher.state_dict(), student.state_dict()
    for key, value in new_state.items():
        module = next((m for m in modules if key.startswith(_PREFIX[m])), None)
        if module is None:
            continue
        match = _LAYER_KEY[module].match(key)
        source_key = f"{match[1]}{layer_maps[module][int(match[2])]}{match[3]}" if match else key
        if source_key not in teacher_state:
            raise ValueError(f"cannot inherit {key}: the teacher has no {source_key}")
        new_state[key] = _leading_slice(teacher_state[source_key], value.shape, key).clone()
    student.load_state_dict(new_state)
    return layer_maps
