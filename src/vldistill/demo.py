"""The end-to-end demo: teacher, distilled student and a no-distillation baseline, evaluated side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import load_data
from vldistill.fileio import write_text_atomic
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.report.model_card import student_card
from vldistill.train.runs import TrainedModel, obtain_teacher, train_student

TASK_LOSSES = {"clip": {"weight": 1.0}}


def retention(student: dict, teacher: dict) -> dict[str, float]:
    """Student figures as a percentage of the teacher's, for the summary keys."""
    return {key: 100.0 * student[key] / teacher[key] if teacher[key] else float("nan") for key in SUMMARY_KEYS}


def format_table(models: dict[str, dict]) -> str:
    """A fixed-width table of params, accuracy, R@1 both ways and throughput per model."""
    header = f"{'model':<10}{'params':>11}{'acc1':>8}{'T->I R@1':>10}{'I->T R@1':>10}{'img/s':>10}"
    rows = [
        f"{name:<10}{m['params']:>11,}{m['acc1']:>8.3f}{m['image_retrieval_recall@1']:>10.3f}"
        f"{m['text_retrieval_recall@1']:>10.3f}{m['images_per_second']:>10.0f}"
        for name, m in models.items()
    ]
    return "\n".join([header, *rows])


def _card(cfg: ExperimentConfig, student: TrainedModel, teacher: TrainedModel, summary: dict, data_name: str):
    metrics = {k: summary["student"][k] for k in SUMMARY_KEYS}
    return student_card(
        model_name=student.path.name,
        base_model=str(teacher.path),
        dataset=data_name,
        metrics=metrics,
        params=summary["student"]["params"],
        teacher_params=summary["teacher"]["params"],
        losses=cfg.distill.losses,
    )


def run_demo(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> dict:
    """Train (or reuse) a teacher, distill the student, train the same student without distillation,
    evaluate all three and write `summary.json`, results records and the student's model card."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    logs, results = out_dir / "logs", out_dir / "results"
    logs.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data = load_data(cfg.data, progress=progress)
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", logs)
    student = train_student(cfg, data, teacher, out_dir / "student", log_path=logs / "student.jsonl")
    baseline = train_student(
        cfg, data, teacher, out_dir / "baseline", losses=TASK_LOSSES, inherit=False,
        desc="baseline (no distillation)", log_path=logs / "baseline.jsonl",
    )
    models = {}
    for name, trained in (("teacher", teacher), ("student", student), ("baseline", baseline)):
        models[name] = evaluate_model(trained.model, trained.tokenizer, data, cfg.eval, name, results, progress)["summary"]
    summary = {
        "wall_seconds": time.perf_counter() - start,
        "models": models,
        "student_retention_percent": retention(models["student"], models["teacher"]),
        "student_minus_baseline": {k: models["student"][k] - models["baseline"][k] for k in SUMMARY_KEYS},
        "compression": models["teacher"]["params"] / models["student"]["params"],
        "image_speedup": models["student"]["images_per_second"] / models["teacher"]["images_per_second"],
        "train_seconds": {n: m.result.seconds for n, m in (("teacher", teacher), ("student", student), ("baseline", baseline)) if m.result},
        "retrieval_match": cfg.eval.retrieval_match,
        "dataset": data.name,
        "data_quality": data.quality.summary(),
    }
    card = _card(cfg, student, teacher, summary["models"], data.name)
    write_text_atomic(out_dir / "student" / "README.md", card.content)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    """Print the demo's table, retention and wall time."""
    print(format_table(summary["models"]))
    keep = summary["student_retention_percent"]
    print(
        f"student keeps {keep['acc1']:.1f}% of teacher acc1, {keep['image_retrieval_recall@1']:.1f}% / "
        f"{keep['text_retrieval_recall@1']:.1f}% of its T->I / I->T R@1, at {summary['compression']:.1f}x fewer "
        f"parameters and {summary['image_speedup']:.1f}x the image throughput"
    )
    gap = summary["student_minus_baseline"]
    print(
        f"distilled minus baseline: acc1 {gap['acc1']:+.3f}, T->I R@1 {gap['image_retrieval_recall@1']:+.3f}, "
        f"I->T R@1 {gap['text_retrieval_recall@1']:+.3f}  (retrieval hits: {summary['retrieval_match']})"
    )
    print(f"wall time: {summary['wall_seconds']:.1f} s")
