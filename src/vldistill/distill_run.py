"""What `vldistill distill` leaves in its run folder besides the config, the per-step log and the student: the
teacher and the student evaluated side by side (result records for both, image throughput measured in the same
interleaved trials), the student's model card with the measured metrics, and `summary.json` (the demo's layout:
`models` with each model's figures, the student's retention of the teacher's, compression and speed-up)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sized

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import DataBundle
from vldistill.demo import retention
from vldistill.eval.caption_suite import CAPTION_SUMMARY_KEYS, compare_caption_speed, evaluate_captioner
from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
from vldistill.export import write_card
from vldistill.fileio import write_text_atomic
from vldistill.models.contract import Captioner
from vldistill.profile.throughput import compare_image_throughput, count_parameters, speedup
from vldistill.trained import TrainedModel

SUMMARY_FILE = "summary.json"
RESULTS_DIR = "results"


def training_facts(cfg: ExperimentConfig, data: DataBundle, teacher: TrainedModel, student: TrainedModel) -> dict[str, Any]:
    """What the run did whether or not it was evaluated: the teacher, steps, loop seconds, skipped steps, the
    student's training pairs, seed, dataset and data quality."""
    pairs = cfg.distill.train_pairs
    if pairs is None and isinstance(data.train, Sized):
        pairs = len(data.train)
    facts: dict[str, Any] = {"command": "distill", "teacher": str(teacher.path), "seed": cfg.seed,
                             "student_train_pairs": pairs, "dataset": data.name,
                             "retrieval_match": cfg.eval.retrieval_match, "data_quality": data.quality.summary()}
    if student.result is not None:
        facts.update(steps=student.result.steps, train_seconds={"student": student.result.seconds},
                     nonfinite_steps=student.result.nonfinite_steps)
    return facts


def summarize_distill(
    cfg: ExperimentConfig, data: DataBundle, teacher: TrainedModel, student: TrainedModel, out_dir: Path,
    evaluate: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """Write the run folder's `summary.json` and return it. With `evaluate`: the teacher's and the student's result
    records in `out_dir/results`, their image throughput measured together, the student's card rewritten with its
    metrics, and the summary's `models`, `student_retention_percent`, `compression` and `image_speedup`. Without,
    the training facts only (`models` empty)."""
    out_dir = Path(out_dir)
    summary = {**training_facts(cfg, data, teacher, student), "models": {}}
    if evaluate and isinstance(student.model, Captioner):
        summary.update(_captioning_figures(cfg, data, teacher, student, out_dir, progress))
    elif evaluate:
        arms = {"teacher": teacher, "student": student}
        models = {
            name: evaluate_model(trained.model, trained.tokenizer, data, cfg.eval, name, out_dir / RESULTS_DIR,
                                 progress, throughput=False)["summary"]
            for name, trained in arms.items()
        }
        measured = compare_image_throughput(
            {name: trained.model for name, trained in arms.items()},
            {name: trained.model.input_spec.image_size for name, trained in arms.items()},
            batch_size=cfg.eval.throughput_batch_size,
        )
        for name, throughput in measured.items():
            models[name].update(throughput.as_dict())
        summary.update(
            models=models,
            student_retention_percent=retention(models["student"], models["teacher"]),
            compression=count_parameters(teacher.model) / count_parameters(student.model),
            image_speedup=speedup(measured["student"], measured["teacher"]),
        )
        write_card(student.path, {key: models["student"][key] for key in SUMMARY_KEYS}, data.name)
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _captioning_figures(
    cfg: ExperimentConfig, data: DataBundle, teacher: TrainedModel, student: TrainedModel, out_dir: Path, progress: bool
) -> dict[str, Any]:
    """A captioning run's evaluation: both models' captioning records (BLEU-4, CIDEr-D), their captions per second
    measured together on the first test images, the student's retention, compression and captioning speed-up;
    the student's card rewritten with its metrics."""
    arms = {"teacher": teacher, "student": student}
    models = {
        name: evaluate_captioner(trained.model, data, cfg.eval, name, out_dir / RESULTS_DIR, progress)["summary"]
        for name, trained in arms.items()
    }
    measured = compare_caption_speed({name: trained.model for name, trained in arms.items()}, data, progress)
    for name, throughput in measured.items():
        models[name].update(throughput.as_dict("captions"))
    write_card(student.path, {key: models["student"][key] for key in CAPTION_SUMMARY_KEYS}, data.name)
    return {
        "models": models,
        "student_retention_percent": retention(models["student"], models["teacher"], CAPTION_SUMMARY_KEYS),
        "compression": count_parameters(teacher.model) / count_parameters(student.model),
        "caption_speedup": speedup(measured["student"], measured["teacher"]),
    }
