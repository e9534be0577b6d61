"""Architecture specs for dual-encoder towers: plain data, validated by the config loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TowerSpec:
    """One transformer tower: depth, width, heads, MLP ratio (and patch size for the image tower)."""

    layers: int = 2
    width: int = 64
    heads: int = 2
    mlp_ratio: float = 4.0
    patch_size: Optional[int] = None  # image tower only

    def validate(self, where: str) -> None:
        """Raise ValueError naming the field when the tower cannot be built."""
        for name in ("layers", "width", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"{where}.width ({self.width}) must be divisible by {where}.heads ({self.heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"{where}.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"{where}.patch_size must be >= 1, got {self.patch_size}")


@dataclass
class DualEncoderSpec:
    """A CLIP-style model: image tower, text tower, shared projection size; and, as BLIP-style models
    report them (`architecture_spec`), the fusion (image-grounded text) encoder and the captioning decoder
    the layer-wise losses map layers of (None: the model has no such module)."""

    vision: TowerSpec = field(default_factory=lambda: TowerSpec(patch_size=8))
    text: TowerSpec = field(default_factory=TowerSpec)
    projection_dim: int = 64
    fusion: Optional[TowerSpec] = None
    decoder: Optional[TowerSpec] = None

    def validate(self, where: str) -> None:
        """Raise ValueError naming the field when the model cannot be built."""
        self.vision.validate(f"{where}.vision")
        self.text.validate(f"{where}.text")
        if self.vision.patch_size is None:
            raise ValueError(f"{where}.vision.patch_size is required for the image tower")
        if self.text.patch_size is not None:
            raise ValueError(f"{where}.text.patch_size is not allowed: the text tower has no patches")
        if self.projection_dim < 1:
            raise ValueError(f"{where}.projection_dim must be >= 1, got {self.projection_dim}")
        for name in ("fusion", "decoder"):
            module = getattr(self, name)
            if module is not None:
                module.validate(f"{where}.{name}")
                if module.patch_size is not None:
                    raise ValueError(f"{where}.{name}.patch_size is not allowed: the {name} reads text tokens")


def tower_spec_from_config(tower: Any, patch_size: Optional[int] = None) -> TowerSpec:
    """The TowerSpec of a Hugging Face transformer tower config (CLIP, SigLIP or BLIP vision / text config:
    `num_hidden_layers`, `hidden_size`, `num_attention_heads`, `intermediate_size`), with `patch_size` for a
    vision tower."""
    return TowerSpec(
        layers=tower.num_hidden_layers,
        width=tower.hidden_size,
        heads=tower.num_attention_heads,
        mlp_ratio=tower.intermediate_size / tower.hidden_size,
        patch_size=patch_size,
    )
