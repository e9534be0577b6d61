"""Accuracy against latency and against parameters, for every model of the runs: the models of each
`summary.json` (their latency from the run's profile when one was measured, else from their throughput) and
the fp32 / int8 / QAT models of quantization reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Markup, escape, figure, number, paragraph, table
from vldistill.report.plots import colour, new_figure, to_png
from vldistill.report.run import Run
from vldistill.report.section import Section, as_number, lookup, model_label

LATENCY = "image latency at batch 1 (p50, ms)"
PER_IMAGE = "ms per image at the throughput batch (1000 / images per second)"


@dataclass
class Point:
    """One model's figures as plotted; None where it was not measured."""

    label: str
    run: int
    params: Optional[int]
    acc1: Optional[float]
    recall: Optional[float]
    latency_ms: Optional[float]
    ms_per_image: Optional[float]


def _profile_latency(profile: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The batch-1 image latency (p50 ms) of one model's profile figures."""
    return as_number(lookup(profile, "latency", "image", "p50_ms"))


def _count(value: Any) -> Optional[int]:
    number = as_number(value)
    return None if number is None else round(number)


def _per_image(images_per_second: Any) -> Optional[float]:
    value = as_number(images_per_second)
    return 1000.0 / value if value else None


def run_points(run: Run, index: int, runs: Sequence[Run]) -> list[Point]:
    """The points of one run: its summarized models (scratch left out when it is the baseline run) and the
    models of its quantization reports."""
    profiled = {name: figures for profile in run.profiles.values() for name, figures in (profile.get("models") or {}).items()}
    points = []
    summary = run.summary or {}
    for name, figures in (summary.get("models") or {}).items():
        if name == "scratch" and summary.get("scratch_is_baseline"):
            continue
        latency = _profile_latency(figures.get("profile")) or _profile_latency(profiled.get(name))
        points.append(Point(
            model_label(run, name, runs), index, _count(figures.get("params")), as_number(figures.get("acc1")),
            as_number(figures.get("image_retrieval_recall@1")), latency, _per_image(figures.get("images_per_second")),
        ))
    for where, report in run.quantizations.items():
        for name, figures in (report.get("figures") or {}).items():
            points.append(Point(
                model_label(run, f"{where}: {name}", runs), index, _count(figures.get("params")),
                as_number(figures.get("acc1")), as_number(figures.get("image_retrieval_recall@1")),
                as_number(figures.get("latency_ms_p50")), _per_image(figures.get("images_per_second")),
            ))
    return points


def choose_speed(points: Sequence[Point]) -> tuple[str, str]:
    """The speed measure most points have: batch-1 latency, or per-image time at the throughput batch."""
    with_latency = sum(p.latency_ms is not None for p in points)
    with_throughput = sum(p.ms_per_image is not None for p in points)
    return ("latency_ms", LATENCY) if with_latency >= with_throughput else ("ms_per_image", PER_IMAGE)


def tradeoff_png(points: Sequence[Point], speed: str, speed_label: str, metric: str, metric_label: str) -> bytes:
    """Two panels: the metric against the speed measure, and against the parameter count (log scale); only the
    second when no model was timed. A colour per run when there are several, else per model."""
    timed = any(getattr(point, speed) is not None for point in points)
    fig = new_figure(10.0 if timed else 5.4, 4.4)
    speed_ax, params_ax = fig.subplots(1, 2, sharey=True) if timed else (None, fig.subplots())
    panels = [(speed_ax, speed, speed_label)] if timed else []
    several_runs = len({point.run for point in points}) > 1
    for ax, attribute, xlabel in (*panels, (params_ax, "params", "parameters")):
        for index, point in enumerate(points):
            x, y = getattr(point, attribute), getattr(point, metric)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], color=colour(point.run if several_runs else index), s=36, zorder=3)
            # labels of models at the same place (same size, same accuracy) are stacked, not drawn over each other
            ax.annotate(point.label, (x, y), textcoords="offset points", xytext=(4, 4 + 9 * (index % 4)), fontsize=7)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(True, alpha=0.3)
    params_ax.set_xscale("log")
    (speed_ax or params_ax).set_ylabel(metric_label)
    if timed:
        speed_ax.set_title(f"{metric_label} against speed", fontsize=10)
    params_ax.set_title(f"{metric_label} against size", fontsize=10)
    return to_png(fig)


def tradeoff_section(runs: Sequence[Run]) -> Optional[Section]:
    """The two trade-off plots and the table of their points; None when no model has an accuracy."""
    points = [point for index, run in enumerate(runs) for point in run_points(run, index, runs)]
    metric, metric_label = ("acc1", "zero-shot acc1") if any(p.acc1 is not None for p in points) else (
        "recall", "T->I R@1")
    points = [p for p in points if getattr(p, metric) is not None]
    if not points:
        return None
    speed, speed_label = choose_speed(points)
    missing = [p.label for p in points if getattr(p, speed) is None]
    caption = (f"{metric_label} against {speed_label} and against parameters" if len(missing) < len(points)
               else f"{metric_label} against parameters (no model was timed)")
    body: list[Markup] = [figure(tradeoff_png(points, speed, speed_label, metric, metric_label), caption)]
    if missing and len(missing) < len(points):
        body.append(paragraph(f"not on the speed plot (not timed): {', '.join(missing)}", class_="note"))
    rows = [[p.label, number(p.params), number(p.acc1), number(p.recall), number(p.latency_ms, 3),
             number(p.ms_per_image, 4)] for p in points]
    body.append(table(["model", "params", "acc1", "T->I R@1", "latency b1 ms (p50)", "ms/image at batch"], rows,
                      id_="tradeoff"))
    return Section("tradeoff", "Accuracy against latency and size", escape(body), 1)
