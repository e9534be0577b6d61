"""Hugging Face model cards for students: how a student was distilled (from its `vldistill.json` run
metadata) and, once it is evaluated, its measured metrics as a `model-index`."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vldistill.losses.schedules import describe_schedule

PIPELINE_TAG = "zero-shot-image-classification"
TAGS = ("vldistill", "knowledge-distillation")


@dataclass(frozen=True)
class CardKind:
    """What a card says of a student's HF class: what it is, how it loads, its pipeline and family tag."""

    what: str
    loads: str
    pipeline_tag: Optional[str]
    tag: str


CLIP_CARD = CardKind(
    "A CLIP-style dual encoder",
    "It loads with `transformers.CLIPModel.from_pretrained` and the `zero-shot-image-classification` pipeline",
    PIPELINE_TAG,
    "clip",
)
# By the HF class a student's config.json names (its vldistill.json `architecture`); CLIP when it names none.
CARD_KINDS = {
    "CLIPModel": CLIP_CARD,
    "BlipForImageTextRetrieval": CardKind(
        "A BLIP image-text retrieval model (contrastive embeddings and an image-text matching head)",
        "It loads with `transformers.BlipForImageTextRetrieval.from_pretrained`",
        None,
        "blip",
    ),
    "BlipForConditionalGeneration": CardKind(
        "A BLIP image captioning model (vision tower and text decoder)",
        "It loads with `transformers.BlipForConditionalGeneration.from_pretrained` and captions images with `generate()`",
        "image-to-text",  # the Hub's task of captioning models
        "blip",
    ),
}

CARD_TEMPLATE = """---
{card_data}
---

# {model_name}

{what} distilled with [vldistill](https://pypi.org/project/vldistill/) from
`{base_model}`. {loads}; no vldistill needed.

## How it was distilled

{facts}

## Evaluation

{evaluation}
"""


def describe_param(value: Any) -> str:
    """A loss parameter as card text: numbers and schedules as `describe_schedule` says, anything else as is."""
    if isinstance(value, Mapping) or (isinstance(value, Real) and not isinstance(value, bool)):
        return describe_schedule(value)
    return str(value)


def describe_losses(losses: Mapping[str, Mapping[str, Any]]) -> str:
    """The losses of a run as one line, e.g. "clip (weight 1), kd (weight 1, temperature cosine 5 -> 1)"."""
    parts = []
    for name, spec in losses.items():
        params = {"weight": spec.get("weight", 1.0), **{k: v for k, v in spec.items() if k != "weight"}}
        parts.append(f"{name} ({', '.join(f'{k} {describe_param(v)}' for k, v in params.items())})")
    return ", ".join(parts)


def _fact_lines(metadata: Mapping[str, Any]) -> list[str]:
    """The card's bullet list of training facts, one per metadata key present."""
    lines = [f"- Teacher: `{metadata.get('teacher')}`"]
    ensemble = metadata.get("ensemble") or []
    if ensemble:
        members = ", ".join(f"`{m['path']}` (weight {describe_param(m.get('weight', 1.0))})" for m in ensemble)
        lines.append(f"- Further teachers: {members}, combined by {metadata.get('combine')}")
    if metadata.get("teacher_cache"):
        lines.append(f"- Teacher signals read from the cache `{metadata['teacher_cache']}`")
    if "losses" in metadata:
        lines.append(f"- Losses: {describe_losses(metadata['losses'])}")
    weighting = metadata.get("weighting") or {}
    if weighting.get("kind", "fixed") != "fixed":
        lines.append(f"- Loss weighting: {weighting['kind']} (every {weighting.get('every')} steps)")
    if "train_pairs" in metadata:
        pairs = metadata["train_pairs"]
        lines.append(f"- Training pairs: {'all of a streamed source' if pairs is None else f'{pairs:,}'}")
    if "steps" in metadata:
        lines.append(f"- Steps: {metadata['steps']:,}")
    if "seed" in metadata:
        lines.append(f"- Seed: {metadata['seed']}")
    if "inherit" in metadata:
        init = "inherited from the teacher's layers" if metadata["inherit"] else "random"
        lines.append(f"- Initialization: {init}")
    if "params" in metadata:
        teacher = f" (teacher: {metadata['teacher_params']:,})" if "teacher_params" in metadata else ""
        lines.append(f"- Parameters: {metadata['params']:,}{teacher}")
    if "vldistill" in metadata:
        lines.append(f"- vldistill version: {metadata['vldistill']}")
    return lines


def task_type(metric: str) -> str:
    """The Hugging Face task a metric of ours belongs to: zero-shot classification, captioning or retrieval."""
    if metric.startswith(("bleu", "cider")):
        return "image-to-text"
    return PIPELINE_TAG if metric.startswith(("acc", "mean_per_class")) else "image-text-retrieval"


def student_card(
    metadata: Mapping[str, Any],
    model_name: str,
    metrics: Optional[Mapping[str, Optional[float]]] = None,
    dataset: Optional[str] = None,
) -> ModelCard:
    """A student's card from its run `metadata` (`vldistill.json`): `base_model` is the teacher, the body
    says how it was distilled, and the measured `metrics` on `dataset` (None values left out) fill a
    `model-index` and a table. Without metrics the card has no `model-index`."""
    measured = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
    if measured and not dataset:
        raise ValueError("a model card with metrics needs the dataset they were measured on")
    base_model = str(metadata.get("teacher"))
    kind = CARD_KINDS.get(metadata.get("architecture") or "CLIPModel", CLIP_CARD)
    eval_results = [
        EvalResult(task_type=task_type(key), dataset_type=dataset, dataset_name=dataset, metric_type=key,
                   metric_value=value)
        for key, value in measured.items()
    ]
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        pipeline_tag=kind.pipeline_tag,
        library_name="transformers",
        tags=list(dict.fromkeys([TAGS[0], kind.tag, *TAGS[1:], *metadata.get("losses", {})])),  # and the loss names
        eval_results=eval_results or None,
    )
    if measured:
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in measured.items())
        evaluation = f"Evaluated on {dataset}.\n\n| metric | value |\n|---|---|\n{rows}"
    else:
        evaluation = "Not evaluated yet: `vldistill eval` scores this folder."
    return ModelCard(
        CARD_TEMPLATE.format(
            card_data=data.to_yaml(),
            model_name=model_name,
            what=kind.what,
            base_model=base_model,
            loads=kind.loads,
            facts="\n".join(_fact_lines(metadata)),
            evaluation=evaluation,
        )
    )
