"""Training curves from the per-step logs (`logs/*.jsonl`, written by train/loop.py every `log_every` steps):
each loss component, what each contributes to the total (its weight times its value), the weights and
temperatures over time, and the learning rate."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from vldistill.report.markup import Markup, escape, figure, paragraph
from vldistill.report.plots import colour, new_figure, to_png
from vldistill.report.run import Run
from vldistill.report.section import Section, run_heading

LOG_ORDER = ("teacher", "student", "distill", "baseline", "scratch")  # the demo's and distill's logs first
SETTING_PREFIXES = ("weight/", "gap_ratio/", "log_variance/")


def series(records: Sequence[dict[str, Any]], prefix: str) -> dict[str, tuple[list[float], list[float]]]:
    """Name (after `prefix`) -> (steps, values) of every key starting with `prefix`, in first-seen order."""
    found: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                steps, values = found.setdefault(key[len(prefix):], ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return found


def contributions(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per loss component, its weight times its value at each logged step (what it adds to the total)."""
    found: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            name = key[len("loss/"):]
            if key.startswith("loss/") and name != "total" and f"weight/{name}" in record:
                steps, values = found.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(float(value) * float(record[f"weight/{name}"]))
    return found


def curves_png(records: Sequence[dict[str, Any]], title: str) -> bytes:
    """A 2x2 figure: the loss components and the total; their weighted contributions stacked; the weights
    (and gap ratios / log variances) with the temperatures on a second axis; the learning rate."""
    fig = new_figure(9.6, 6.0)
    fig.suptitle(title)
    (losses_ax, share_ax), (settings_ax, lr_ax) = fig.subplots(2, 2, sharex=True)
    losses = series(records, "loss/")
    for index, (name, (steps, values)) in enumerate(losses.items()):
        total = name == "total"
        losses_ax.plot(steps, values, color="black" if total else colour(index), linewidth=2 if total else 1.2,
                       label=name)
    positive = [v for _, values in losses.values() for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        losses_ax.set_yscale("log")
    losses_ax.set_title("loss components (unweighted) and total", fontsize=10)
    shares = contributions(records)
    if shares:
        steps = next(iter(shares.values()))[0]
        if all(s == steps for s, _ in shares.values()):
            share_ax.stackplot(steps, *[values for _, values in shares.values()], labels=list(shares),
                               colors=[colour(i) for i in range(len(shares))], alpha=0.8)
    share_ax.set_title("weight x loss: what each adds to the total", fontsize=10)
    for index, prefix in enumerate(SETTING_PREFIXES):
        for name, (steps, values) in series(records, prefix).items():
            settings_ax.plot(steps, values, label=f"{prefix}{name}", linestyle=("-", "--", ":")[index])
    temperatures = series(records, "temperature/")
    if temperatures:
        temperature_ax = settings_ax.twinx()
        for index, (name, (steps, values)) in enumerate(temperatures.items()):
            temperature_ax.plot(steps, values, color=colour(index + 5), linestyle="-.", label=f"temperature/{name}")
        temperature_ax.set_ylabel("temperature")
        temperature_ax.legend(fontsize=7, loc="lower right")
    settings_ax.set_title("loss weights and temperatures", fontsize=10)
    lr = [(record["step"], record["lr"]) for record in records if isinstance(record.get("lr"), (int, float))]
    if lr:
        lr_ax.plot(*zip(*lr), color="tab:grey")
    lr_ax.set_title("learning rate", fontsize=10)
    for ax in (losses_ax, share_ax, settings_ax, lr_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    settings_ax.set_xlabel("step")
    lr_ax.set_xlabel("step")
    return to_png(fig)


def log_order(names: Sequence[str]) -> list[str]:
    """The demo's and distill's logs in pipeline order, then the others (a sweep's runs) by name."""
    known = [name for name in LOG_ORDER if name in names]
    return known + sorted(name for name in names if name not in LOG_ORDER)


def describe_log(records: Sequence[dict[str, Any]]) -> str:
    """One line: the steps covered, the final total loss and the seconds the loop took to get there."""
    last = records[-1]
    total = last.get("loss/total")
    seconds = last.get("seconds")
    parts = [f"{len(records)} records, steps {records[0]['step']}-{last['step']}"]
    if isinstance(total, (int, float)):
        parts.append(f"final total loss {total:.4g}")
    if isinstance(seconds, (int, float)):
        parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)


def curves_section(runs: Sequence[Run]) -> Optional[Section]:
    """A figure per per-step log of every run."""
    blocks: list[Markup] = []
    count = 0
    for run in runs:
        logs = {name: records for name, records in run.logs.items() if records}
        if not logs:
            continue
        blocks.append(run_heading(run, runs))
        for name in log_order(list(logs)):
            records = logs[name]
            blocks.append(figure(curves_png(records, f"{name}"), f"{name}: {describe_log(records)}"))
            count += 1
    if not count:
        return None
    intro = paragraph(
        "From the per-step logs (logs/*.jsonl). loss/* are each component's unweighted value; the total is the sum "
        "of weight x loss (plus the log-variance terms under uncertainty weighting)."
    )
    return Section("curves", "Training curves", escape([intro, *blocks]), count)
