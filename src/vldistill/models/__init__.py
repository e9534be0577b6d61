"""Dual encoders: the common interface, the HF CLIP adapter, student builder and weight inheritance."""

from vldistill.models import blip_signals  # noqa: F401  (registers the BLIP signal kinds)
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.contract import DualEncoder
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.two_tower import TwoTowerDualEncoder
from vldistill.models.inherit import check_inheritable, inherit_weights, uniform_layer_map
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec, TowerSpec
from vldistill.models.student import clip_config_from_spec, spec_from_clip_config, student_config_from_teacher

__all__ = [
    "CLIPDualEncoder",
    "DualEncoder",
    "SiglipDualEncoder",
    "TwoTowerDualEncoder",
    "load_dual_encoder_any",
    "Signals",
    "DualEncoderSpec",
    "TowerSpec",
    "check_inheritable",
    "clip_config_from_spec",
    "inherit_weights",
    "spec_from_clip_config",
    "student_config_from_teacher",
    "uniform_layer_map",
]
