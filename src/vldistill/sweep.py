"""Ablation sweep: the same student, data and steps distilled with each loss (alone, beside the task loss)
and with named combinations, all from one shared teacher, each over the same seeds; results in
`ablation.json`, with every run compared to the task loss alone (the same student without a teacher), and
the run folder's `summary.json`, result records and `report.html`."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import load_data
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.export import write_card
from vldistill.fileio import write_text_atomic
from vldistill.losses import LOSSES
from vldistill.models.signals import DUAL_ENCODER_SIGNALS
from vldistill.losses.schedules import describe_schedule
from vldistill.report import write_run_report
from vldistill.train.runs import obtain_teacher, train_student

TASK_LOSS = "clip"


def dual_encoder_losses() -> list[str]:
    """The registered losses a dual-encoder student (the sweep's CLIP student) can train with: those reading
    only signals a dual encoder returns (not BLIP's ITM or captioning signals)."""
    return [
        name for name in LOSSES.names()
        if LOSSES.get(name).needs | LOSSES.get(name).student_needs <= DUAL_ENCODER_SIGNALS
    ]


def sweep_runs(cfg: ExperimentConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Run name -> losses: the task loss alone, each selected loss with the task loss (a task loss such
    as siglip alone instead), then the named combinations."""
    runs: dict[str, dict[str, dict[str, Any]]] = {TASK_LOSS: {TASK_LOSS: {"weight": 1.0}}}
    for name in cfg.sweep.losses or dual_encoder_losses():
        if name == TASK_LOSS:
            continue
        params = {"weight": 1.0, **cfg.sweep.loss_params.get(name, {})}
        runs[name] = {name: params} if not LOSSES.get(name).needs else {TASK_LOSS: {"weight": 1.0}, name: params}
    runs.update({name: dict(losses) for name, losses in cfg.sweep.combinations.items()})
    return runs


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each summary key over seeds, its spread (max - min; 0 for one seed) and the mean seconds."""
    return {
        **{key: statistics.fmean(r[key] for r in per_seed) for key in SUMMARY_KEYS},
        "spread": {key: max(r[key] for r in per_seed) - min(r[key] for r in per_seed) for key in SUMMARY_KEYS},
        "seconds": statistics.fmean(r["seconds"] for r in per_seed),
        "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in per_seed),
    }


def compare_to(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """`record`'s mean minus `reference`'s for each summary key, and whether that difference is larger than
    the seed-to-seed spread of either (None with a single seed: no spread was measured)."""
    seeds = len(record["per_seed"])
    minus = {key: record[key] - reference[key] for key in SUMMARY_KEYS}
    beyond = {
        key: None if seeds < 2 else abs(minus[key]) > max(record["spread"][key], reference["spread"][key])
        for key in SUMMARY_KEYS
    }
    return {"minus_task_loss": minus, "beyond_spread": beyond}


def _cell(record: dict[str, Any], key: str) -> str:
    if len(record.get("per_seed", ())) < 2:
        return f"{record[key]:.3f}"
    return f"{record[key]:.3f} ±{record['spread'][key] / 2:.3f}"


def _delta(record: dict[str, Any]) -> str:
    if "minus_task_loss" not in record or record["name"] == TASK_LOSS:
        return "-"
    marks = [
        f"{record['minus_task_loss'][key]:+.3f}{'*' if record['beyond_spread'][key] else ''}" for key in SUMMARY_KEYS
    ]
    return " / ".join(marks)


def describe_loss(name: str, spec: dict[str, Any]) -> str:
    """A loss as the table shows it: its weight when not 1 ("2·feature") and its temperature when set
    ("kd (T=2)", "kd (T=cosine 5 -> 1)")."""
    weight = spec.get("weight", 1.0)
    text = name if weight == 1 else f"{describe_schedule(weight)}·{name}"
    if "temperature" in spec:
        text += f" (T={describe_schedule(spec['temperature'])})"
    return text


def format_ablation_table(records: list[dict]) -> str:
    """A Markdown table of the sweep: losses, metrics (mean ± half the spread over seeds when there are
    several), the difference to the task loss alone (* where it exceeds the spread), seconds per run and
    cost per step relative to `kd`."""
    lines = [
        "| run | losses | acc1 | T->I R@1 | I->T R@1 | vs clip alone (acc1 / T->I / I->T) | seconds | cost/step vs kd |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        losses = " + ".join(describe_loss(name, spec) for name, spec in r["losses"].items())
        relative = f"{r['cost_vs_kd']:.2f}" if r.get("cost_vs_kd") is not None else "-"
        lines.append(
            f"| {r['name']} | {losses} | {_cell(r, 'acc1')} | {_cell(r, 'image_retrieval_recall@1')} | "
            f"{_cell(r, 'text_retrieval_recall@1')} | {_delta(r)} | {r['seconds']:.1f} | {relative} |"
        )
    return "\n".join(lines)


def _with_comparisons(records: list[dict]) -> list[dict]:
    kd = next((r for r in records if r["name"] == "kd"), None)
    task = next((r for r in records if r["name"] == TASK_LOSS), None)
    for r in records:
        r["cost_vs_kd"] = r["seconds_per_step"] / kd["seconds_per_step"] if kd else None
        if task is not None:
            r.update(compare_to(r, task))
    return records


def run_sweep(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> dict:
    """Distill one student per sweep run and seed from a shared teacher, evaluate each and write
    `out_dir/ablation.json` after every run (so a stopped sweep keeps what it finished). Students are saved
    to `out_dir/runs/<run>/seed<seed>`, result records of the teacher and of each `<run>-seed<seed>` to
    `out_dir/results`; at the end `summary.json` (every model's figures) and `report.html`."""
    start_sweep = time.perf_counter()
    out_dir = Path(out_dir)
    data = load_data(cfg.data, progress=progress)
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", out_dir / "logs", progress)
    results_dir = out_dir / "results"
    models = {"teacher": evaluate_model(
        teacher.model, teacher.tokenizer, data, cfg.eval, "teacher", results_dir, progress, throughput=False
    )["summary"]}
    records: list[dict] = []
    result: dict = {}
    for name, losses in sweep_runs(cfg).items():
        per_seed = []
        for seed in cfg.sweep.seeds:
            seeded = dataclasses.replace(cfg, seed=seed)
            start = time.perf_counter()
            student = train_student(
                seeded, data, teacher, out_dir / "runs" / name / f"seed{seed}", losses=losses,
                desc=f"sweep {name} seed {seed}", log_path=out_dir / "logs" / f"{name}-seed{seed}.jsonl",
                progress=progress,
            )
            seconds = time.perf_counter() - start
            summary = evaluate_model(
                student.model, student.tokenizer, data, cfg.eval, f"{name}-seed{seed}", results_dir, progress,
                throughput=False,
            )["summary"]
            models[f"{name}-seed{seed}"] = summary
            write_card(student.path, {key: summary[key] for key in SUMMARY_KEYS}, data.name, f"{name}-seed{seed}")
            per_seed.append({
                "seed": seed,
                **{key: summary[key] for key in SUMMARY_KEYS},
                "seconds": seconds,
                "seconds_per_step": student.result.seconds / student.result.steps,
            })
        records.append({"name": name, "losses": losses, **summarize_seeds(per_seed), "per_seed": per_seed})
        result = {
            "dataset": data.name,
            "teacher": str(teacher.path),
            "steps": cfg.distill.train.steps,
            "train_pairs": cfg.distill.train_pairs or len(data.train),
            "seeds": cfg.sweep.seeds,
            "inherit": cfg.student.inherit,
            "retrieval_match": cfg.eval.retrieval_match,
            "runs": _with_comparisons(records),
        }
        write_text_atomic(out_dir / "ablation.json", json.dumps(result, indent=2) + "\n")
    summary = {
        "command": "sweep", "wall_seconds": time.perf_counter() - start_sweep, "models": models,
        **{key: result[key] for key in ("dataset", "teacher", "steps", "train_pairs", "seeds", "retrieval_match")},
    }
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_report(out_dir)
    return result
