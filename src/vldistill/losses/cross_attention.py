"""Layer-wise distillation of BLIP's cross-attention maps (text tokens attending to image tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vldistill.losses.attention import AttentionMapParams, attention_map_loss, check_heads
from vldistill.losses.base import LOSSES, LossContext
from vldistill.losses.hidden import LayerwiseLoss, check_layer_map, check_modules, module_signals, text_token_mask
from vldistill.models.signals import Signals

CROSS_ATTENTION_MODULES = ("fusion", "decoder")
DEFAULT_MODULES = ("fusion",)


@LOSSES.register("cross_attention")
class CrossAttentionDistillation(LayerwiseLoss):
    """Cross-attention map distillation (attention transfer as in Jiao et al., 2020, "TinyBERT", applied to
    the image-text cross-attention of BLIP's fusion encoder and captioning decoder as Kuang et al., 2023,
    "DLIP: Distilling Language-Image Pre-training", distil every module): per selected module (`modules`:
    fusion, decoder) and mapped layer (`layer_map` as `hidden`), the distance between the student's and the
    teacher's cross-attention probabilities (B, heads, N_text, N_image), averaged over layers, then modules.

    distance: "kl": KL(teacher || student) of each text token's distribution over the image tokens,
    averaged over the real text tokens; "mse": the squared error averaged over (real text token, image
    token) entries. heads: "average" (any head counts) or "match" (equal head counts). Padded text tokens
    (text_attention_mask) are left out; every image token is a key. The image-token axes must have equal
    length: the patch sizes may differ only where the patch grids (image size / patch size) are equal.
    """

    needs = module_signals(DEFAULT_MODULES, "cross_attentions")
    loss_name = "cross_attention"
    signal_kind = "cross_attentions"
    selection_key = "modules"

    @dataclass
    class Params(AttentionMapParams):
        """This loss's options: the YAML keys beside `weight`."""

        modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))
        layer_map: Any = "uniform"

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            check_modules(self.modules, CROSS_ATTENTION_MODULES, f"{where}.modules")
            check_layer_map(self.layer_map, f"{where}.layer_map")
            self.validate_maps(where)

    def __init__(self, params: "CrossAttentionDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        for module in params.modules:
            check_heads(self, module)

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        s_maps = self.layer_outputs(student, tower, "student")
        t_maps = self.layer_outputs(teacher, tower, "teacher")
        mask = text_token_mask(student, teacher)
        losses = []
        for s_layer, t_layer in self.layer_pairs[tower]:
            s, t = s_maps[s_layer - 1], t_maps[t_layer - 1]
            if s.shape[-1] != t.shape[-1]:
                raise ValueError(
                    f"{self.config_key}: the student's {tower} attends over {s.shape[-1]} image tokens but the "
                    f"teacher's over {t.shape[-1]}; cross-attention maps need equal patch grids (image size / patch size)"
                )
            losses.append(attention_map_loss(s, t, self.params, mask, None))
        return torch.stack(losses).mean()
