"""Ablation sweep: the same student, seed, data and steps distilled with each loss (alone, beside the
task loss) and with named combinations, all from one shared teacher; results in `ablation.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import load_data
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.fileio import write_text_atomic
from vldistill.losses import LOSSES
from vldistill.schedules import describe_schedule
from vldistill.train.runs import obtain_teacher, train_student

TASK_LOSS = "clip"


def sweep_runs(cfg: ExperimentConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Run name -> losses: the task loss alone, each selected loss with the task loss (a task loss such
    as siglip alone instead), then the named combinations."""
    runs: dict[str, dict[str, dict[str, Any]]] = {TASK_LOSS: {TASK_LOSS: {"weight": 1.0}}}
    for name in cfg.sweep.losses or LOSSES.names():
        if name == TASK_LOSS:
            continue
        params = {"weight": 1.0, **cfg.sweep.loss_params.get(name, {})}
        runs[name] = {name: params} if not LOSSES.get(name).needs else {TASK_LOSS: {"weight": 1.0}, name: params}
    runs.update({name: dict(losses) for name, losses in cfg.sweep.combinations.items()})
    return runs


def format_ablation_table(records: list[dict]) -> str:
    """A Markdown table of the sweep: losses, metrics, seconds and cost per step relative to `kd`."""
    lines = [
        "| run | losses | acc1 | T->I R@1 | I->T R@1 | seconds | cost/step vs kd |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        losses = " + ".join(
            n if (w := spec.get("weight", 1.0)) == 1 else f"{describe_schedule(w)}·{n}" for n, spec in r["losses"].items()
        )
        relative = f"{r['cost_vs_kd']:.2f}" if r.get("cost_vs_kd") is not None else "-"
        lines.append(
            f"| {r['name']} | {losses} | {r['acc1']:.3f} | {r['image_retrieval_recall@1']:.3f} | "
            f"{r['text_retrieval_recall@1']:.3f} | {r['seconds']:.1f} | {relative} |"
        )
    return "\n".join(lines)


def _with_cost_vs_kd(records: list[dict]) -> list[dict]:
    kd = next((r for r in records if r["name"] == "kd"), None)
    for r in records:
        r["cost_vs_kd"] = r["seconds_per_step"] / kd["seconds_per_step"] if kd else None
    return records


def run_sweep(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> dict:
    """Distill one student per sweep run from a shared teacher, evaluate each and write
    `out_dir/ablation.json` after every run (so a stopped sweep keeps what it finished)."""
    out_dir = Path(out_dir)
    data = load_data(cfg.data, progress=progress)
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", out_dir / "logs")
    records: list[dict] = []
    result: dict = {}
    for name, losses in sweep_runs(cfg).items():
        start = time.perf_counter()
        student = train_student(
            cfg, data, teacher, out_dir / "runs" / name, losses=losses, desc=f"sweep {name}",
            log_path=out_dir / "logs" / f"{name}.jsonl",
        )
        seconds = time.perf_counter() - start
        summary = evaluate_model(student.model, student.tokenizer, data, cfg.eval, name, progress=progress)["summary"]
        records.append({
            "name": name,
            "losses": losses,
            **{key: summary[key] for key in SUMMARY_KEYS},
            "seconds": seconds,
            "seconds_per_step": student.result.seconds / student.result.steps,
        })
        result = {
            "dataset": data.name,
            "teacher": str(teacher.path),
            "steps": cfg.distill.train.steps,
            "seed": cfg.seed,
            "retrieval_match": cfg.eval.retrieval_match,
            "runs": _with_cost_vs_kd(records),
        }
        write_text_atomic(out_dir / "ablation.json", json.dumps(result, indent=2) + "\n")
    return result
