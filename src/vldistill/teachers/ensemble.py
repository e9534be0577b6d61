"""Several teachers seen as one: their outputs combined into a single virtual teacher.

The combined teacher's image (text) embedding is the concatenation of the teachers' normalized
embeddings, each scaled by the square root of its weight for that sample, so it is unit-norm and
its dot products are the weighted means of the teachers' cosine similarities. Teachers may differ
in embedding size; the feature losses learn a projection to the concatenated size.

Its logits (what the soft-target losses read) depend on `method`:
- `fixed`: a fixed-weight mixture of the teachers' soft targets, log(sum_k w_k softmax(l_k)), row by
  row, as in multi-teacher KD (You et al., 2017, "Learning from Multiple Teacher Networks");
- `confidence`: the same mixture with per-sample weights softmax_k(-H_k), where H_k is teacher k's
  entropy on that row (lower entropy, more weight), as in confidence-aware multi-teacher KD
  (Zhang et al., 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation");
- `average`: the mean of the teachers' scaled similarity matrices, the ensemble of MobileCLIP
  (Vasu et al., 2024, "MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training").
Every other signal is combined as its kind declares (models/signals.py): hidden states and attention maps
(for the layer-wise losses) come from the first (primary) teacher, logit scales are averaged.

With `precision="bf16"` the teachers run as bfloat16 copies (weights cast, logit scale and bias kept exact; the
given modules stay as they are) and their signals are cast back to float32 before they are combined, so the
losses see float32.
Casting the weights measured slightly faster than autocast around the teachers' forward (README, "bf16 on CPU").
"""

from __future__ import annotations

import copy
import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vldistill.models.inputs import inputs_for
from vldistill.models.signals import (
    EnsembleWeights,
    Signals,
    combine_signals,
    concat_signals,
    gather_signals,
    request_flags,
)

COMBINE_METHODS = ("fixed", "confidence", "average")
ITM_LOGITS = "itm_logits"  # the one kind every teacher must compute on the primary teacher's pairs
TEACHER_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_combine_method(method: str) -> None:
    """Raise ValueError naming the known methods when `method` is not one of them."""
    if method not in COMBINE_METHODS:
        raise ValueError(f"unknown combine method {method!r}; known: {', '.join(COMBINE_METHODS)}")


def row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax distribution, (B,)."""
    return -(F.softmax(logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def confidence_weights(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, B) per-row teacher weights softmax over teachers of minus their row entropies."""
    return F.softmax(-torch.stack([row_entropy(l) for l in logits]), dim=0)


def mixture_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Row-wise log of the weighted mixture of softmaxes, log sum_k w_k softmax(l_k); weights (K, B)."""
    log_probs = torch.stack([F.log_softmax(l, dim=-1) for l in logits])
    return torch.logsumexp(log_probs + weights.clamp_min(1e-12).log().unsqueeze(-1), dim=0)


def check_teacher_precision(precision: str) -> None:
    """Raise ValueError naming the known precisions when `precision` is not one of them."""
    if precision not in TEACHER_PRECISIONS:
        raise ValueError(f"unknown teacher precision {precision!r}; known: {', '.join(TEACHER_PRECISIONS)}")


def as_float32(value):
    """A signal's value with its floating-point tensors in float32 (tuples and lists element by element)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(as_float32(v) for v in value)
    return value


def cast_inputs(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model inputs with their floating-point tensors (pixel values) in `dtype`; token ids and masks as they are."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def low_precision_copy(teacher: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `teacher` with its floating-point weights in `dtype`, except single numbers (a logit scale or
    bias), which stay exact so the teacher's temperature is not rounded."""
    low = copy.deepcopy(teacher)
    for tensor in itertools.chain(low.parameters(), low.buffers()):
        if tensor.is_floating_point() and tensor.numel() > 1:
            tensor.data = tensor.data.to(dtype)
    return low


def combine_outputs(outputs: Sequence[Signals], method: str, weights: Sequence[float]) -> Signals:
    """One virtual teacher output from several teachers' outputs on the same batch (see module doc)."""
    if len(outputs) == 1:
        return outputs[0]
    check_combine_method(method)
    batch = outputs[0].image_embeds.shape[0]
    i2t = [o.logits_per_image() for o in outputs]
    t2i = [o.logits_per_text() for o in outputs]
    if method == "confidence":
        image_w, text_w = confidence_weights(i2t), confidence_weights(t2i)
    else:
        w = torch.tensor(weights if method == "fixed" else [1.0] * len(outputs), dtype=i2t[0].dtype, device=i2t[0].device)
        image_w = text_w = (w / w.sum()).unsqueeze(-1).expand(-1, batch)
    if method == "average":
        image_to_text = torch.stack(i2t).mean(dim=0)
        text_to_image = image_to_text.t()
    else:
        image_to_text, text_to_image = mixture_logits(i2t, image_w), mixture_logits(t2i, text_w)
    return combine_signals(
        outputs,
        EnsembleWeights(image=image_w, text=text_w),
        image_to_text_logits=image_to_text,
        text_to_image_logits=text_to_image,
    )


class TeacherEnsemble(nn.Module):
    """Frozen teachers run without gradients on their own inputs from a batch, combined into one output.

    `input_keys[k]` names teacher k's inputs in the batch ("" for the unprefixed, student-shared ones;
    see models.inputs.inputs_for). A single teacher is an ensemble of one (its output unchanged).
    `precision` ("fp32" or "bf16") is what the teachers run in (see the module doc); their signals are
    float32 either way.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        input_keys: Optional[Sequence[str]] = None,
        method: str = "fixed",
        weights: Optional[Sequence[float]] = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        check_combine_method(method)
        check_teacher_precision(precision)
        self.precision = precision
        if precision != "fp32":
            teachers = [low_precision_copy(teacher, TEACHER_PRECISIONS[precision]) for teacher in teachers]
        self.teachers = nn.ModuleList(teachers)
        self.input_keys = list(input_keys) if input_keys is not None else [""] * len(teachers)
        self.weights = list(weights) if weights is not None else [1.0] * len(teachers)
        if not len(self.teachers) == len(self.input_keys) == len(self.weights):
            raise ValueError("teachers, input_keys and weights must have one entry per teacher")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {self.weights}")
        self.method = method
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def primary(self) -> nn.Module:
        """The first teacher: the student's tokenizer, image size and inherited weights come from it."""
        return self.teachers[0]

    @property
    def embed_dim(self) -> int:
        """Size of the combined embedding (the sum of the teachers' sizes, or the one teacher's)."""
        return sum(t.embed_dim for t in self.teachers) if len(self.teachers) > 1 else self.primary.embed_dim

    @torch.no_grad()
    def outputs(self, batch: dict[str, torch.Tensor], needs: frozenset[str] = frozenset()) -> list[Signals]:
        """Each teacher's own signals on its inputs, in float32: those that `needs` names, requested from the
        primary teacher and, for kinds combined over every teacher, from the others too. ITM logits are of the
        pairs the primary teacher chose: the others score the primary's `itm_negatives` (so their logits can
        be averaged row by row), and a teacher without an ITM head is a ValueError."""
        dtype = TEACHER_PRECISIONS[self.precision]
        outputs: list[Signals] = []
        for k, (teacher, key) in enumerate(zip(self.teachers, self.input_keys)):
            chosen = self._primary_choices(k, teacher, outputs, needs)
            inputs = cast_inputs(inputs_for(batch, key), dtype)
            outputs.append(teacher(**inputs, **request_flags(needs, primary=k == 0), **chosen))
        return [Signals(**{name: as_float32(value) for name, value in output.items()}) for output in outputs]

    @staticmethod
    def _primary_choices(k: int, teacher: nn.Module, earlier: list[Signals], needs: frozenset[str]) -> dict[str, torch.Tensor]:
        """What teacher `k` must be given to score the primary teacher's ITM pairs (nothing for the primary, or
        when no ITM is needed)."""
        if k == 0 or ITM_LOGITS not in needs:
            return {}
        if not getattr(teacher, "scores_itm", False):
            raise ValueError(
                f"teacher {k} of the ensemble ({type(teacher).__name__}) has no image-text matching head, but a loss "
                "needs the teachers' ITM logits: use teachers that all score ITM, or a single ITM teacher"
            )
        return {"itm_negatives": earlier[0].itm_negatives}

    @torch.no_grad()
    def gathered_outputs(self, batch: dict[str, torch.Tensor], needs: frozenset[str] = frozenset()) -> list[Signals]:
        """Each teacher's output on the batch (see `outputs`), its gathered signals holding every rank's rows."""
        return [gather_signals(output, keep_grad=False) for output in self.outputs(batch, needs)]

    def forward(self, batch: dict[str, torch.Tensor], needs: frozenset[str] = frozenset()) -> Signals:
        """The teachers' gathered outputs on the batch, combined."""
        return teacher_output_over(self, [batch], needs)


@torch.no_grad()
def teacher_output_over(teacher, batches: Sequence[dict[str, torch.Tensor]], needs: frozenset[str]) -> Signals:
    """The combined output of a `TeacherEnsemble` or `CachedTeacher` over several micro-batches taken as one
    batch (gradient accumulation): each teacher's gathered outputs concatenated in micro-batch order, then
    combined, so combined logits span the whole batch."""
    per_batch = [teacher.gathered_outputs(batch, needs) for batch in batches]
    return combine_outputs([concat_signals(parts) for parts in zip(*per_batch)], teacher.method, teacher.weights)
