"""Continual re-distillation (`vldistill continual CONFIG --out DIR`): the student of a previous run (a run folder
of `vldistill distill` or of this command: config.yaml + student/) is distilled further on this config's data, a
new domain, so that it learns the new domain and keeps the old one:

- EWC (train/ewc.py, `continual.ewc_lambda` > 0): the diagonal Fisher information of the student's parameters is
  estimated on `continual.fisher_batches` batches of the previous run's data with the previous run's losses, at
  the previous student's weights (saved as `DIR/fisher.safetensors` and reused when it still fits), and
  lambda/2 sum F (theta - theta*)^2 joins every step's loss.
- Prompt memory (models/prompt_memory.py, a prompted student, `continual.prompt_memory`): the prompts the student
  had on each earlier domain are kept by domain name in the new student's folder, and the old domain is
  evaluated with its own prompts. The EWC penalty then leaves the prompts (and projector) free: the memory keeps
  the old ones, so the new domain's prompts learn it unhindered.

`DIR/continual.json` holds zero-shot top-1 accuracy on the old and new domain (each domain's own classes) before
and after, and the forgetting (old-domain accuracy before minus after)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.binding import ConfigError
from vldistill.config import EvalConfig, ExperimentConfig, load_config
from vldistill.data.bundle import DataBundle, load_data
from vldistill.data.tokenizer import make_tokenize
from vldistill.eval.suite import pixel_batches
from vldistill.eval.zeroshot import evaluate_zero_shot
from vldistill.fileio import write_text_atomic
from vldistill.models.io import read_metadata
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.prompt_memory import (
    PromptMemory, read_prompt_memory, remember, use_domain_prompts, write_prompt_memory,
)
from vldistill.models.prompts import PromptedDualEncoder
from vldistill.teachers.assemble import load_teacher
from vldistill.train.ewc import FISHER_FILE, EWCPenalty, FisherInformation, FisherMismatchError, estimate_fisher, load_fisher, save_fisher
from vldistill.train.runs import plan_student_run, train_student
from vldistill.trained import TrainedModel

logger = logging.getLogger(__name__)

CONTINUAL_SUMMARY = "continual.json"
STUDENT_DIR = "student"


def domain_accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: DataBundle, cfg: EvalConfig, progress: bool = False
) -> float:
    """Zero-shot top-1 accuracy of `model` on `data`'s labelled test images among `data`'s classes (a domain's)."""
    if data.zeroshot is None:
        raise ValueError(f"the data {data.name!r} has no labelled images for zero-shot accuracy")
    spec = model.input_spec
    tokenize = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)
    images = pixel_batches(data.zeroshot.images, spec, cfg.batch_size)
    return evaluate_zero_shot(  # embedding runs in eval mode and restores the model's training flags
        model, tokenize, images, data.zeroshot.labels, data.classnames, data.templates, cfg.batch_size, progress, ks=(1,)
    )["acc1"]


def previous_fisher(
    previous: ExperimentConfig, data: DataBundle, teacher: TrainedModel, student: nn.Module, path: Path, batches: int
) -> FisherInformation:
    """The Fisher information of `student` on the previous domain (`data`, with the `previous` run's losses and
    batches): read from `path` when it was estimated at exactly these weights on as many batches, else estimated
    and saved there."""
    if path.exists():
        try:
            info = load_fisher(path, student, same_weights=True)
            if info.batches == batches:
                logger.info("reusing the Fisher information in %s", path)
                return info
        except FisherMismatchError as error:
            logger.info("estimating the Fisher information again: %s", error)
    train = dataclasses.replace(previous.distill.train, steps=batches, warmup_steps=0)  # at least `batches` micro-batches
    previous = dataclasses.replace(previous, distill=dataclasses.replace(previous.distill, train=train))
    plan = plan_student_run(previous, data, teacher, path.parent / "fisher", student=student)
    info = estimate_fisher(student, plan.objective, plan.batches, batches, plan.teachers)
    save_fisher(path, info)
    return info


def without_prompts(info: FisherInformation) -> FisherInformation:
    """`info` without the prompts' and projector's entries (`prompts.*`, `projector.*`)."""
    keep = [name for name in info.fisher if not name.startswith(("prompts.", "projector."))]
    return FisherInformation({n: info.fisher[n] for n in keep}, {n: info.anchor[n] for n in keep}, info.batches)


def accuracies(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, domains: dict[str, DataBundle], cfg: EvalConfig,
    memory: Optional[PromptMemory] = None,
) -> dict[str, float]:
    """Each domain's zero-shot top-1 accuracy; a prompted `model` with a `memory` holding a domain's prompts is
    evaluated on it with those (its own prompts are put back after)."""
    found = {}
    current = remember({}, "current", model)["current"] if isinstance(model, PromptedDualEncoder) else None
    for name, data in domains.items():
        if memory and current is not None and name in memory:
            use_domain_prompts(model, memory, name)
        found[name] = domain_accuracy(model, tokenizer, data, cfg)
        if current is not None:
            model.load_state_dict(current, strict=False)
    return found


def run_continual(
    cfg: ExperimentConfig, out_dir: Path, progress: bool = True, log_path: Optional[Path] = None
) -> dict[str, Any]:
    """Distill the previous run's student further on `cfg`'s data as `cfg.continual` says (see the module
    docstring); save it to `out_dir/student` (with its prompt memory; the log at `log_path`, default
    `out_dir/logs/distill.jsonl`), write and return the summary."""
    settings, out_dir = cfg.continual, Path(out_dir)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # a run folder a later run continues
    if settings.previous is None:
        raise ConfigError("continual.previous is not set: point it at the run folder of the old domain's student")
    folder = Path(settings.previous)
    previous = load_config(folder / "config.yaml")
    student_path = folder / STUDENT_DIR
    student, tokenizer = load_dual_encoder_any(student_path)
    teacher_path = cfg.teacher.path or read_metadata(student_path).get("teacher")
    if teacher_path is None:
        raise ConfigError(f"teacher.path is not set and {student_path} does not name its teacher")
    teacher = load_teacher(str(teacher_path), cfg.teacher.trust_remote_code)
    old_data, new_data = load_data(previous.data, progress=progress), load_data(cfg.data, progress=progress)
    old, new = settings.previous_domain, settings.domain
    domains = {old: old_data, new: new_data}
    memory: PromptMemory = {}
    if isinstance(student, PromptedDualEncoder) and settings.prompt_memory:
        memory = remember(read_prompt_memory(student_path), old, student)
    before = accuracies(student, tokenizer, domains, cfg.eval)
    penalty = None
    if settings.ewc_lambda > 0:
        info = previous_fisher(previous, old_data, teacher, student, out_dir / FISHER_FILE, settings.fisher_batches)
        if memory:  # the memory keeps the old domain's prompts: they learn the new domain freely
            info = without_prompts(info)
        penalty = EWCPenalty(info, settings.ewc_lambda)
    trained = train_student(
        cfg, new_data, teacher, out_dir / STUDENT_DIR, log_path=log_path or out_dir / "logs" / "distill.jsonl", progress=progress, student=student,
        penalty=penalty, desc=f"re-distill on {new}",
    )
    if memory:
        memory = remember(memory, new, student)
        write_prompt_memory(trained.path, memory)
    after = accuracies(student, tokenizer, domains, cfg.eval, memory)
    if memory:
        summary_extra = {"acc1_after_current_prompts": accuracies(student, tokenizer, domains, cfg.eval)}
    else:
        summary_extra = {}
    summary = {
        "command": "continual", "previous": str(folder), "domains": {"old": old, "new": new},
        "ewc_lambda": settings.ewc_lambda, "fisher_batches": settings.fisher_batches if penalty else None,
        "prompt_memory": sorted(memory) if memory else None, "seed": cfg.seed, "steps": trained.result.steps,
        "acc1_before": before, "acc1_after": after, "forgetting": before[old] - after[old],
        "new_domain_gain": after[new] - before[new], **summary_extra,
    }
    write_text_atomic(out_dir / CONTINUAL_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
