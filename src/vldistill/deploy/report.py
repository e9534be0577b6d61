"""A cascade sweep's outputs: `cascade.json` (the points), `cascade_summary.json` (student, teacher,
criterion, recommendation, how latency was measured), `cascade.png` (accuracy against latency) and a table."""

from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.figure import Figure

from vldistill.fileio import write_bytes_atomic, write_text_atomic

POINT_KEYS = ("threshold", "acc1", "teacher_call_rate", "mean_latency_ms")
POINTS_FILE, SUMMARY_FILE, PLOT_FILE = "cascade.json", "cascade_summary.json", "cascade.png"


def summary_record(result: dict) -> dict:
    """Everything of an `evaluate_cascade` result but its points (which go to POINTS_FILE, named here)."""
    return {key: value for key, value in result.items() if key != "points"} | {"points_file": POINTS_FILE}


def plot_cascade(result: dict) -> bytes:
    """A PNG of top-1 accuracy against mean latency per image: the cascade's points by threshold, the student
    and the teacher alone, the recommended point and the accuracy goal."""
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    axes = figure.add_subplot()
    points = result["points"]
    axes.plot([p["mean_latency_ms"] for p in points], [p["acc1"] for p in points], "o-", color="tab:blue",
              markersize=4, label=f"cascade ({result['criterion']}), by threshold")
    for role, marker, colour in (("student", "s", "tab:green"), ("teacher", "D", "tab:red")):
        alone = result[role]
        axes.plot([alone["mean_latency_ms"]], [alone["acc1"]], marker, color=colour, markersize=8, label=f"{role} alone")
    recommendation = result["recommendation"]
    axes.axhline(recommendation["goal_acc1"], color="grey", linestyle="--", linewidth=1,
                 label=f"goal: {result['target']:.0%} of the teacher's acc1")
    if recommendation["met"]:
        axes.plot([recommendation["mean_latency_ms"]], [recommendation["acc1"]], "*", color="tab:orange", markersize=14,
                  label=f"recommended: threshold {recommendation['threshold']:.3g}")
    latency = result["latency"]
    threads = f"{latency['threads']} thread" + ("s" if latency["threads"] != 1 else "")
    axes.set_xlabel(f"mean latency per image (ms; requests of {latency['batch_size']} images, {threads})")
    axes.set_ylabel("zero-shot top-1 accuracy")
    axes.set_title(f"student -> teacher cascade on {result['images']} images, {result['classes']} classes")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_cascade(result: dict, out_dir: str | Path) -> list[Path]:
    """Write `cascade.json`, `cascade_summary.json` and `cascade.png` into `out_dir` (atomically); their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [{key: point[key] for key in POINT_KEYS} for point in result["points"]]
    return [
        write_text_atomic(out / POINTS_FILE, json.dumps(points, indent=2) + "\n"),
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary_record(result), indent=2) + "\n"),
        write_bytes_atomic(out / PLOT_FILE, plot_cascade(result)),
    ]


def format_cascade(result: dict) -> str:
    """The sweep as a table (threshold, teacher calls, acc1, ms per image), the student and the teacher alone,
    the latency model's check and the recommendation."""
    lines = [f"cascade ({result['criterion']}) on {result['images']} images, {result['classes']} classes",
             f"{'threshold':>10} {'teacher calls':>14} {'acc1':>7} {'ms/image':>9}"]
    for point in result["points"]:
        lines.append(f"{point['threshold']:>10.4f} {point['teacher_call_rate']:>14.1%} {point['acc1']:>7.4f} "
                     f"{point['mean_latency_ms']:>9.3f}")
    for role in ("student", "teacher"):
        alone = result[role]
        lines.append(f"{role} alone ({alone['name']}): acc1 {alone['acc1']:.4f}, {alone['mean_latency_ms']:.3f} ms/image")
    latency = result["latency"]
    if latency["checks"]:
        errors = ", ".join(
            f"{check['teacher_call_rate']:.0%} calls {check['measured_ms']['median']:.3f} ms "
            f"(model {check['modelled_ms']:.3f}, {check['relative_error']:+.1%})" for check in latency["checks"]
        )
        lines.append(f"latency model vs the real cascade on {latency['images']} images in requests of "
                     f"{latency['batch_size']}: {errors}")
    recommendation = result["recommendation"]
    prefix = "recommendation" if recommendation["met"] else "no recommendation"
    lines.append(f"{prefix} (target {result['target']:.1%} of the teacher's acc1): {recommendation['message']}")
    return "\n".join(lines)
