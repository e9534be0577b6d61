"""The sweep table (`ablation.json` of `vldistill sweep`): every run's student variant and size (for a module
ablation), losses and figures over seeds (ITM re-ranked R@1 when measured), the difference to the task losses
alone of the same student (marked where it exceeds the seed-to-seed spread) and its cost, with a chart."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from vldistill.export.model_card import describe_losses
from vldistill.report.markup import Cell, Markup, escape, figure, number, paragraph, table
from vldistill.report.plots import colour, new_figure, to_png
from vldistill.report.run import Run
from vldistill.report.section import METRIC_LABELS, SUMMARY_KEYS, Section, run_heading


def _mean_cell(record: dict[str, Any], key: str) -> Cell:
    """The mean over seeds, with ± half the spread when there were several seeds."""
    cell = number(record.get(key))
    spread = (record.get("spread") or {}).get(key)
    if len(record.get("per_seed") or ()) > 1 and isinstance(spread, (int, float)) and cell.value is not None:
        cell.text = f"{cell.text} ±{spread / 2:.3f}"
    return cell


def _delta_cell(record: dict[str, Any], key: str) -> Cell:
    """The difference to the task loss alone; `*` and bold where it exceeds the spread of either."""
    minus = (record.get("minus_task_loss") or {}).get(key)
    if not isinstance(minus, (int, float)):
        return Cell("-")
    beyond = bool((record.get("beyond_spread") or {}).get(key))
    return Cell(f"{minus:+.3f}{'*' if beyond else ''}", minus, class_="num beyond" if beyond else "num")


def metric_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The summary keys, then the further figures the sweep summarized (ITM re-ranked R@1) where measured."""
    summarized = dict.fromkeys(key for r in records for key in (r.get("spread") or {}))
    extra = [k for k in summarized if k not in SUMMARY_KEYS and any(r.get(k) is not None for r in records)]
    return [*SUMMARY_KEYS, *extra]


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _run_label(record: dict[str, Any]) -> str:
    """A run as the chart names it: `variant/run` in a module ablation, else the run."""
    return f"{record['variant']}/{record.get('name')}" if "variant" in record else str(record.get("name"))


def _params_cell(record: dict[str, Any]) -> Cell:
    """A student's parameters with their share of the teacher's: "21,072 (24.1%)"."""
    cell = number(record.get("params"))
    share = record.get("params_percent_of_teacher")
    if cell.value is not None and isinstance(share, (int, float)):
        cell.text = f"{cell.text} ({share:.1f}%)"
    return cell


def sweep_png(records: Sequence[dict[str, Any]]) -> bytes:
    """Grouped bars: each run's mean acc1 and R@1 both ways, error bars of half the seed spread."""
    fig = new_figure(max(6.4, 0.9 * len(records) + 2), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(SUMMARY_KEYS)
    for index, key in enumerate(SUMMARY_KEYS):
        xs = [i + (index - 1) * width for i in range(len(records))]
        values = [r.get(key) if isinstance(r.get(key), (int, float)) else 0.0 for r in records]
        errors = [((r.get("spread") or {}).get(key) or 0.0) / 2 for r in records]
        ax.bar(xs, values, width, yerr=errors, capsize=2, color=colour(index), label=METRIC_LABELS[key])
    ax.set_xticks(range(len(records)), [_run_label(r) for r in records], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over seeds")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return to_png(fig)


def _table(records: Sequence[dict[str, Any]], id_: str) -> Markup:
    keys = metric_keys(records)
    variants = any("variant" in r for r in records)
    header = [*(["variant", "params (% of teacher)"] if variants else []), "run", "losses", *(_label(k) for k in keys),
              *(f"{_label(k)} vs task loss" for k in keys), "seconds", "cost/step vs kd"]
    rows = [
        [*([str(r.get("variant")), _params_cell(r)] if variants else []),
         str(r.get("name")), describe_losses(r.get("losses") or {}), *(_mean_cell(r, k) for k in keys),
         *(_delta_cell(r, k) for k in keys), number(r.get("seconds"), 1), number(r.get("cost_vs_kd"), 2)]
        for r in records
    ]
    return table(header, rows, id_=id_)


def sweep_section(runs: Sequence[Run]) -> Optional[Section]:
    """Per sweep run folder: its settings, the table and the chart."""
    body: list[Markup] = []
    count = 0
    for index, run in enumerate(runs):
        ablation = run.ablation
        if not ablation or not ablation.get("runs"):
            continue
        records = ablation["runs"]
        settings = ", ".join(
            f"{label} {ablation[key]}" for key, label in (("steps", "steps"), ("train_pairs", "training pairs"),
                                                          ("seeds", "seeds"), ("inherit", "inherit"),
                                                          ("dataset", "dataset")) if key in ablation
        )
        students = ablation.get("students") or {}
        variants = f" ({len(students)} student variants: {', '.join(students)})" if students else ""
        body += [
            run_heading(run, runs),
            paragraph(f"{len(records)} runs from one teacher{variants}; {settings}."),
            _table(records, "sweep" if index == 0 else f"sweep-{index}"),
            paragraph("vs task loss: the run's mean minus that of the task loss alone (of the same student variant); "
                      "* where the difference "
                      "exceeds the seed-to-seed spread of either (with one seed no spread is measured).",
                      class_="note"),
            figure(sweep_png(records), f"sweep of {run.label}: mean figures per run"),
        ]
        count += 1
    if not count:
        return None
    return Section("sweep", "Sweep", escape(body), count)
