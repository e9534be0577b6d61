"""Training a region student (ViLD, models/region_student.py) on batches of images with their boxes: the objective
(losses/regions.py) reads the student's region signals and, for ViLD-image, the teacher's crop embeddings read from
the region crop cache. One process, fp32, AdamW with warmup-cosine like the main loop (train/loop.py), whose
pair batches, DDP gathering and checkpoints region batches do not fit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vldistill.config import OptimConfig
from vldistill.data.detection import Proposals, RegionSet
from vldistill.data.preprocess import model_pixel_values
from vldistill.losses.registry import DistillationObjective
from vldistill.models.region_student import RegionStudent
from vldistill.models.signals import Signals
from vldistill.teachers.cache import CacheReader
from vldistill.teachers.cache.regions import region_embeddings
from vldistill.train.loop import NonFiniteLossError, parameter_groups
from vldistill.trained import TrainResult


@dataclass
class RegionBatch:
    """One step's images (B, H, W, 3) uint8 and their regions: boxes (R, 4), the batch image of each (R,), their
    training labels (R,) and their rows in the region crop cache (R,)."""

    images: np.ndarray
    boxes: np.ndarray
    image_index: np.ndarray
    labels: np.ndarray
    rows: np.ndarray


def region_batches(
    regions: RegionSet, proposals: Proposals, labels: np.ndarray, batch_size: int, steps: int, seed: int
) -> Iterator[RegionBatch]:
    """`steps` batches of `batch_size` images, each epoch a fresh seeded permutation of the images, with every
    proposal of those images (proposal r is row r of the crop cache)."""
    rng = np.random.default_rng(seed)
    count = len(regions.images)
    if batch_size > count:
        raise ValueError(f"a batch of {batch_size} images needs at least that many training images, got {count}")
    by_image = np.split(np.argsort(proposals.image_index, kind="stable"), np.cumsum(np.bincount(proposals.image_index, minlength=count))[:-1])
    order = rng.permutation(count)
    position = 0
    for _ in range(steps):
        if position + batch_size > count:
            order, position = rng.permutation(count), 0
        chosen = order[position : position + batch_size]
        position += batch_size
        rows = np.concatenate([by_image[image] for image in chosen])
        local = np.repeat(np.arange(batch_size), [len(by_image[image]) for image in chosen])
        yield RegionBatch(regions.images[chosen], proposals.boxes[rows], local, labels[rows], rows)


def train_regions(
    student: RegionStudent,
    objective: DistillationObjective,
    batches: Iterable[RegionBatch],
    optim: OptimConfig,
    *,
    crops: Optional[CacheReader] = None,
    desc: str = "region student",
    log_path: Optional[Path] = None,
    progress: bool = True,
) -> TrainResult:
    """Train `student` and the objective's own parameters for `optim.steps` steps on `batches` (AdamW, warmup-cosine,
    gradient clipping; a non-finite step is skipped, `optim.max_nonfinite` in a row stop the run). The teacher's crop
    embeddings are read from `crops` (required when a loss needs them). Losses and the learning rate are logged every
    `optim.log_every` steps to the history and `log_path` (JSONL); a progress bar when `progress`."""
    if objective.needs and crops is None:
        raise ValueError(f"the region losses need the teacher's {', '.join(sorted(objective.needs))}: give the region crop cache")
    module = nn.ModuleDict({"student": student, "objective": objective})
    optimizer = torch.optim.AdamW(parameter_groups(module, optim.weight_decay), lr=optim.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, optim.steps)
    module.train()
    history: list[dict[str, float]] = []
    start, step, nonfinite, in_a_row = time.perf_counter(), 0, 0, 0
    log = open(log_path, "w") if log_path is not None else None
    bar = tqdm(total=optim.steps, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for batch in batches:
            objective.set_progress(step, optim.steps)
            pixels = model_pixel_values(torch.as_tensor(batch.images), None, student.image_mean, student.image_std)
            signals = student(
                pixels, torch.as_tensor(batch.boxes), torch.as_tensor(batch.image_index), torch.as_tensor(batch.labels)
            )
            teacher = Signals(region_crop_embeds=region_embeddings(crops, batch.rows)) if objective.needs else None
            loss, parts = objective(signals, teacher)
            if torch.isfinite(loss):
                in_a_row = 0
                loss.backward()
                if optim.grad_clip is not None:
                    nn.utils.clip_grad_norm_(module.parameters(), optim.grad_clip)
                optimizer.step()
            else:
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                if in_a_row >= optim.max_nonfinite:
                    raise NonFiniteLossError(f"{in_a_row} non-finite region losses in a row (last at step {step + 1}); lower the learning rate")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % optim.log_every == 0 or step == optim.steps:
                record = {"step": step, "seconds": round(time.perf_counter() - start, 3), "lr": scheduler.get_last_lr()[0],
                          **{k: float(v) for k, v in {**parts, **objective.settings()}.items()}}
                history.append(record)
                bar.set_postfix(loss=f"{record['loss/total']:.3f}")
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if step == optim.steps:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
        module.eval()
    return TrainResult(steps=step, seconds=time.perf_counter() - start, history=history, nonfinite_steps=nonfinite)
