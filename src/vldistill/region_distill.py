"""`vldistill region-distill`: open-vocabulary region distillation (ViLD, Gu et al., 2022, "Open-vocabulary Object
Detection via Vision and Language Knowledge Distillation") with base-to-novel evaluation on boxes.

1. Regions: the embedded scenes (several shapes per image, 40 "colour shape" classes) or COCO-style detection files;
   the classes are split into base classes, whose labels training may read, and novel classes, never labelled.
2. Proposals: every object box of every image (class-agnostic, as a perfect proposal network would find them) plus
   random background boxes. The teacher's image embeddings of each proposal cropped and resized go through the
   region crop cache (teachers/cache/regions.py): the teacher runs once per region.
3. The teacher's text embeddings of every class name (prompt-ensembled, stored in `class_embeddings.safetensors`).
4. Region students (models/region_student.py), all from the same initialization (the configured student's image
   tower, inheriting the teacher's weights as `student.inherit` says), data, steps and seed, one per arm:
   ViLD-text only (`region_text`: base-class names and a learned background; novel objects' boxes are background
   or ignored, `unlabelled_objects`), ViLD-image only (`region_image`: every proposal's crop embedding) and both.
5. Evaluation on the test regions: classification with the ground-truth boxes given (base regions among the base
   classes, novel among the novel, all among all; accuracy and mean per-class recall) and AP50 with the
   ground-truth boxes plus random background boxes as proposals (eval/regions.py), for the teacher's crop
   classifier (the upper bound) and each student. The students score classes by cosine similarity to the class
   embeddings; those trained with ViLD-text also against their background embedding, softmax at its temperature;
   the others (and the teacher) softmax over the classes at the teacher's logit scale.

The run folder holds `summary.json`, the class embeddings, the region crop caches, the students (`student-<arm>`,
each a folder with a plain transformers image tower) and the logs. One process (the region loop does not use DDP)."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed

from vldistill import __version__
from vldistill.config import ExperimentConfig, RegionDistillConfig
from vldistill.data.bundle import load_data
from vldistill.data.classes import class_name_templates
from vldistill.data.detection import Proposals, RegionSet, detection_regions, region_proposals, scene_regions
from vldistill.distributed import process_rank
from vldistill.eval.base_novel import ClassSplit, split_classes
from vldistill.eval.regions import classification_figures, detection_figures, embed_proposals, proposal_scores
from vldistill.fileio import write_text_atomic
from vldistill.losses.base import LossContext
from vldistill.losses.registry import DistillationObjective, build_objective
from vldistill.models.region_student import RegionStudent
from vldistill.profile.throughput import count_parameters
from vldistill.teachers.cache import CacheReader
from vldistill.teachers.cache.regions import build_region_cache, region_embeddings
from vldistill.teachers.class_embeddings import stored_class_embeddings
from vldistill.train.region_loop import region_batches, train_regions
from vldistill.train.runs import build_plain_student, obtain_teacher
from vldistill.trained import TrainedModel, TrainResult

logger = logging.getLogger(__name__)

CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
SUMMARY_FILE = "summary.json"
ARM_TITLES = {"teacher": "teacher crop classifier (upper bound)", "text": "ViLD-text only", "image": "ViLD-image only", "both": "ViLD-text + ViLD-image"}
SCENE_SEEDS = {"train": 0, "test": 1}  # added to the config's seed: the scenes' and background boxes' streams


def load_regions(cfg: ExperimentConfig, progress: bool = True) -> tuple[RegionSet, RegionSet]:
    """The training and test regions: region_distill's detection files, else the embedded scenes (seeded by
    `data.seed`), at region_distill.image_size."""
    rd = cfg.region_distill
    if rd.detections is not None:
        train = detection_regions(rd.detections, rd.image_size, rd.image_root, progress)
        test = detection_regions(rd.test_detections, rd.image_size, rd.test_image_root, progress)
        if test.classnames != train.classnames:
            raise ValueError(f"{rd.test_detections}: its categories are not those of {rd.detections}; give both files the same list")
        return train, test
    scenes = {"train": rd.train_scenes, "test": rd.test_scenes}
    return tuple(scene_regions(split, scenes[split], cfg.data.seed, rd.image_size, rd.max_objects) for split in ("train", "test"))


def training_labels(proposals: Proposals, split: ClassSplit, unlabelled_objects: str) -> np.ndarray:
    """ViLD-text's label of each training proposal: its index among the base classes for a base object, the base
    class count (background) for a background box, and for a novel object (which no annotation names) background
    or -1 (left out), as `unlabelled_objects` says."""
    base = {label: index for index, label in enumerate(split.base)}
    background = len(split.base)
    novel_label = background if unlabelled_objects == "background" else -1
    return np.array(
        [background if c < 0 else base.get(int(c), novel_label) for c in proposals.classes], dtype=np.int64
    )


def initial_student(cfg: ExperimentConfig, teacher: TrainedModel) -> RegionStudent:
    """The region student every arm starts from (seeded by `cfg.seed`): the configured student's image tower
    (inheriting the teacher's weights when `student.inherit`) at region_distill.image_size, a projection into the
    teacher's embedding space and a background embedding."""
    set_seed(cfg.seed)
    base = build_plain_student(cfg, teacher, cfg.student.inherit)
    rd = cfg.region_distill
    return RegionStudent.from_dual_encoder(base, teacher.model.embed_dim, rd.image_size, rd.pool_size)


def train_arm(
    cfg: ExperimentConfig, arm: str, start: RegionStudent, regions: RegionSet, proposals: Proposals, labels: np.ndarray,
    base_embeddings: torch.Tensor, crops: Optional[CacheReader], out_dir: Path, log_path: Path, progress: bool,
) -> tuple[RegionStudent, DistillationObjective, TrainResult]:
    """A copy of `start` trained with arm `arm`'s losses on the training regions (same batches for every arm) and
    saved to `out_dir`; the student, its objective and its TrainResult."""
    rd: RegionDistillConfig = cfg.region_distill
    student = copy.deepcopy(start)
    set_seed(cfg.seed)
    context = LossContext(student.embed_dim, student.embed_dim, class_embeddings=base_embeddings, config_key="region_distill.losses")
    objective = build_objective(rd.arm_losses(arm), context, where="region_distill.losses")
    batches = region_batches(regions, proposals, labels, rd.train.batch_size, rd.train.steps, cfg.seed)
    result = train_regions(
        student, objective, batches, rd.train, crops=crops if objective.needs else None,
        desc=f"region student ({ARM_TITLES[arm]})", log_path=log_path, progress=progress,
    )
    student.save_pretrained(out_dir, {
        "role": f"region student, {ARM_TITLES[arm]}", "losses": rd.arm_losses(arm), "steps": result.steps,
        "seed": cfg.seed, "vldistill": __version__,
    })
    return student, objective, result


def region_figures(scores: torch.Tensor, logits: torch.Tensor, proposals: Proposals, split: ClassSplit) -> dict[str, float]:
    """Classification figures of the object proposals (their class `logits`) and AP50 of all proposals (`scores`)."""
    objects = proposals.is_object
    figures = classification_figures(logits[torch.as_tensor(objects)], proposals.classes[objects], split)
    detections = detection_figures(
        scores.numpy(), proposals.boxes, proposals.image_index,
        proposals.boxes[objects], proposals.classes[objects], proposals.image_index[objects], split,
    )
    return {**figures, **detections}


def run_region_distill(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The whole region-distillation run (see the module docstring); writes and returns `summary.json`."""
    if process_rank()[1] > 1:
        raise ValueError("vldistill region-distill runs in one process: launch it without torchrun / accelerate launch")
    started = time.perf_counter()
    rd: RegionDistillConfig = cfg.region_distill
    out_dir = Path(out_dir)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    needs_data = cfg.teacher.path is None or (rd.templates is None and not cfg.eval.templates)
    data = load_data(cfg.data, progress=progress) if needs_data else None
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", logs, progress)
    train, test = load_regions(cfg, progress)
    split = split_classes(len(train.classnames), rd.base_share, rd.split_seed)
    templates = class_name_templates(rd.templates, cfg.eval.templates, data.templates if data is not None else None)
    classes = stored_class_embeddings(
        teacher, train.classnames, templates, out_dir / CLASS_EMBEDDINGS_FILE, cfg.eval.batch_size, progress
    )
    train_proposals = region_proposals(train, rd.background_boxes, cfg.seed + SCENE_SEEDS["train"])
    test_proposals = region_proposals(test, rd.test_background_boxes, cfg.seed + SCENE_SEEDS["test"])

    def crop_cache(regions: RegionSet, proposals: Proposals, name: str) -> CacheReader:
        return build_region_cache(
            teacher.model, regions.images, proposals.boxes, proposals.image_index, out_dir / "region_cache" / name,
            context=rd.crop_context, batch_size=cfg.eval.batch_size, progress=progress,
        )

    uses_crops = any("region_image" in rd.arm_losses(arm) for arm in rd.arms)
    train_crops = crop_cache(train, train_proposals, "train") if uses_crops else None
    test_crops = crop_cache(test, test_proposals, "test")
    labels = training_labels(train_proposals, split, rd.unlabelled_objects)
    start = initial_student(cfg, teacher)
    scale = float(teacher.model.logit_scale.detach())
    teacher_embeds = region_embeddings(test_crops, np.arange(len(test_proposals)))
    teacher_logits = teacher_embeds @ classes.T
    models: dict[str, dict[str, Any]] = {
        "teacher": {
            **region_figures(proposal_scores(teacher_logits, scale), teacher_logits, test_proposals, split),
            "params": count_parameters(teacher.model),
        }
    }
    base_embeddings = classes[list(split.base)]
    for arm in rd.arms:
        student, objective, result = train_arm(
            cfg, arm, start, train, train_proposals, labels, base_embeddings, train_crops, out_dir / f"student-{arm}",
            logs / f"student-{arm}.jsonl", progress,
        )
        embeds = embed_proposals(student, test, test_proposals, cfg.eval.batch_size)
        logits = embeds @ classes.T
        if "region_text" in objective.losses:  # classes and the learned background compete at ViLD-text's temperature
            temperature = objective.losses["region_text"].temperature  # a schedule's last value
            scores = proposal_scores(logits, 1.0 / temperature, embeds @ student.background_embedding().detach())
        else:
            scores = proposal_scores(logits, scale)
        models[f"student-{arm}"] = {
            **region_figures(scores, logits, test_proposals, split), "params": count_parameters(student),
            "train_seconds": result.seconds, "losses": sorted(rd.arm_losses(arm)),
        }
    summary = {
        "command": "region-distill", "seed": cfg.seed, "teacher": str(teacher.path),
        "data": rd.detections or "embedded scenes", "classes": split.record(train.classnames), "templates": templates,
        "image_size": rd.image_size, "unlabelled_objects": rd.unlabelled_objects, "crop_context": rd.crop_context,
        "steps": rd.train.steps, "train_images": len(train.images), "test_images": len(test.images),
        "train_regions": {"objects": int(train_proposals.is_object.sum()), "background": int((~train_proposals.is_object).sum())},
        "test_regions": {"objects": int(test_proposals.is_object.sum()), "background": int((~test_proposals.is_object).sum())},
        "skipped_boxes": {"train": train.problem_counts(), "test": test.problem_counts()},
        "data_quality": {"train": train.quality.summary(), "test": test.quality.summary()},
        "models": models,
        "wall_seconds": time.perf_counter() - started,
    }
    if "student-text" in models and "student-both" in models:
        summary["image_adds"] = {
            key: models["student-both"][key] - models["student-text"][key]
            for key in ("novel_acc1", "novel_recall", "base_acc1", "ap50_novel", "ap50_base")
        }
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def format_region_summary(summary: dict[str, Any]) -> str:
    """The run's table for the terminal: per model, base / novel / all accuracy, novel recall and AP50."""
    lines = [f"{'model':<40}{'base':>7}{'novel':>7}{'all':>7}{'n.rec':>7}{'AP50b':>7}{'AP50n':>7}{'params':>11}"]
    for name, row in summary["models"].items():
        title = ARM_TITLES[name.removeprefix("student-")]
        lines.append(
            f"{title:<40}{row['base_acc1']:>7.3f}{row['novel_acc1']:>7.3f}{row['all_acc1']:>7.3f}{row['novel_recall']:>7.3f}"
            f"{row['ap50_base']:>7.3f}{row['ap50_novel']:>7.3f}{row['params']:>11,}"
        )
    if "image_adds" in summary:
        adds = summary["image_adds"]
        lines.append(f"ViLD-image adds over ViLD-text: novel acc1 {adds['novel_acc1']:+.3f}, novel AP50 {adds['ap50_novel']:+.3f}")
    lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
