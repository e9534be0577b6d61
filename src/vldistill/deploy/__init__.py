"""Serving a distilled student: cascade inference (the student answers when confident, the teacher otherwise)
and the sweep that picks its threshold from measured accuracy and latency."""

from vldistill.deploy.cascade import CRITERIA, CascadeClassifier, CascadeOutput, ZeroShotModel, confidence
from vldistill.deploy.cascade_eval import evaluate_cascade, recommend, threshold_grid

__all__ = [
    "CRITERIA",
    "CascadeClassifier",
    "CascadeOutput",
    "ZeroShotModel",
    "confidence",
    "evaluate_cascade",
    "recommend",
    "threshold_grid",
]
