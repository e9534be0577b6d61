"""A section of the report: an anchor, a title, its HTML body and how many figures it embeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Markup, tag
from vldistill.report.run import Run

SUMMARY_KEYS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
# Figures some runs add (BLIP: ITM re-ranked retrieval and captioning), shown when a run's models have them.
OPTIONAL_KEYS = ("itm_image_retrieval_recall@1", "itm_text_retrieval_recall@1", "bleu4", "cider")
METRIC_LABELS = {
    "acc1": "acc1", "image_retrieval_recall@1": "T->I R@1", "text_retrieval_recall@1": "I->T R@1",
    "itm_image_retrieval_recall@1": "T->I R@1 (ITM)", "itm_text_retrieval_recall@1": "I->T R@1 (ITM)",
    "bleu4": "BLEU-4", "cider": "CIDEr-D",
}


@dataclass
class Section:
    """One section of the page; `figures` counts its embedded images."""

    id: str
    title: str
    body: Markup
    figures: int = 0


def run_heading(run: Run, runs: Sequence[Run]) -> Markup:
    """A sub-heading naming `run` when the report covers several runs (nothing for a single run)."""
    return tag("h3", f"run {run.label}") if len(runs) > 1 else Markup("")


def model_label(run: Run, name: str, runs: Sequence[Run]) -> str:
    """A model's name in a report over `runs`: prefixed with its run's label when there are several runs."""
    return f"{run.label}/{name}" if len(runs) > 1 else name


def lookup(data: Any, *keys: str) -> Any:
    """data[k1][k2]...; None where a level is missing or not a mapping (records of other versions may lack keys)."""
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def as_number(value: Any) -> Optional[float]:
    """`value` as a float when it is a number (not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
