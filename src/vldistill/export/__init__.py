"""Outputs the ecosystem reads: a student's Hugging Face folder, its `vldistill.json` and its model card."""

from vldistill.export.folder import export_student, write_card
from vldistill.export.model_card import student_card

__all__ = ["export_student", "student_card", "write_card"]
