"""Cascade results (`vldistill cascade-eval`: `cascade.json` points and `cascade_summary.json`): accuracy and
teacher call rate against mean latency per threshold, the student and the teacher alone, the recommendation."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Markup, escape, figure, number, paragraph, table, tag
from vldistill.report.plots import new_figure, to_png
from vldistill.report.run import Run
from vldistill.report.section import Section, as_number, model_label


def cascade_png(result: Mapping[str, Any]) -> bytes:
    """Top-1 accuracy against mean latency per image: the points by threshold, the student and teacher alone,
    the accuracy goal and the recommended threshold (those present in the result)."""
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    points = [p for p in result["points"] if as_number(p.get("mean_latency_ms")) is not None and as_number(p.get("acc1")) is not None]
    ax.plot([p["mean_latency_ms"] for p in points], [p["acc1"] for p in points], "o-", markersize=4, color="tab:blue",
            label=f"cascade ({result.get('criterion', '?')}), by threshold")
    for role, marker, colour in (("student", "s", "tab:green"), ("teacher", "D", "tab:red")):
        alone = result.get(role)
        if isinstance(alone, Mapping) and as_number(alone.get("mean_latency_ms")) is not None and as_number(alone.get("acc1")) is not None:
            ax.plot([alone["mean_latency_ms"]], [alone["acc1"]], marker, color=colour, markersize=8, label=f"{role} alone")
    recommendation = result.get("recommendation")
    if isinstance(recommendation, Mapping):
        if as_number(recommendation.get("goal_acc1")) is not None:
            ax.axhline(recommendation["goal_acc1"], color="grey", linestyle="--", linewidth=1, label="accuracy goal")
        if recommendation.get("met") and as_number(recommendation.get("mean_latency_ms")) is not None:
            ax.plot([recommendation["mean_latency_ms"]], [recommendation["acc1"]], "*", color="tab:orange",
                    markersize=14, label=f"recommended: threshold {recommendation['threshold']:.3g}")
    ax.set_xlabel("mean latency per image (ms)")
    ax.set_ylabel("zero-shot top-1 accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return to_png(fig)


def cascade_block(result: Mapping[str, Any], label: str, id_: str) -> list[Markup]:
    """The plot, the table of thresholds and the recommendation of one cascade sweep."""
    rows = [[number(p.get("threshold"), 4), number(_percent(p.get("teacher_call_rate")), 1), number(p.get("acc1"), 4),
             number(p.get("mean_latency_ms"), 3)] for p in result["points"]]
    blocks = [
        tag("h4", label),
        figure(cascade_png(result), f"{label}: accuracy against latency by threshold"),
        table(["threshold", "teacher calls %", "acc1", "ms/image"], rows, id_=id_),
    ]
    recommendation = result.get("recommendation")
    if isinstance(recommendation, Mapping) and recommendation.get("message"):
        blocks.append(paragraph(f"recommendation: {recommendation['message']}",
                                class_="ok" if recommendation.get("met") else "refused"))
    return blocks


def _percent(value: Any) -> Optional[float]:
    return 100.0 * value if isinstance(value, (int, float)) else None


def cascade_section(runs: Sequence[Run]) -> Optional[Section]:
    """Every cascade sweep found in the runs."""
    body: list[Markup] = []
    count = 0
    for run in runs:
        for where, result in run.cascades.items():
            label = model_label(run, "cascade" if where == "." else where, runs)
            body += cascade_block(result, label, "cascade" if count == 0 else f"cascade-{count}")
            count += 1
    if not count:
        return None
    return Section("cascade", "Cascade: student first, teacher on low confidence", escape(body), count)
