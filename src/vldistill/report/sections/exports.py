"""ONNX exports (`vldistill export`: the `onnx_pair.json` of an export folder): the graphs' agreement with
PyTorch and, with int8 graphs, the accuracy gate."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Cell, escape, number, table
from vldistill.report.run import Run
from vldistill.report.section import Section, lookup, model_label


def _diff(value: Any) -> Cell:
    return Cell(f"{value:.2g}", value, class_="num") if isinstance(value, (int, float)) else Cell("-")


def exports_section(runs: Sequence[Run]) -> Optional[Section]:
    """One row per export folder: precision, opset, source, max abs difference to PyTorch per graph, and the
    int8 gate (fp32 and int8 acc1, kept or refused) when int8 graphs were made."""
    rows = []
    for run in runs:
        for where, description in run.exports.items():
            int8 = description.get("int8") if isinstance(description.get("int8"), Mapping) else {}
            kept = None if not int8 else ("kept" if int8.get("accepted") else "refused")
            rows.append([
                model_label(run, where, runs), str(description.get("precision", "-")),
                str(description.get("opset", "-")), str(lookup(description, "source", "model") or "-"),
                _diff(lookup(description, "check", "max_abs_diff", "image")),
                _diff(lookup(description, "check", "max_abs_diff", "text")),
                number(lookup(int8, "fp32", "acc1")), number(lookup(int8, "int8", "acc1")), kept or "-",
            ])
    if not rows:
        return None
    header = ["folder", "precision", "opset", "source", "max |diff| image", "max |diff| text", "acc1 fp32",
              "acc1 int8", "int8 graphs"]
    return Section("exports", "ONNX exports", escape(table(header, rows, id_="exports")))
