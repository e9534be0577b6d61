"""Layer-wise distillation of the modules' hidden states, and what the layer-wise losses share.

The modules a layer-wise loss selects (`towers`): `vision` and `text` of every dual encoder, and BLIP's
`fusion` (image-grounded text) encoder and captioning `decoder`, whose depth, width and heads the models
report in `architecture_spec()` (models/spec.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from vldistill.losses.base import LOSSES, HIDDEN_STATES, DistillLoss, LossContext
from vldistill.models.inherit import uniform_layer_map
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec, TowerSpec

TOWERS = ("vision", "text", "fusion", "decoder")
DEFAULT_TOWERS = ("vision", "text")
LAYER_MAPS = ("uniform", "last")
# Signals fields are named image_* / text_* / fusion_* / decoder_*.
OUTPUT_PREFIX = {"vision": "image", "text": "text", "fusion": "fusion", "decoder": "decoder"}
# Modules whose tokens are the text's (their padded positions are left out with text_attention_mask).
TEXT_TOKEN_MODULES = frozenset({"text", "fusion", "decoder"})


def check_modules(values: Any, allowed: tuple[str, ...], key: str) -> None:
    """Raise an error naming `key` unless `values` is a non-empty list of distinct names from `allowed`."""
    if (
        not isinstance(values, list) or not values or any(v not in allowed for v in values)
        or len(set(values)) != len(values)
    ):
        raise ValueError(f"{key} must be a non-empty list of distinct {' / '.join(allowed)}, got {values!r}")


def check_layer_map(value: Any, key: str) -> None:
    """Raise an error naming `key` unless `value` is one of LAYER_MAPS or a list of 1-based layer indices."""
    if value not in LAYER_MAPS and not is_layer_list(value):
        raise ValueError(
            f"{key} must be one of {', '.join(LAYER_MAPS)} or a non-empty list of 1-based "
            f"teacher layer indices, got {value!r}"
        )


def module_signals(modules: Any, kind: str) -> frozenset[str]:
    """The signals `<prefix>_<kind>` of the selected modules, with text_attention_mask when one of them
    reads text tokens."""
    names = {f"{OUTPUT_PREFIX[m]}_{kind}" for m in modules}
    return frozenset(names | ({"text_attention_mask"} if TEXT_TOKEN_MODULES & set(modules) else set()))


@dataclass
class LayerwiseParams:
    """Options of a layer-wise loss: the towers to distill (vision, text, fusion, decoder), and which
    teacher layer each student layer learns from: "uniform" (every k-th teacher layer, as weight
    inheritance picks them), "last" (the teacher's last k layers, k = student layers) or a list of
    1-based teacher layers, one per student layer. (`layer_map` is typed Any because it is a string or a list; `validate` checks it.)"""

    towers: list[str] = field(default_factory=lambda: list(DEFAULT_TOWERS))
    layer_map: Any = "uniform"

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        check_modules(self.towers, TOWERS, f"{where}.towers")
        check_layer_map(self.layer_map, f"{where}.layer_map")

    @property
    def modules(self) -> list[str]:
        """The selected modules (the YAML key is `towers`)."""
        return self.towers


def is_layer_list(value: Any) -> bool:
    """True for a non-empty list of ints >= 1 (1-based layer indices)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in value)
    )


def layer_pairs(
    layer_map: Any, student_layers: int, teacher_layers: int, where: str, tower: str
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, both 1-based (= hidden_states indices), one per student layer."""
    if layer_map == "uniform":
        return [(i + 1, t + 1) for i, t in enumerate(uniform_layer_map(student_layers, teacher_layers))]
    if layer_map == "last":
        if student_layers > teacher_layers:
            raise ValueError(
                f"{where}.layer_map = 'last' maps the student's {student_layers} {tower} layers onto the teacher's "
                f"last {student_layers}, but the teacher has only {teacher_layers}"
            )
        offset = teacher_layers - student_layers
        return [(i + 1, offset + i + 1) for i in range(student_layers)]
    if len(layer_map) != student_layers:
        raise ValueError(
            f"{where}.layer_map has {len(layer_map)} entries but the student's {tower} tower has {student_layers} "
            "layers; give one teacher layer per student layer (or select towers with equal depth)"
        )
    if max(layer_map) > teacher_layers:
        raise ValueError(
            f"{where}.layer_map = {layer_map} names a teacher layer beyond the teacher's {tower} tower "
            f"({teacher_layers} layers, indices 1..{teacher_layers})"
        )
    return [(i + 1, t) for i, t in enumerate(layer_map)]


def text_token_mask(student: Signals, teacher: Signals) -> Optional[torch.Tensor]:
    """(B, N) 1 for real text tokens (the student's mask, else the teacher's; both see the same batch)."""
    mask = student.text_attention_mask if student.text_attention_mask is not None else teacher.text_attention_mask
    return None if mask is None else mask.float()


class LayerwiseLoss(DistillLoss):
    """Base of the layer-wise losses: checks the specs and maps each selected module's layers at construction.

    `self.layer_pairs[tower]` lists (student layer, teacher layer), 1-based. Subclasses set `loss_name`
    (their registered name), `signal_kind` (the per-layer signal they read: `<prefix>_<signal_kind>`) and
    `_tower_loss`; their Params' `modules` are the selected modules; the loss is the mean over them.
    """

    loss_name: ClassVar[str]
    signal_kind: ClassVar[str]
    selection_key: ClassVar[str] = "towers"  # the YAML key selecting the modules, for error messages

    @classmethod
    def needs_for(cls, params: LayerwiseParams) -> frozenset[str]:
        """The per-layer signals of the selected modules (and the text mask when one reads text tokens)."""
        return module_signals(params.modules, cls.signal_kind)

    def __init__(self, params: LayerwiseParams, context: LossContext) -> None:
        super().__init__(params, context)
        self.config_key = f"{context.config_key}.{self.loss_name}"
        self.student_spec, self.teacher_spec = self._specs(context)
        self.layer_pairs = {
            tower: layer_pairs(
                params.layer_map,
                self.module_spec(tower, "student").layers,
                self.module_spec(tower, "teacher").layers,
                self.config_key,
                tower,
            )
            for tower in params.modules
        }

    def module_spec(self, module: str, role: str) -> TowerSpec:
        """The `role` model's ("student" / "teacher") spec of `module`; an error naming the key when it has none."""
        spec = getattr(self.student_spec if role == "student" else self.teacher_spec, module)
        if spec is None:
            raise ValueError(
                f"{self.config_key}.{self.selection_key} includes {module}, but the {role} model has no {module} "
                f"module (its architecture_spec().{module} is None); select only modules both models have"
            )
        return spec

    def _specs(self, context: LossContext) -> tuple[DualEncoderSpec, DualEncoderSpec]:
        if context.student_spec is None or context.teacher_spec is None:
            raise ValueError(
                f"{self.config_key} needs the student's and the teacher's tower specs (layers, widths, heads): "
                "build it with LossContext(student_spec=..., teacher_spec=...)"
            )
        return context.student_spec, context.teacher_spec

    def layer_outputs(self, output: Signals, tower: str, role: str) -> tuple[torch.Tensor, ...]:
        """The per-layer `signal_kind` signal of one module; a ValueError if absent."""
        kind = self.signal_kind
        values = getattr(output, f"{OUTPUT_PREFIX[tower]}_{kind}")
        if values is None:
            flag = "hidden_states" if kind == "hidden_states" else "attentions"
            raise ValueError(f"{self.config_key} needs the {role}'s {tower} {kind}; run it with output_{flag}=True")
        return values

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        parts = {f"{self.loss_name}_{tower}": self._tower_loss(tower, student, teacher) for tower in self.params.modules}
        loss = torch.stack(list(parts.values())).mean()
        return loss, {k: v.detach() for k, v in parts.items()}


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the features of the tokens where `mask` (B, N) is 1 (all when None)."""
    per_token = (student - teacher).pow(2).mean(dim=-1)
    return per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum()


@LOSSES.register("hidden")
class HiddenStateDistillation(LayerwiseLoss):
    """Hidden-representation distillation (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural
    Language Understanding"; for CLIP-style towers Kuang et al., 2023, "DLIP: Distilling
    Language-Image Pre-training"): per selected module (vision, text, BLIP's fusion encoder and
    captioning decoder), the MSE between each student layer's output
    hidden states and those of its mapped teacher layer (hidden_states[i] is layer i's output;
    [0], the embeddings, is not distilled), averaged over layers, then over towers.

    When the widths differ, a learnable bias-free linear map per mapped layer and tower (student width
    -> teacher width, TinyBERT's W_h) maps the student's states first. Text, fusion and decoder: padded
    text tokens are left out (text_attention_mask). Vision: if the token counts differ (another patch size), only the CLS token
    (index 0) is compared.
    """

    needs = HIDDEN_STATES
    loss_name = "hidden"
    signal_kind = "hidden_states"

    @dataclass
    class Params(LayerwiseParams):
        """This loss's options: the YAML keys beside `weight`."""
        pass

    def __init__(self, params: "HiddenStateDistillation.Params", context: LossContext) -> None:
        super().__init__(params, context)
        self.maps = nn.ModuleDict({tower: self._tower_maps(tower) for tower in params.modules})

    def _tower_maps(self, tower: str) -> nn.ModuleList:
        s_width, t_width = self.module_spec(tower, "student").width, self.module_spec(tower, "teacher").width
        return nn.ModuleList(
            nn.Identity() if s_width == t_width else nn.Linear(s_width, t_width, bias=False)
            for _ in self.layer_pairs[tower]
        )

    def _tower_loss(self, tower: str, student: Signals, teacher: Signals) -> torch.Tensor:
        s_states = self.layer_outputs(student, tower, "student")
        t_states = self.layer_outputs(teacher, tower, "teacher")
        mask = text_token_mask(student, teacher) if tower in TEXT_TOKEN_MODULES else None
        losses = []
        for (s_layer, t_layer), layer_map in zip(self.layer_pairs[tower], self.maps[tower]):
            s, t = s_states[s_layer], t_states[t_layer].detach()
            if tower == "vision" and s.shape[1] != t.shape[1]:
                s, t = s[:, :1], t[:, :1]
            losses.append(masked_mse(layer_map(s), t, mask))
        return torch.stack(losses).mean()
