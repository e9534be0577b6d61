"""The arms table: every model a run's `summary.json` lists (the demo's teacher, distilled student, baseline
without a teacher and scratch from random weights; distill's teacher and student; a sweep's runs), with their
accuracy, retrieval, size and speed, and how much of the teacher's figures each keeps (retention %)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Cell, Markup, escape, number, paragraph, signed, table, tag
from vldistill.report.run import Run
from vldistill.report.section import METRIC_LABELS, OPTIONAL_KEYS, SUMMARY_KEYS, Section, run_heading

ARM_ORDER = ("teacher", "student", "baseline", "scratch")
GAPS = (
    ("student_minus_baseline", "distilled student minus baseline (what the teacher added)"),
    ("baseline_minus_scratch", "baseline minus scratch (what inheriting the teacher's weights added)"),
)


def ordered_models(models: Mapping[str, Any]) -> list[str]:
    """The demo's arms in their order, then any other model in the order the summary lists them."""
    return [name for name in ARM_ORDER if name in models] + [name for name in models if name not in ARM_ORDER]


def shown_keys(runs: Sequence[Run]) -> tuple[str, ...]:
    """The summary figures every table shows, then the optional ones (OPTIONAL_KEYS) some run's models have
    (not null)."""
    present = {
        key for run in runs for figures in (run.summary.get("models") or {}).values()
        for key, value in figures.items() if value is not None
    }
    return (*SUMMARY_KEYS, *(key for key in OPTIONAL_KEYS if key in present))


def retention(
    figures: Mapping[str, Any], teacher: Optional[Mapping[str, Any]], keys: Sequence[str] = SUMMARY_KEYS
) -> dict[str, Optional[float]]:
    """Each of `keys` of a model as a percentage of the teacher's (None without a teacher or figure)."""
    kept = {}
    for key in keys:
        value, reference = figures.get(key), (teacher or {}).get(key)
        ok = isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference
        kept[key] = 100.0 * value / reference if ok else None
    return kept


def _rows(run: Run, several: bool, keys: Sequence[str]) -> list[list]:
    models = run.summary.get("models") or {}
    teacher = models.get("teacher")
    rows = []
    for name in ordered_models(models):
        figures = models[name]
        kept = retention(figures, teacher, keys) if name != "teacher" else {key: None for key in keys}
        row = [run.label] if several else []
        row += [
            Cell(name, class_="model"), number(figures.get("params")),
            *(number(figures.get(key)) for key in keys),
            number(figures.get("images_per_second"), 0),
            *(number(kept[key], 1) for key in keys),
        ]
        rows.append(row)
    return rows


def _facts(run: Run, keys: Sequence[str]) -> list[Markup]:
    """The summary's comparisons as sentences: the gaps between arms, compression, speed-up, training data."""
    summary = run.summary
    lines = []
    for key, label in GAPS:
        gap = summary.get(key)
        if isinstance(gap, dict):
            cells = ", ".join(f"{METRIC_LABELS[k]} {signed(gap.get(k)).text}" for k in keys if k in gap)
            lines.append(f"{label}: {cells}")
    if summary.get("scratch_is_baseline"):
        lines.append("the student does not inherit weights, so scratch is the baseline run")
    if isinstance(summary.get("compression"), (int, float)):
        lines.append(f"the student has {summary['compression']:.1f}x fewer parameters than the teacher")
    speedup = summary.get("image_speedup")
    if isinstance(speedup, dict) and isinstance(speedup.get("median"), (int, float)):
        spread = f" (p25-p75 {speedup['p25']:.2f}-{speedup['p75']:.2f})" if "p25" in speedup and "p75" in speedup else ""
        lines.append(f"student image throughput: {speedup['median']:.2f}x the teacher's{spread}")
    captions = summary.get("caption_speedup")
    if isinstance(captions, dict) and isinstance(captions.get("median"), (int, float)):
        lines.append(f"student captions per second: {captions['median']:.2f}x the teacher's "
                     f"(p25-p75 {captions['p25']:.2f}-{captions['p75']:.2f})")
    pairs = [f"{who} {summary[key]:,}" for key, who in (("teacher_train_pairs", "teacher"), ("student_train_pairs", "students"))
             if isinstance(summary.get(key), int)]
    if pairs:
        lines.append("training pairs: " + ", ".join(pairs))
    for key, label in (("dataset", "dataset"), ("retrieval_match", "retrieval hits"), ("seed", "seed")):
        if key in summary:
            lines.append(f"{label}: {summary[key]}")
    if isinstance(summary.get("wall_seconds"), (int, float)):
        lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return [tag("li", line) for line in lines]


def arms_section(runs: Sequence[Run]) -> Optional[Section]:
    """One table of every summarized model of every run, then each run's comparisons."""
    summarized = [run for run in runs if run.summary and run.summary.get("models")]
    if not summarized:
        return None
    several, keys = len(runs) > 1, shown_keys(summarized)
    header = (["run"] if several else []) + [
        "model", "params", *(METRIC_LABELS[k] for k in keys), "images/s",
        *(f"{METRIC_LABELS[k]} kept %" for k in keys),
    ]
    rows = [row for run in summarized for row in _rows(run, several, keys)]
    body: list[Markup] = [
        table(header, rows, id_="arms"),
        paragraph("kept %: the model's figure as a percentage of its run's teacher's. Throughput of the image "
                  "tower, measured with every model of the run in the same interleaved trials.", class_="note"),
    ]
    for run in summarized:
        facts = _facts(run, keys)
        if facts:
            body += [run_heading(run, runs), tag("ul", facts)]
    return Section("arms", "Arms: teacher, distilled student and baselines", escape(body))
