"""Run folders written by hand for the report's tests, laid out as `vldistill demo` / `sweep` and the deployment
commands write them (config.yaml, logs/*.jsonl, summary.json, results/, ablation.json, profile.json,
quantize.json, cascade.json, an ONNX export's onnx_pair.json), with made-up but consistent figures. Seconds to
build, no training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from vldistill.config import load_config, packaged_config
from vldistill.eval.results import make_result, write_result

CLASSES = ["red circle", "blue square", "green cross", "red square", "blue circle", "green <b>star</b>"]
# Per class: samples, teacher hits, student hits (the student loses most on "green cross", then "red square").
CLASS_COUNTS = {"red circle": (4, 4, 4), "blue square": (4, 4, 3), "green cross": (5, 5, 1),
                "red square": (4, 4, 2), "blue circle": (3, 2, 3), "green <b>star</b>": (0, 0, 0)}
FIGURES = {
    "teacher": {"params": 863745, "acc1": 0.988, "image_retrieval_recall@1": 0.989, "text_retrieval_recall@1": 0.979,
                "images_per_second": 6781.4},
    "student": {"params": 126657, "acc1": 0.88, "image_retrieval_recall@1": 0.874, "text_retrieval_recall@1": 0.871,
                "images_per_second": 27652.4},
    "baseline": {"params": 126657, "acc1": 0.779, "image_retrieval_recall@1": 0.78, "text_retrieval_recall@1": 0.714,
                 "images_per_second": 28924.2},
    "scratch": {"params": 126657, "acc1": 0.721, "image_retrieval_recall@1": 0.225, "text_retrieval_recall@1": 0.186,
                "images_per_second": 29819.4},
}
KEYS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def log_records(steps: int, every: int, losses: dict[str, float], temperature: float | None = None) -> list[dict]:
    """Records as train/loop.py writes them: each loss decays from its start value, weights 1 except kd's,
    which grows from 0.5 to 1.5; kd's temperature anneals from `temperature` to 1."""
    records = []
    for step in range(every, steps + 1, every):
        progress = step / steps
        record = {"step": step, "seconds": round(0.05 * step, 3), "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * progress))}
        total = 0.0
        for name, start in losses.items():
            value = start * math.exp(-2 * progress)
            weight = 0.5 + progress if name == "kd" else 1.0
            record[f"loss/{name}"] = value
            record[f"part/{name}"] = value
            total += weight * value
        record["loss/total"] = total
        for name in losses:
            record[f"weight/{name}"] = 0.5 + progress if name == "kd" else 1.0
            if name == "kd" and temperature is not None:
                record["temperature/kd"] = temperature - (temperature - 1) * progress
        records.append(record)
    return records


def write_log(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def per_class(role: str) -> list[dict]:
    column = {"teacher": 1, "student": 2}[role]
    return [{"class": name, "samples": counts[0], "acc1": counts[column] / counts[0] if counts[0] else None}
            for name, counts in CLASS_COUNTS.items()]


def write_results(folder: Path, name: str, figures: dict, classes: bool = True) -> None:
    """The classification (with per-class figures for teacher and student) and retrieval records of a model."""
    recalls = {}
    for key in ("image_retrieval_recall", "text_retrieval_recall"):
        r1 = figures[f"{key}@1"]
        recalls.update({f"{key}@1": r1, f"{key}@5": min(1.0, r1 + 0.1), f"{key}@10": min(1.0, r1 + 0.15)})
    write_result(make_result("shapes", name, "zeroshot_retrieval", recalls, retrieval_match="identical_caption",
                             images=1000, captions=1000), folder / f"{name}_zeroshot_retrieval.json")
    if classes:
        extra = {"per_class": per_class(name)} if name in ("teacher", "student") else {}
        metrics = {"acc1": figures["acc1"], "acc5": 1.0, "mean_per_class_recall": figures["acc1"]}
        write_result(make_result("shapes", name, "zeroshot_classification", metrics, classes=len(CLASSES), **extra),
                     folder / f"{name}_zeroshot_classification.json")


def demo_summary() -> dict:
    teacher, student, baseline, scratch = (FIGURES[k] for k in ("teacher", "student", "baseline", "scratch"))
    return {
        "wall_seconds": 154.9,
        "models": FIGURES,
        "student_retention_percent": {k: 100 * student[k] / teacher[k] for k in KEYS},
        "student_minus_baseline": {k: student[k] - baseline[k] for k in KEYS},
        "baseline_minus_scratch": {k: baseline[k] - scratch[k] for k in KEYS},
        "compression": teacher["params"] / student["params"],
        "image_speedup": {"median": 3.96, "p25": 3.77, "p75": 4.08},
        "teacher_train_pairs": 20000,
        "student_train_pairs": 1000,
        "scratch_is_baseline": False,
        "seed": 0,
        "retrieval_match": "identical_caption",
        "dataset": "shapes",
    }


def make_demo_run(folder: Path) -> Path:
    """A demo run folder: config, the four arms' logs, summary.json and results."""
    cfg = load_config(packaged_config("tiny"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_log(folder / "logs" / "teacher.jsonl", log_records(1000, 50, {"clip": 2.9}))
    write_log(folder / "logs" / "student.jsonl", log_records(300, 50, {"clip": 1.8, "kd": 3.9, "feature": 0.48}, 4.0))
    for arm in ("baseline", "scratch"):
        write_log(folder / "logs" / f"{arm}.jsonl", log_records(300, 50, {"clip": 1.7}))
    write_json(folder / "summary.json", demo_summary())
    for name, figures in FIGURES.items():
        write_results(folder / "results", name, figures)
    return folder


def profile_record() -> dict:
    """A profile as `vldistill profile --out` writes it (profile.stats.Profile.as_dict)."""
    def model(params, flops, ms, ips):
        return {
            "path": None, "image_size": 32, "text_length": 32,
            "params": {"total": params, "image": params // 2, "text": params // 2, "shared": 1, "other": 0},
            "flops": {"image": flops, "text": flops // 2},
            "latency": {"image": {"p50_ms": ms, "p95_ms": ms * 1.2, "calls": 90},
                        "text": {"p50_ms": ms / 2, "p95_ms": ms * 0.6, "calls": 90}},
            "throughput": {"image": {"images_per_second": ips, "images_per_second_p25": ips * 0.9,
                                     "images_per_second_p75": ips * 1.1, "trials": 9},
                           "text": {"texts_per_second": ips * 2, "texts_per_second_p25": ips * 1.8,
                                    "texts_per_second_p75": ips * 2.2, "trials": 9}},
            "memory": {"process_peak_mb": 412.0, "over_baseline_mb": 3.5},
            "disk_bytes": params * 4,
        }
    return {
        "flops_convention": "one multiply-add = 2 FLOPs", "memory_method": "peak RSS of a fresh process",
        "text_input": "texts of the model's maximum length",
        "settings": {"batch_size": 32, "rounds": 9, "warmup_rounds": 2, "latency_calls_per_round": 10, "text_length": None},
        "environment": {"torch": "2.13.0", "threads": 2, "cpu": "test cpu"},
        "models": {"teacher": model(863745, 52_000_000, 1.9, 6800.0), "student": model(126657, 7_000_000, 0.55, 27000.0)},
        "relative_to_first": {"student": {
            "reference": "teacher", "params_fraction": 0.147, "flops_fraction": {"image": 0.135, "text": 0.135},
            "latency_speedup": {"image": {"median": 3.4, "p25": 3.2, "p75": 3.6}, "text": {"median": 3.0, "p25": 2.9, "p75": 3.1}},
            "throughput_speedup": {"image": {"median": 3.9, "p25": 3.7, "p75": 4.1}, "text": {"median": 3.5, "p25": 3.3, "p75": 3.6}},
        }},
    }


def quantize_record() -> dict:
    """A quantization report as export.quantize.QuantizeReport.as_dict gives it."""
    def figures(acc1, ms, ips, size, **extra):
        return {"acc1": acc1, "image_retrieval_recall@1": acc1 - 0.01, "text_retrieval_recall@1": acc1 - 0.02,
                "params": 126657, "size_bytes": size, "latency_ms_p50": ms, "latency_ms_p95": ms * 1.3,
                "images_per_second": ips, "throughput_batch_size": 256, **extra}
    return {
        "method": "dynamic-int8", "candidate": "int8", "max_drop": 0.01, "acc1_drop": 0.004, "accepted": True,
        "figures": {"fp32": figures(0.88, 0.55, 27000.0, 520_000),
                    "int8": figures(0.876, 0.31, 41000.0, 160_000, latency_speedup=1.77, throughput_speedup=1.52)},
        "notes": [],
    }


def cascade_files(folder: Path) -> None:
    """`cascade.json` (the points) and `cascade_summary.json` as `vldistill cascade-eval` writes them."""
    points = [{"threshold": t, "acc1": 0.88 + 0.108 * rate, "teacher_call_rate": rate,
               "mean_latency_ms": 0.55 + 1.9 * rate} for t, rate in ((0.0, 0.0), (0.4, 0.25), (0.7, 0.5), (1.0, 1.0))]
    write_json(folder / "cascade.json", points)
    write_json(folder / "cascade_summary.json", {
        "criterion": "max_prob", "target": 0.99, "dataset": "shapes", "images": 1000, "classes": 120,
        "student": {"name": "student", "acc1": 0.88, "mean_latency_ms": 0.55},
        "teacher": {"name": "teacher", "acc1": 0.988, "mean_latency_ms": 1.9},
        "recommendation": {"met": True, "goal_acc1": 0.978, "threshold": 0.7, "acc1": 0.934, "teacher_call_rate": 0.5,
                           "mean_latency_ms": 1.5, "acc1_vs_teacher": 0.945, "latency_vs_teacher": 0.79,
                           "message": "threshold 0.7: 50% teacher calls"},
        "points_file": "cascade.json",
    })


def add_deployment(folder: Path) -> Path:
    """The deployment records beside a demo run: profile.json, quantize.json, a cascade folder, an ONNX export."""
    write_json(folder / "profile.json", profile_record())
    write_json(folder / "quantize.json", quantize_record())
    cascade_files(folder / "cascade")
    write_json(folder / "onnx" / "onnx_pair.json", {
        "precision": "fp32", "opset": 18, "source": {"model": "student", "parameters": 126657},
        "check": {"batch_size": 3, "text_length": 32, "tolerance": 1e-4, "max_abs_diff": {"image": 2.4e-7, "text": 3.1e-7}},
        "int8": {"folder": "int8", "fp32": {"acc1": 0.88}, "int8": {"acc1": 0.874}, "acc1_drop": 0.006, "accepted": True},
    })
    return folder


def make_sweep_run(folder: Path) -> Path:
    """A sweep run folder: ablation.json over two seeds, the teacher's and each run's logs."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, acc1, losses in (("clip", 0.78, {"clip": {"weight": 1.0}}),
                               ("kd", 0.84, {"clip": {"weight": 1.0}, "kd": {"weight": 1.0, "temperature": 2.0}})):
        per_seed = [{"seed": s, "acc1": acc1 + 0.01 * s, "image_retrieval_recall@1": acc1 - 0.02,
                     "text_retrieval_recall@1": acc1 - 0.05, "seconds": 10.0, "seconds_per_step": 0.03}
                    for s in (0, 1)]
        runs.append({"name": name, "losses": losses, "acc1": acc1 + 0.005, "image_retrieval_recall@1": acc1 - 0.02,
                     "text_retrieval_recall@1": acc1 - 0.05,
                     "spread": {"acc1": 0.01, "image_retrieval_recall@1": 0.0, "text_retrieval_recall@1": 0.0},
                     "seconds": 10.0, "seconds_per_step": 0.03, "per_seed": per_seed})
        for seed in (0, 1):
            write_log(folder / "logs" / f"{name}-seed{seed}.jsonl", log_records(40, 10, {k: 2.0 for k in losses}, 2.0))
    runs[0]["minus_task_loss"] = {k: 0.0 for k in KEYS}
    runs[0]["beyond_spread"] = {k: False for k in KEYS}
    runs[1]["minus_task_loss"] = {"acc1": 0.06, "image_retrieval_recall@1": 0.06, "text_retrieval_recall@1": 0.06}
    runs[1]["beyond_spread"] = {"acc1": True, "image_retrieval_recall@1": True, "text_retrieval_recall@1": True}
    for run in runs:
        run["cost_vs_kd"] = 1.0
    write_json(folder / "ablation.json", {"dataset": "shapes", "teacher": "teacher", "steps": 40, "train_pairs": 256,
                                          "seeds": [0, 1], "inherit": True, "retrieval_match": "identical_caption",
                                          "runs": runs})
    write_log(folder / "logs" / "teacher.jsonl", log_records(40, 10, {"clip": 3.0}))
    return folder
