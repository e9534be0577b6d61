"""`vldistill prompt-distill`: prompt distillation (PromptKD, Li et al., 2024, "PromptKD: Unsupervised Prompt
Distillation for Vision-Language Models") with base-to-novel evaluation.

1. The teacher's text embeddings of every class name (base and novel, prompt-ensembled over the templates) are
   computed once and stored in the run folder (`class_embeddings.safetensors`, refused when stale).
2. The student without prompts: `prompt_distill.student`, or the configured student trained on the data's
   captioned pairs without a teacher (`distill.train`, as the demo's baseline).
3. Prompt distillation: learnable prompts and a projector (`student.prompts`, default: deep visual prompts in
   every vision layer and a projector into the teacher's space) trained on images of the base classes only,
   without captions or labels (each image goes with an empty text that no loss reads), to match the teacher's
   class logits (`class_kd`) plus the losses configured beside it (default: image feature alignment through a
   learnable adapter). The student's own weights stay frozen unless `prompt_distill.stages` train them.
4. The same on a `low_resource` share of the base images.
5. Base-to-novel evaluation (eval/base_novel.py) on the labelled test images: the teacher and the prompt-distilled
   students classify through the stored class embeddings (the students through their projector, as PromptKD
   infers), the student without prompts through its own text tower and the templates.

The run folder holds `summary.json`, the class embeddings, the students (`student`, `prompted`,
`prompted-low-resource`, each a loadable model folder) and the logs."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from vldistill import __version__
from vldistill.config import ExperimentConfig, PromptDistillConfig
from vldistill.data.bundle import DataBundle, decode_classes, load_data
from vldistill.data.classes import ImageFolderClasses, class_name_templates
from vldistill.data.pairs import InMemoryPairs, PairSplit
from vldistill.data.tokenizer import make_tokenize
from vldistill.distributed import process_rank
from vldistill.eval.base_novel import ClassSplit, base_novel_accuracy, images_of, split_classes
from vldistill.eval.embed import embed_images
from vldistill.eval.suite import pixel_batches
from vldistill.eval.template_search import stratified_split
from vldistill.eval.zeroshot import classification_metrics, zero_shot_logits
from vldistill.fileio import write_text_atomic
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.prompts import PromptConfig, PromptedDualEncoder, with_prompts
from vldistill.profile.throughput import count_parameters
from vldistill.train.runs import obtain_teacher, plan_student_run, train_student, without_parameters
from vldistill.train.stages import selected_names
from vldistill.teachers.class_embeddings import stored_class_embeddings
from vldistill.trained import TrainedModel

logger = logging.getLogger(__name__)

CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
SUMMARY_FILE = "summary.json"
TASK_LOSSES = {"clip": {"weight": 1.0}}  # the student without prompts learns from captions alone
BASE_NOVEL_KEYS = ("base_acc1", "novel_acc1", "hm", "acc1")


def default_prompts(student: torch.nn.Module) -> PromptConfig:
    """PromptKD's student prompts: 4 deep visual prompt tokens in every vision layer, no text context (the
    student's text tower is not used), a projector into the teacher's embedding space."""
    layers = student.architecture_spec().vision.layers
    return PromptConfig(n_ctx=0, n_vis=4, depth=layers, projector_dim="teacher")


def labelled_training_images(cfg: ExperimentConfig, data: DataBundle, progress: bool = True) -> PairSplit:
    """The images prompt distillation may train on, with the class labels that decide which are base images:
    `prompt_distill.images` (class folders, whose class names must be the data's), else the shapes data's
    training images (labelled by their attributes). ValueError for data without labelled training images."""
    folder = cfg.prompt_distill.images
    if folder is not None:
        classes = ImageFolderClasses(folder, cfg.data.image_size, data.quality, cfg.data.classnames)
        if data.classnames is not None and classes.classnames != data.classnames:
            raise ValueError(
                f"prompt_distill.images {folder}: its classes ({', '.join(classes.classnames[:5])}, ...) are not the "
                "evaluation classes (data.classes): give both the same class folders"
            )
        return decode_classes(classes, progress)
    attributes = getattr(data.train, "attributes", None)
    if attributes is None:
        raise ValueError(
            f"{data.name} has no labelled training images for a base-to-novel split: set prompt_distill.images to a "
            "folder of class folders (its labels choose the base classes; training reads the images only)"
        )
    # the shapes data repeats nothing: one training image per caption; labels index the data's class names (a
    # domain's under data.shapes_filter, data/domains.py)
    label = {name: index for index, name in enumerate(data.classnames)}
    labels = np.array([label[f"{a['size']} {a['colour']} {a['shape']}"] for a in attributes], dtype=np.int64)
    images = data.train.images.numpy()
    return PairSplit(images, [""] * len(images), labels)


def base_training_images(images: PairSplit, split: ClassSplit, share: Optional[float], seed: int) -> np.ndarray:
    """The images of the base classes; with `share`, a seeded per-class `share` of them (low resource)."""
    rows = images_of(images.labels, split.base)
    if share is not None:
        chosen, _ = stratified_split(images.labels[rows], share, seed)
        rows = rows[chosen]
    if len(rows) == 0:
        raise ValueError("no training image belongs to a base class")
    return images.images[rows]


def prompt_run_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config a prompt-distillation run trains with: prompt_distill's training settings, losses and stages
    in the places `distill` reads them, no teacher cache (the losses read image signals of the live teacher)."""
    pd = cfg.prompt_distill
    distill = dataclasses.replace(cfg.distill, train=pd.train, losses=pd.losses, stages=pd.stages, train_pairs=None)
    return dataclasses.replace(cfg, distill=distill, cache=dataclasses.replace(cfg.cache, path=None))


def unread_student_parameters(student: PromptedDualEncoder, objective: torch.nn.Module) -> frozenset[str]:
    """The names (in loop.StudentWithObjective) of the student parameters no image-only loss reads: its text tower
    and its logit scale and bias (the class logits use the teacher's scale). They never train: under DDP a
    trainable parameter without a gradient is an error."""
    names = selected_names("text", student, objective, "prompt_distill")
    scales = {f"student.{name}" for name, _ in student.named_parameters() if "logit_scale" in name or "logit_bias" in name}
    return names | frozenset(scales)


def prompt_distill_student(
    cfg: ExperimentConfig,
    data: DataBundle,
    teacher: TrainedModel,
    start: TrainedModel,
    images: np.ndarray,
    class_embeddings: torch.Tensor,
    out_dir: Path,
    *,
    desc: str = "prompt distillation",
    log_path: Optional[Path] = None,
    progress: bool = True,
) -> TrainedModel:
    """A copy of `start` (a dual encoder; the runs do not share weights) wrapped in learnable
    prompts (`student.prompts`, default `default_prompts`) and trained on `images` alone with prompt_distill's
    losses and the teacher's stored `class_embeddings`; only the prompts and the projector train unless
    prompt_distill.stages say otherwise, and what no loss reads never does (`unread_student_parameters`). Saved
    (base folder + prompts) to `out_dir`."""
    run_cfg = prompt_run_config(cfg)
    base = copy.deepcopy(start.model)
    torch.manual_seed(cfg.seed)
    prompts = cfg.student.prompts or default_prompts(base)
    student = with_prompts(base, prompts, start.tokenizer, teacher.model.embed_dim)
    if not run_cfg.distill.stages:
        student.base.requires_grad_(False)
    pairs = InMemoryPairs(images, [""] * len(images))
    bundle = dataclasses.replace(data, train=pairs, val=None)
    plan = plan_student_run(
        run_cfg, bundle, teacher, out_dir, student=student, losses=run_cfg.distill.losses, class_embeddings=class_embeddings,
    )
    plan.stages = without_parameters(plan.stages, student, unread_student_parameters(student, plan.objective))
    result = plan.train(desc, log_path, progress)
    metadata = {
        "role": "prompt-distilled student", "teacher": str(teacher.path), "student": str(start.path),
        "losses": run_cfg.distill.losses, "train_images": len(images), "steps": result.steps, "seed": cfg.seed,
        "vldistill": __version__,
    }
    if process_rank()[0] == 0:  # one writer when several processes train together
        student.save_pretrained(out_dir, metadata, tokenizer=start.tokenizer)
    return TrainedModel(student, start.tokenizer, Path(out_dir), result)


def test_images(data: DataBundle) -> PairSplit:
    """The labelled test images (the zero-shot split); ValueError when the data has none."""
    if data.zeroshot is None or data.zeroshot.labels is None or data.classnames is None:
        raise ValueError(f"{data.name} has no labelled test images: set data.classes to a folder of class folders")
    return data.zeroshot


def projected_logits(model: PromptedDualEncoder, images: np.ndarray, class_embeddings: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, C) cosine similarities of the images' projected embeddings to the stored class embeddings (PromptKD's
    inference: the student's image tower and projector, the teacher's text embeddings)."""
    embeds = embed_images(model, pixel_batches(images, model.input_spec, batch_size), batch_size, progress=False)
    with torch.no_grad():
        projected = model.project(embeds)
    return projected @ F.normalize(class_embeddings, dim=-1).T


def teacher_logits(teacher: TrainedModel, images: np.ndarray, class_embeddings: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, C) cosine similarities of the teacher's image embeddings to its stored class embeddings."""
    spec = teacher.model.input_spec
    embeds = F.normalize(embed_images(teacher.model, pixel_batches(images, spec, batch_size), batch_size, False), dim=-1)
    return embeds @ class_embeddings.T


def own_text_logits(trained: TrainedModel, data: DataBundle, templates: list[str], batch_size: int) -> torch.Tensor:
    """(N, C) zero-shot logits of a dual encoder through its own text tower and `templates`."""
    spec = trained.model.input_spec
    tokenize = make_tokenize(trained.tokenizer, spec.max_text_length, spec.text_padding)
    images = pixel_batches(data.zeroshot.images, spec, batch_size)
    return zero_shot_logits(trained.model, tokenize, images, data.classnames, templates, batch_size, progress=False)


def base_novel_figures(logits: torch.Tensor, labels: np.ndarray, split: ClassSplit) -> dict[str, float]:
    """base / novel accuracy, their harmonic mean, and acc1 over all classes."""
    overall = classification_metrics(logits, torch.as_tensor(labels), ks=(1,))["acc1"]
    return {**base_novel_accuracy(logits, labels, split), "acc1": overall}


def obtain_unprompted_student(
    cfg: ExperimentConfig, data: DataBundle, teacher: TrainedModel, out_dir: Path, logs: Path, progress: bool
) -> TrainedModel:
    """`prompt_distill.student` loaded, else the configured student trained on the captioned pairs without a
    teacher (`distill.train`, inheriting the teacher's weights as `student.inherit` says) and saved to `out_dir`."""
    if cfg.prompt_distill.student is not None:
        model, tokenizer = load_dual_encoder_any(cfg.prompt_distill.student)
        return TrainedModel(model, tokenizer, Path(cfg.prompt_distill.student))
    plain = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, prompts=None))
    return train_student(
        plain, data, teacher, out_dir, losses=TASK_LOSSES, desc="student without prompts (no teacher)",
        log_path=logs / "student.jsonl", progress=progress,
    )


def run_prompt_distill(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The whole prompt-distillation run (see the module docstring); writes and returns `summary.json` (several
    processes, under torchrun or accelerate launch: all train, the first evaluates and writes; the others return {})."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    pd: PromptDistillConfig = cfg.prompt_distill
    data = load_data(cfg.data, progress=progress)
    test = test_images(data)
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", logs, progress)
    start = obtain_unprompted_student(cfg, data, teacher, out_dir / "student", logs, progress)
    split = split_classes(len(data.classnames), pd.base_share, pd.split_seed)
    templates = class_name_templates(cfg.prompt_distill.templates, cfg.eval.templates, data.templates)
    classes = stored_class_embeddings(
        teacher, data.classnames, templates, out_dir / CLASS_EMBEDDINGS_FILE, cfg.eval.batch_size, progress
    )
    labelled = labelled_training_images(cfg, data, progress)
    shares = {"prompted": None, **({"prompted-low-resource": pd.low_resource} if pd.low_resource is not None else {})}
    images = {name: base_training_images(labelled, split, share, cfg.seed) for name, share in shares.items()}
    trained = {
        name: prompt_distill_student(
            cfg, data, teacher, start, images[name], classes, out_dir / name, desc=name,
            log_path=logs / f"{name}.jsonl", progress=progress,
        )
        for name in shares
    }
    if process_rank()[0] != 0:
        return {}  # the first process evaluates and writes the summary
    batch = cfg.eval.batch_size
    models: dict[str, dict[str, Any]] = {
        "teacher": base_novel_figures(teacher_logits(teacher, test.images, classes, batch), test.labels, split),
        "student": base_novel_figures(own_text_logits(start, data, templates, batch), test.labels, split),
    }
    models["teacher"]["params"] = count_parameters(teacher.model)
    models["student"]["params"] = count_parameters(start.model)
    for name, model in trained.items():
        figures = base_novel_figures(projected_logits(model.model, test.images, classes, batch), test.labels, split)
        models[name] = {
            **figures, "params": count_parameters(model.model), "train_images": len(images[name]),
            "train_seconds": model.result.seconds,
        }
    summary = {
        "command": "prompt-distill", "seed": cfg.seed, "dataset": data.name, "teacher": str(teacher.path),
        "student": str(start.path), "templates": templates, "classes": split.record(data.classnames),
        "base_share": pd.base_share, "split_seed": pd.split_seed, "low_resource": pd.low_resource,
        "steps": pd.train.steps, "test_images": len(test), "models": models,
        "prompted_minus_student": {key: models["prompted"][key] - models["student"][key] for key in BASE_NOVEL_KEYS},
        "wall_seconds": time.perf_counter() - started,
    }
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def format_prompt_summary(summary: dict[str, Any]) -> str:
    """The run's table for the terminal: base / novel / HM / all-class acc1 per model."""
    lines = [f"{'model':<24}{'base':>8}{'novel':>8}{'HM':>8}{'all':>8}{'params':>11}{'images':>8}"]
    for name, row in summary["models"].items():
        images = row.get("train_images")
        lines.append(
            f"{name:<24}{row['base_acc1']:>8.3f}{row['novel_acc1']:>8.3f}{row['hm']:>8.3f}{row['acc1']:>8.3f}"
            f"{row['params']:>11,}{images if images is not None else '-':>8}"
        )
    gain = summary["prompted_minus_student"]
    lines.append(f"prompted minus student: base {gain['base_acc1']:+.3f}, novel {gain['novel_acc1']:+.3f}, HM {gain['hm']:+.3f}")
    lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
