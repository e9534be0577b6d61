"""The retrieval table: recall at every K both ways for every model with a retrieval record, and how the
test set was scored."""

from __future__ import annotations

from typing import Optional, Sequence

from vldistill.report.markup import escape, number, paragraph, table
from vldistill.report.run import Run
from vldistill.report.section import Section, model_label

TASK = "zeroshot_retrieval"
DIRECTIONS = (("image_retrieval_recall", "T->I"), ("text_retrieval_recall", "I->T"))
MODEL_ORDER = ("teacher", "student", "baseline", "scratch")


def recall_ks(records: Sequence[dict]) -> list[int]:
    """Every K any record reports, ascending."""
    ks = set()
    for record in records:
        for key in record["metrics"]:
            prefix, _, k = key.rpartition("@")
            if prefix in dict(DIRECTIONS) and k.isdigit():
                ks.add(int(k))
    return sorted(ks)


def _ordered(names: Sequence[str]) -> list[str]:
    return [n for n in MODEL_ORDER if n in names] + sorted(n for n in names if n not in MODEL_ORDER)


def retrieval_section(runs: Sequence[Run]) -> Optional[Section]:
    """One table row per model and run with a retrieval record: R@K text->image and image->text."""
    found = [(run, name, run.results[name][TASK]) for run in runs for name in _ordered(list(run.results))
             if TASK in run.results[name]]
    if not found:
        return None
    ks = recall_ks([record for _, _, record in found])
    header = ["model", "images", "captions", "hits", *(f"{label} R@{k}" for _, label in DIRECTIONS for k in ks)]
    rows = [
        [model_label(run, name, runs), number(record.get("images")), number(record.get("captions")),
         str(record.get("retrieval_match", "pair")),
         *(number(record["metrics"].get(f"{key}@{k}")) for key, _ in DIRECTIONS for k in ks)]
        for run, name, record in found
    ]
    note = paragraph(
        "T->I: a caption retrieves its image among the test images (image_retrieval_recall@K); I->T: an image "
        "retrieves one of its captions. hits: pair (only the paired item counts) or identical_caption (an item "
        "with the same caption counts too).", class_="note",
    )
    return Section("retrieval", "Retrieval recall at K", escape([table(header, rows, id_="retrieval"), note]))
