"""Quantization-aware training with distillation (QAT + KD): a saved float student, its Linear layers
simulating int8 (export.quantize.prepare_qat), fine-tuned from the configured teacher(s) with the configured
losses through the training loop (the run is planned by `plan_student_run` with this student in place of a
new one), then converted to int8 and shipped through the accuracy gate beside the fp32 model and its
post-training int8 version."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import DataBundle
from vldistill.export.quantize import (
    DEFAULT_MAX_DROP, QuantizeReport, check_max_drop, check_paths, convert_qat, load_fp32_student, prepare_qat,
    ship_quantized,
)
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.io import read_metadata
from vldistill.models.quantized import Int8CLIPDualEncoder, Int8Recipe
from vldistill.train.runs import obtain_teacher, plan_student_run
from vldistill.trained import TrainedModel, TrainResult

logger = logging.getLogger(__name__)

QAT_STEPS = 100  # a short fine-tune of an already distilled student
QAT_LR_FACTOR = 0.1  # the fine-tune's learning rate: this share of distill.train.lr


def qat_config(cfg: ExperimentConfig, steps: Optional[int] = None, lr: Optional[float] = None) -> ExperimentConfig:
    """`cfg` with the fine-tune's optimizer in `distill.train`: `steps` (default QAT_STEPS) at learning rate
    `lr` (default QAT_LR_FACTOR x distill.train.lr), warm-up at most a tenth of the steps; the rest of
    `distill.train` (batch size, precision, clipping...) as configured. A short fine-tune writes no checkpoints and
    trains every parameter in one stage (the distillation's `distill.stages` do not apply)."""
    optim = cfg.distill.train
    steps = QAT_STEPS if steps is None else steps
    lr = optim.lr * QAT_LR_FACTOR if lr is None else lr
    if steps < 1 or lr <= 0:
        raise ValueError(f"QAT needs steps >= 1 and a learning rate > 0, got steps {steps}, lr {lr}")
    train = dataclasses.replace(optim, steps=steps, lr=lr, warmup_steps=min(optim.warmup_steps, steps // 10))
    checkpoint = dataclasses.replace(cfg.distill.checkpoint, every=0)
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, train=train, checkpoint=checkpoint, stages=[]))


def train_qat(
    cfg: ExperimentConfig,
    data: DataBundle,
    teacher: TrainedModel,
    student: CLIPDualEncoder,
    out_dir: Path,
    *,
    recipe: Int8Recipe = Int8Recipe(),
    log_path: Optional[Path] = None,
    progress: bool = True,
) -> tuple[Int8CLIPDualEncoder, TrainResult]:
    """Fine-tune a copy of `student` with int8 simulated in its Linear layers, distilling from `teacher` with
    `cfg.distill.losses` for `cfg.distill.train` (see `qat_config`), and convert it to int8. Checkpoints, if
    `cfg` asks for them, go beside `out_dir`."""
    prepared = prepare_qat(student, recipe)
    plan = plan_student_run(cfg, data, teacher, out_dir, student=prepared)
    result = plan.train("QAT + distillation", log_path, progress)
    return convert_qat(prepared, recipe), result


def check_same_tokenizer(student_tokenizer, teacher: TrainedModel, model_dir: str | os.PathLike) -> None:
    """Raise ValueError when the student's tokenizer differs from the teacher's (the training batches are
    tokenized with the teacher's, as in distillation)."""
    if student_tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ValueError(
            f"{model_dir}'s tokenizer differs from the teacher's ({teacher.path}); QAT distills with the teacher's "
            "tokenizer, so the student must share it (set teacher.path to the teacher it was distilled from)"
        )


def quantize_with_qat(
    cfg: ExperimentConfig,
    data: DataBundle,
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    recipe: Int8Recipe = Int8Recipe(),
    max_drop: float = DEFAULT_MAX_DROP,
    log_path: Optional[Path] = None,
    progress: bool = True,
) -> QuantizeReport:
    """QAT + KD of the float CLIP student at `model_dir` from the teacher at `teacher.path` (see `train_qat`;
    `cfg` as `qat_config` makes it), measured beside the fp32 student and its post-training int8 version, and
    written to `out` only when its acc1 is at most `max_drop` below fp32's (see export.quantize.ship_quantized)."""
    check_max_drop(max_drop)
    check_paths(model_dir, out)
    if cfg.teacher.path is None:
        raise ValueError("teacher.path is not set: QAT distills from a teacher (the one the student was distilled from)")
    teacher = obtain_teacher(cfg, data, Path(out))  # loads teacher.path
    fp32, tokenizer = load_fp32_student(model_dir)
    check_same_tokenizer(tokenizer, teacher, model_dir)
    int8 = Int8CLIPDualEncoder.from_float(fp32, recipe)
    qat, result = train_qat(cfg, data, teacher, fp32, Path(out), recipe=recipe, log_path=log_path, progress=progress)
    optim = cfg.distill.train
    metadata = {
        **read_metadata(model_dir), "source": str(model_dir),
        "qat": {
            "teacher": str(teacher.path), "losses": {k: dict(v) for k, v in cfg.distill.losses.items()},
            "steps": result.steps, "lr": optim.lr, "batch_size": optim.batch_size, "seed": cfg.seed,
            "train_pairs": cfg.distill.train_pairs,
            "final_loss": result.history[-1]["loss/total"] if result.history else None,
        },
    }
    return ship_quantized(
        fp32, tokenizer, {"int8": int8, "qat_int8": qat}, "qat_int8", out, data, cfg.eval,
        method="qat", metadata=metadata, max_drop=max_drop, progress=progress,
    )
