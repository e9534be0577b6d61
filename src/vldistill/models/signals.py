"""What a model's forward pass returns: named signals, and how each kind of signal travels.

A model (teacher or student) returns `Signals`: a mapping from signal name to value, e.g. `image_embeds`
(B, D) or `text_hidden_states` (a tuple of per-layer (B, N, W) tensors). Each name is a `SignalKind`
registered in `SIGNALS`, which declares everything the rest of vldistill does with that kind:

- `request`: the forward keyword that makes a model produce it (None: always produced);
- `concat`: how several micro-batches' values become one batch's (gradient accumulation);
- `gather`: how the value of every process is collected (None: it stays local, e.g. layer-wise
  signals whose per-sample losses DDP's averaging makes global);
- `combine`: how several teachers' values become one virtual teacher's (teachers/ensemble.py), given the
  ensemble's per-sample weights; `primary_only` kinds come from the first teacher, so only it is asked;
- `cache_field` / `cache_width`: the field a per-sample signal is stored under in the teacher cache
  (`teacher{k}/<cache_field>`) and its width for a given model (None: that model does not produce it),
  with `cache_dtype` (None: the cache's float dtype), `cache_rows` (the value as one row per sample, given
  the batch's cache rows; default: the value's rows flattened) and `cache_read` (the value from those rows;
  default: as they are); or `cache_meta`: a per-model scalar read off the model into the cache's meta.
  Neither: the cache cannot hold the kind (`cache_refusal` says why), and a loss that needs it runs the
  teachers online.

A loss names the signals it needs (`DistillLoss.needs`). Adding a kind (an ITM score, a decoder's
token distribution, a cross-attention map) is one `register_signal(SignalKind(...))` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from vldistill.distributed import all_gather_rows, gathering
from vldistill.registry import Registry


@dataclass(frozen=True)
class EnsembleWeights:
    """Per-sample teacher weights of an ensemble, (K, B) each and summing to 1 over teachers: `image` for
    image rows (image->text logits, image embeddings), `text` for text rows."""

    image: torch.Tensor
    text: torch.Tensor


Concat = Callable[[Sequence[Any]], Any]
Gather = Callable[[Any, bool], Any]
Combine = Callable[[Sequence[Any], EnsembleWeights], Any]


@dataclass(frozen=True)
class SignalKind:
    """One kind of signal a model may return and how it is concatenated, gathered, combined and cached
    (see the module doc)."""

    name: str
    description: str
    concat: Concat
    combine: Combine
    gather: Optional[Gather] = None
    request: Optional[str] = None
    primary_only: bool = False
    cache_field: Optional[str] = None
    cache_width: Optional[Callable[[Any], Optional[int]]] = None
    cache_meta: Optional[Callable[[Any], Optional[float]]] = None
    cache_dtype: Optional[str] = None
    cache_rows: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None
    cache_read: Optional[Callable[[torch.Tensor], Any]] = None
    cache_refusal: str = "which a cache cannot hold"

    def to_cache_rows(self, value: Any, rows: torch.Tensor) -> torch.Tensor:
        """The value of a batch whose samples sit at cache `rows` (B,) as (B, width) rows to store."""
        if self.cache_rows is not None:
            return self.cache_rows(value, rows)
        return value.float().reshape(len(rows), -1)

    def from_cache_rows(self, stored: torch.Tensor) -> Any:
        """The signal value of a batch from its (B, width) stored rows (None: the batch carries it instead)."""
        return stored if self.cache_read is None else self.cache_read(stored)


SIGNALS: Registry = Registry("signal")


def register_signal(kind: SignalKind) -> SignalKind:
    """Register `kind` under its name (an error if the name is taken) and return it."""
    SIGNALS.register(kind.name)(kind)
    return kind


class Signals(Mapping[str, Any]):
    """The named signals of one forward pass (or of a combined teacher). Every name must be a registered
    `SignalKind`; values that are None are left out. Registered kinds read as attributes (None when
    absent): `signals.image_embeds`."""

    def __init__(self, **values: Any) -> None:
        unknown = [name for name in values if name not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown signal {', '.join(unknown)}; registered signals: {', '.join(SIGNALS.names())}")
        self._values = {name: value for name, value in values.items() if value is not None}

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in SIGNALS:
            raise AttributeError(name)
        return self._values.get(name)

    def __repr__(self) -> str:
        return f"Signals({', '.join(self._values)})"

    def replace(self, **changes: Any) -> "Signals":
        """A copy with `changes` applied (a None value removes that signal)."""
        return Signals(**{**self._values, **changes})

    def logits_per_image(self) -> torch.Tensor:
        """(B, B) image->text logits: row i scores every text for image i (an ensemble's combined logits
        when it set them, else the scaled product of the embeddings)."""
        if "image_to_text_logits" in self._values:
            return self._values["image_to_text_logits"]
        return self.logit_scale * self.image_embeds @ self.text_embeds.t()

    def logits_per_text(self) -> torch.Tensor:
        """(B, B) text->image logits: row j scores every image for text j."""
        if "text_to_image_logits" in self._values:
            return self._values["text_to_image_logits"]
        return self.logits_per_image().t()


def request_flags(needs: frozenset[str], primary: bool = True) -> dict[str, bool]:
    """The forward keywords (e.g. `output_hidden_states=True`) that make a model produce the signals in
    `needs` (only those: a model is never handed a keyword of a kind it does not produce unless a loss needs
    that kind); for a non-primary ensemble member, only those of kinds combined from every teacher."""
    wanted = {
        SIGNALS.get(name).request
        for name in needs
        if name in SIGNALS and SIGNALS.get(name).request is not None and (primary or not SIGNALS.get(name).primary_only)
    }
    return {flag: True for flag in sorted(wanted)}


def concat_signals(outputs: Sequence[Signals]) -> Signals:
    """Several micro-batches' signals of one model as those of one batch, rows in the given order
    (gradient accumulation), each kind concatenated its own way."""
    if len(outputs) == 1:
        return outputs[0]
    return Signals(**{name: SIGNALS.get(name).concat([o[name] for o in outputs]) for name in outputs[0]})


def gather_signals(output: Signals, keep_grad: bool) -> Signals:
    """The signals with every gathered kind holding the rows of all processes (unchanged in one process)."""
    if not gathering():
        return output
    return Signals(**{
        name: SIGNALS.get(name).gather(value, keep_grad) if SIGNALS.get(name).gather is not None else value
        for name, value in output.items()
    })


def combine_signals(outputs: Sequence[Signals], weights: EnsembleWeights, **derived: Any) -> Signals:
    """One virtual teacher's signals from several teachers' on the same batch: each kind the first teacher
    returned, combined its own way (a kind combining to None is left out), plus `derived` signals the
    ensemble computed itself (its combined logits)."""
    combined = {name: SIGNALS.get(name).combine([o.get(name) for o in outputs], weights) for name in outputs[0]}
    return Signals(**combined, **derived)


# --- how values travel -------------------------------------------------------------------------------


def cat_rows(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample rows of several micro-batches, concatenated along the batch."""
    return torch.cat(list(values))


def first(values: Sequence[Any]) -> Any:
    """A per-model value (a logit scale): the first micro-batch's (all are the same model's)."""
    return values[0]


def primary(values: Sequence[Any], weights: EnsembleWeights) -> Any:
    """The first (primary) teacher's value."""
    return values[0]


def mean_of(values: Sequence[Any], weights: EnsembleWeights) -> Any:
    """The teachers' mean (a logit scale)."""
    return torch.stack(list(values)).mean()


def dropped(values: Sequence[Any], weights: EnsembleWeights) -> None:
    """No combined value: a per-teacher quantity the ensemble has no single version of (a logit bias)."""
    return None


def weighted_concat(embeds: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Concatenate unit vectors scaled by sqrt of per-sample weights (K, B) summing to 1: unit-norm rows."""
    return torch.cat([e * w.sqrt().unsqueeze(-1) for e, w in zip(embeds, weights)], dim=-1)


def padded_concat(token_dims: tuple[int, ...]) -> Concat:
    """Concatenation along the batch after zero-padding each of `token_dims` to the longest (text tokens
    of micro-batches padded to different lengths; the attention mask is 0 in the padding)."""

    def concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        longest = {dim: max(t.shape[dim] for t in tensors) for dim in token_dims}
        padded = []
        for tensor in tensors:
            pad = [0] * (2 * tensor.ndim)
            for dim, size in longest.items():  # F.pad lists (left, right) pairs from the last dimension
                pad[2 * (tensor.ndim - 1 - dim) + 1] = size - tensor.shape[dim]
            padded.append(F.pad(tensor, pad) if any(pad) else tensor)
        return torch.cat(padded)

    return concat


def layerwise(concat: Concat) -> Concat:
    """Per-layer tuples of several micro-batches, concatenated layer by layer with `concat`."""
    return lambda per_output: tuple(concat(list(layer)) for layer in zip(*per_output))


def refuse_concat(values: Sequence[Any]) -> Any:
    """Combined ensemble logits span one batch: concatenate each teacher's signals before combining."""
    raise ValueError("concatenate each teacher's own outputs before combining them into an ensemble")


def refuse_gather(value: Any, keep_grad: bool) -> Any:
    """Combined ensemble logits cannot be gathered: gather each teacher's signals before combining."""
    raise ValueError("gather the teachers' outputs before combining them into an ensemble")


# --- the registered kinds ----------------------------------------------------------------------------

LAYER_MAPS_REFUSAL = (
    "which a cache does not store: per-layer maps of every token take far more space per sample than the "
    "teacher's forward pass takes time"
)

for _tower in ("image", "text"):
    register_signal(SignalKind(
        name=f"{_tower}_embeds",
        description=f"(B, D) L2-normalized {_tower} embeddings",
        concat=cat_rows,
        gather=all_gather_rows,
        combine=lambda values, weights, tower=_tower: weighted_concat(values, getattr(weights, tower)),
        cache_field=_tower,
        cache_width=lambda model: model.embed_dim,
    ))
    register_signal(SignalKind(
        name=f"{_tower}_hidden_states",
        description=f"the {_tower} tower's per-layer hidden states (embeddings, layer 1..L), each (B, N, W)",
        concat=layerwise(padded_concat((1,) if _tower == "text" else ())),
        combine=primary,
        request="output_hidden_states",
        primary_only=True,
        cache_refusal=LAYER_MAPS_REFUSAL,
    ))
    register_signal(SignalKind(
        name=f"{_tower}_attentions",
        description=f"the {_tower} tower's per-layer attention probabilities, each (B, heads, N, N)",
        concat=layerwise(padded_concat((2, 3) if _tower == "text" else ())),
        combine=primary,
        request="output_attentions",
        primary_only=True,
        cache_refusal=LAYER_MAPS_REFUSAL,
    ))

register_signal(SignalKind(
    name="logit_scale",
    description="scalar, already exponentiated: multiply cosine similarities by it",
    concat=first,
    combine=mean_of,
    cache_meta=lambda model: float(model.logit_scale.detach()),
))
register_signal(SignalKind(
    name="logit_bias",
    description="SigLIP's learned bias, a constant shift of every logit (softmax-based losses ignore it)",
    concat=first,
    combine=dropped,
    cache_meta=lambda model: None if model.logit_bias is None else float(model.logit_bias.detach()),
))
register_signal(SignalKind(
    name="text_attention_mask",
    description="(B, N_text) 1 for real tokens, so text-token losses can ignore padding",
    concat=padded_concat((1,)),
    combine=primary,
))
for _direction in ("image_to_text", "text_to_image"):
    register_signal(SignalKind(
        name=f"{_direction}_logits",
        description=f"(B, B) {_direction.replace('_to_', '->')} logits of an ensemble whose combined logits are not "
        "the scaled product of its embeddings (teachers/ensemble.py)",
        concat=refuse_concat,
        gather=refuse_gather,
        combine=primary,
    ))


# What a dual encoder (CLIP, SigLIP, two-tower) can return: the kinds registered above. Other families
# register more (models/blip_signals.py); a loss that reads those cannot train a dual-encoder student.
DUAL_ENCODER_SIGNALS = frozenset(SIGNALS.names())


def tower_signals(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    vision,
    text,
    text_attention_mask: Optional[torch.Tensor],
    hidden_states: bool,
    attentions: bool,
    **extra: Any,
) -> Signals:
    """A dual encoder's signals from its two towers' HF outputs, keeping hidden states and attention maps
    only when they were requested; `extra` signals (a logit bias) as given."""
    return Signals(
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        logit_scale=logit_scale,
        image_hidden_states=vision.hidden_states if hidden_states else None,
        text_hidden_states=text.hidden_states if hidden_states else None,
        image_attentions=vision.attentions if attentions else None,
        text_attentions=text.attentions if attentions else None,
        text_attention_mask=text_attention_mask,
        **extra,
    )


def cached_per_sample() -> list[SignalKind]:
    """The kinds the teacher cache stores row by row (a field per teacher), in name order."""
    return [SIGNALS.get(name) for name in SIGNALS if SIGNALS.get(name).cache_field is not None]


def cached_per_model() -> list[SignalKind]:
    """The kinds the teacher cache keeps as one value per teacher in its meta, in name order."""
    return [SIGNALS.get(name) for name in SIGNALS if SIGNALS.get(name).cache_meta is not None]


def cacheable_signals() -> frozenset[str]:
    """Names of the kinds the teacher cache can hold (per-sample fields and per-model meta scalars)."""
    return frozenset(kind.name for kind in [*cached_per_sample(), *cached_per_model()])
