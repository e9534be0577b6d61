"""Quantization results (`vldistill quantize`: the report of `export.quantize.QuantizeReport.as_dict`, from
`quantize.json` / `quantization.json` or the `quantization` entry of a quantized folder's vldistill.json):
fp32 and the int8 candidates measured together, and the accuracy gate's verdict."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Markup, escape, number, paragraph, table, tag
from vldistill.report.run import Run
from vldistill.report.section import Section, run_heading


def verdict(report: Mapping[str, Any]) -> str:
    """The gate's decision in words: the candidate's acc1 drop against the allowed drop, accepted or refused."""
    drop, allowed = report.get("acc1_drop"), report.get("max_drop")
    if not isinstance(drop, (int, float)) or not isinstance(allowed, (int, float)):
        return f"{report.get('candidate', 'candidate')}: no accuracy gate recorded"
    outcome = "accepted" if report.get("accepted") else "REFUSED (nothing written)"
    return (f"{report.get('candidate')}: acc1 {drop * 100:+.2f} points below fp32 (allowed {allowed * 100:.2f}): "
            f"{outcome}")


def quantize_block(report: Mapping[str, Any], title: str, id_: str) -> list[Markup]:
    """The figures of one quantization report, its notes and verdict."""
    header = ["model", "params", "acc1", "T->I R@1", "I->T R@1", "latency b1 ms p50 / p95", "speed-up b1",
              "images/s", "speed-up batch", "size KB"]
    rows = []
    for name, m in (report.get("figures") or {}).items():
        size = m.get("size_bytes")
        p50, p95 = number(m.get("latency_ms_p50"), 3), number(m.get("latency_ms_p95"), 3)
        rows.append([
            name, number(m.get("params")), number(m.get("acc1")), number(m.get("image_retrieval_recall@1")),
            number(m.get("text_retrieval_recall@1")), f"{p50.text} / {p95.text}", number(m.get("latency_speedup"), 2),
            number(m.get("images_per_second"), 0), number(m.get("throughput_speedup"), 2),
            number(size / 1024 if isinstance(size, (int, float)) else None, 1),
        ])
    cls = "ok" if report.get("accepted") else "refused"
    return [
        tag("h4", f"{title}: method {report.get('method', '?')}"),
        table(header, rows, id_=id_),
        *(paragraph(note, class_="note") for note in report.get("notes") or [] if isinstance(note, str)),
        paragraph(verdict(report), class_=cls),
    ]


def quantize_section(runs: Sequence[Run]) -> Optional[Section]:
    """Every quantization report of every run."""
    body: list[Markup] = []
    index = 0
    for run in runs:
        if not run.quantizations:
            continue
        body.append(run_heading(run, runs))
        for where, report in run.quantizations.items():
            body += quantize_block(report, where, "quantization" if index == 0 else f"quantization-{index}")
            index += 1
    if not index:
        return None
    return Section("quantization", "Quantization (int8, gated by accuracy)", escape(body))
