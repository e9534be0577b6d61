"""Hugging Face model cards for students, with their measured metrics as a `model-index`."""

from __future__ import annotations

from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vldistill.schedules import describe_schedule

CARD_TEMPLATE = """---
{card_data}
---

# {model_name}

A CLIP-style dual encoder distilled with [vldistill](https://pypi.org/project/vldistill/) from
`{base_model}`. It loads with `transformers.CLIPModel.from_pretrained` and the
`zero-shot-image-classification` pipeline; no vldistill needed.

- Parameters: {params:,} (teacher: {teacher_params:,})
- Distillation losses: {losses}
- Evaluated on: {dataset}

| metric | value |
|---|---|
{metric_rows}
"""


def student_card(
    model_name: str,
    base_model: str,
    dataset: str,
    metrics: dict[str, float],
    params: int,
    teacher_params: int,
    losses: dict,
    extra_tags: Optional[list[str]] = None,
) -> ModelCard:
    """A model card whose metadata names the teacher (`base_model`) and lists `metrics` in `model-index`."""
    eval_results = [
        EvalResult(
            task_type="zero-shot-image-classification" if key.startswith(("acc", "mean_per_class")) else "image-text-retrieval",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=key,
            metric_value=float(value),
        )
        for key, value in metrics.items()
    ]
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        pipeline_tag="zero-shot-image-classification",
        library_name="transformers",
        tags=["vldistill", "clip", "knowledge-distillation", *(extra_tags or [])],
        eval_results=eval_results,
    )
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    return ModelCard(
        CARD_TEMPLATE.format(
            card_data=data.to_yaml(),
            model_name=model_name,
            base_model=base_model,
            params=params,
            teacher_params=teacher_params,
            losses=", ".join(f"{k} (weight {describe_schedule(v.get('weight', 1.0))})" for k, v in losses.items()),
            dataset=dataset,
            metric_rows=rows,
        )
    )
