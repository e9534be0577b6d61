"""Evaluation: zero-shot classification and retrieval of dual encoders, and result records."""

from vldistill.eval.embed import embed_images, embed_texts
from vldistill.eval.results import format_records, make_result, read_result, write_result
from vldistill.eval.retrieval import (
    evaluate_retrieval,
    positives_from_equivalent_captions,
    positives_from_identical_captions,
    positives_from_pairs,
    retrieval_metrics,
)
from vldistill.eval.zeroshot import classification_metrics, evaluate_zero_shot, zero_shot_classifier

__all__ = [
    "classification_metrics",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "format_records",
    "make_result",
    "positives_from_equivalent_captions",
    "positives_from_identical_captions",
    "positives_from_pairs",
    "read_result",
    "retrieval_metrics",
    "write_result",
    "zero_shot_classifier",
]
