"""The end-to-end demo: a teacher, the distilled student and two students trained without a teacher, each
arm changing one thing, evaluated side by side.

The arms:
- teacher: pretrained here on the whole training set (or reused when its config and data match);
- student: the configured student (inheriting the teacher's weights when `student.inherit`), distilled
  with `distill.losses` on the first `distill.train_pairs` pairs;
- baseline: the same student, same initialization, data, steps and seed, trained with the task loss
  alone and no teacher: the difference to `student` is what distillation did;
- scratch: the same, from random weights: the difference to `baseline` is what inheritance did
  (the same run as `baseline` when the student does not inherit).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import load_data
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.export import write_card
from vldistill.fileio import write_text_atomic
from vldistill.profile.environment import environment
from vldistill.profile.stats import ProfileSettings, format_profile, profile_targets, target_from_model
from vldistill.profile.throughput import speedup
from vldistill.report import write_run_report
from vldistill.train.runs import obtain_teacher, train_student
from vldistill.trained import TrainedModel

TASK_LOSSES = {"clip": {"weight": 1.0}}
ARMS = ("teacher", "student", "baseline", "scratch")


def retention(student: dict, teacher: dict, keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, float]:
    """Student figures as a percentage of the teacher's, for `keys` (NaN where the teacher's is 0)."""
    return {key: 100.0 * student[key] / teacher[key] if teacher[key] else float("nan") for key in keys}


def difference(a: dict, b: dict, keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, float]:
    """`a` minus `b` for `keys`."""
    return {key: a[key] - b[key] for key in keys}


def format_table(models: dict[str, dict]) -> str:
    """A fixed-width table of params, accuracy, R@1 both ways and throughput (median and p25-p75) per model."""
    header = f"{'model':<10}{'params':>11}{'acc1':>8}{'T->I R@1':>10}{'I->T R@1':>10}{'img/s (p25-p75)':>24}"
    rows = []
    for name, m in models.items():
        spread = f"({m['images_per_second_p25']:,.0f}-{m['images_per_second_p75']:,.0f})"
        rows.append(
            f"{name:<10}{m['params']:>11,}{m['acc1']:>8.3f}{m['image_retrieval_recall@1']:>10.3f}"
            f"{m['text_retrieval_recall@1']:>10.3f}{m['images_per_second']:>10,.0f} {spread:>13}"
        )
    return "\n".join([header, *rows])


def train_arms(
    cfg: ExperimentConfig,
    data,
    teacher: TrainedModel,
    out_dir: Path,
    logs: Path,
    progress: bool = True,
    task_losses: Mapping[str, Mapping[str, Any]] = TASK_LOSSES,
) -> dict[str, TrainedModel]:
    """The teacher and the three students of the demo trained from it (see the module docstring), the
    baseline and scratch arms with `task_losses` alone, saved in `out_dir` and logged to `logs`."""
    arms = {"teacher": teacher}
    arms["student"] = train_student(
        cfg, data, teacher, out_dir / "student", log_path=logs / "student.jsonl", progress=progress
    )
    arms["baseline"] = train_student(
        cfg, data, teacher, out_dir / "baseline", losses=task_losses,
        desc="baseline (same init, no teacher)", log_path=logs / "baseline.jsonl", progress=progress,
    )
    if cfg.student.inherit:
        arms["scratch"] = train_student(
            cfg, data, teacher, out_dir / "scratch", losses=task_losses, inherit=False,
            desc="scratch (random init, no teacher)", log_path=logs / "scratch.jsonl", progress=progress,
        )
    else:
        arms["scratch"] = arms["baseline"]
    return arms


def run_demo(cfg: ExperimentConfig, out_dir: Path, progress: bool = True, measure_memory: bool = True) -> dict:
    """Train (or reuse) a teacher, distill the student, train the same student without a teacher from the
    same and from random weights, evaluate all four, profile them side by side (`profile.stats`: parameters
    and FLOPs per tower, latency, throughput at `eval.throughput_batch_size`, peak memory in fresh processes
    unless not `measure_memory`, size on disk) and write `summary.json`, results records, the student's
    model card and `report.html`."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    logs, results = out_dir / "logs", out_dir / "results"
    logs.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data = load_data(cfg.data, progress=progress)
    arms = train_arms(cfg, data, obtain_teacher(cfg, data, out_dir / "teacher", logs, progress), out_dir, logs, progress)
    distinct = {name: trained for name, trained in arms.items() if name != "scratch" or cfg.student.inherit}
    models = {
        name: evaluate_model(
            trained.model, trained.tokenizer, data, cfg.eval, name, results, progress, throughput=False
        )["summary"]
        for name, trained in distinct.items()
    }
    profile = profile_targets(
        [target_from_model(name, trained.model, trained.tokenizer, trained.path) for name, trained in distinct.items()],
        ProfileSettings(batch_size=cfg.eval.throughput_batch_size, memory=measure_memory),
        progress,
    )
    measured = {name: figures.throughput["image"] for name, figures in profile.models.items()}
    for name, figures in profile.models.items():
        models[name].update(measured[name].as_dict())
        models[name]["profile"] = figures.as_dict()
    models.setdefault("scratch", models["baseline"])  # without inheritance, scratch is the baseline run
    summary = {
        "wall_seconds": time.perf_counter() - start,
        "models": models,
        "student_retention_percent": retention(models["student"], models["teacher"]),
        "student_minus_baseline": difference(models["student"], models["baseline"]),
        "baseline_minus_scratch": difference(models["baseline"], models["scratch"]),
        "compression": models["teacher"]["params"] / models["student"]["params"],
        "image_speedup": speedup(measured["student"], measured["teacher"]),
        "profile": {key: value for key, value in profile.as_dict().items() if key not in ("models", "environment")},
        "train_seconds": {name: m.result.seconds for name, m in distinct.items() if m.result},
        "teacher_train_pairs": len(data.train),
        "student_train_pairs": cfg.distill.train_pairs or len(data.train),
        "scratch_is_baseline": not cfg.student.inherit,
        "seed": cfg.seed,
        "environment": environment(),
        "retrieval_match": cfg.eval.retrieval_match,
        "dataset": data.name,
        "data_quality": data.quality.summary(),
    }
    write_card(arms["student"].path, {key: models["student"][key] for key in SUMMARY_KEYS}, data.name)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_report(out_dir)
    return summary


def format_summary(summary: dict) -> str:
    """The demo's report as text: its table, what distillation and inheritance changed, retention, the profile
    table and wall time."""
    lines = [format_table(summary["models"])]
    pairs = f"teacher trained on {summary['teacher_train_pairs']:,} pairs, students on {summary['student_train_pairs']:,}"
    lines.append(f"{pairs}; retrieval hits: {summary['retrieval_match']}")
    for label, key in (("distilled minus baseline (what the teacher added)", "student_minus_baseline"),
                       ("baseline minus scratch (what inheritance added)", "baseline_minus_scratch")):
        gap = summary[key]
        lines.append(
            f"{label}: acc1 {gap['acc1']:+.3f}, T->I R@1 {gap['image_retrieval_recall@1']:+.3f}, "
            f"I->T R@1 {gap['text_retrieval_recall@1']:+.3f}"
        )
    keep, fast = summary["student_retention_percent"], summary["image_speedup"]
    lines.append(
        f"student keeps {keep['acc1']:.1f}% of teacher acc1, {keep['image_retrieval_recall@1']:.1f}% / "
        f"{keep['text_retrieval_recall@1']:.1f}% of its T->I / I->T R@1, at {summary['compression']:.1f}x fewer "
        f"parameters and {fast['median']:.1f}x (p25-p75 {fast['p25']:.1f}-{fast['p75']:.1f}) the image throughput"
    )
    profile = {**summary["profile"], "models": {name: m["profile"] for name, m in summary["models"].items()}}
    lines.append(format_profile(profile))
    lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
