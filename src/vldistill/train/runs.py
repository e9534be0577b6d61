"""Whole runs: pretrain a teacher, obtain a teacher (pretrained here or loaded), train a student."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from accelerate.utils import set_seed
from transformers import CLIPModel, PreTrainedTokenizerBase

from vldistill import __version__
from vldistill.config import ExperimentConfig
from vldistill.data.augment import AugmentConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.pairs import InMemoryPairs, PairCollator, pair_loader, repeat_batches
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.losses import LossContext, build_objective
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.inherit import inherit_weights
from vldistill.models.io import load_dual_encoder, read_metadata, save_dual_encoder
from vldistill.models.student import clip_config_from_spec, spec_from_clip_config, student_config_from_teacher
from vldistill.train.loop import TrainResult, train

TEXT_LENGTH = 32  # text positions of a teacher pretrained here; longer captions are truncated


@dataclass
class TrainedModel:
    """A trained dual encoder with its tokenizer, where it was saved and how its training went."""

    model: CLIPDualEncoder
    tokenizer: PreTrainedTokenizerBase
    path: Path
    result: Optional[TrainResult] = None


def teacher_fingerprint(cfg: ExperimentConfig, data: DataBundle) -> str:
    """Hash of everything that determines a pretrained teacher: its spec, training, seed, data, version."""
    payload = {
        "model": asdict(cfg.teacher.model),
        "train": asdict(cfg.teacher.train),
        "seed": cfg.seed,
        "data": data.fingerprint,
        "vldistill": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _batches(split, tokenizer, max_length: int, batch_size: int, steps: int, seed: int, augment: AugmentConfig):
    """`steps` training batches of `split`, each pair augmented per `augment` (one view for teacher and student)."""
    collate = PairCollator(make_tokenize(tokenizer, max_length), augment=augment, seed=seed)
    loader = pair_loader(InMemoryPairs(split.images, split.captions, split.attributes), collate, batch_size, seed)
    return repeat_batches(loader, steps)


def pretrain_teacher(cfg: ExperimentConfig, data: DataBundle, out_dir: Path, log_dir: Optional[Path] = None) -> TrainedModel:
    """Train `cfg.teacher.model` from scratch with the CLIP loss on the training split and save it."""
    set_seed(cfg.seed)
    tokenizer = build_word_tokenizer(data.words(), max_length=TEXT_LENGTH)
    config = clip_config_from_spec(
        cfg.teacher.model,
        image_size=cfg.data.image_size,
        vocab_size=len(tokenizer),
        max_text_length=TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    teacher = CLIPDualEncoder(CLIPModel(config))
    objective = build_objective({"clip": {"weight": 1.0}}, LossContext(teacher.embed_dim))
    optim = cfg.teacher.train
    batches = _batches(data.train, tokenizer, TEXT_LENGTH, optim.batch_size, optim.steps, cfg.seed, cfg.data.augment)
    log_path = log_dir / "teacher.jsonl" if log_dir else None
    result = train(teacher, objective, batches, optim, desc="pretrain teacher", log_path=log_path)
    metadata = {"role": "teacher", "fingerprint": teacher_fingerprint(cfg, data), "vldistill": __version__}
    save_dual_encoder(teacher, tokenizer, out_dir, metadata=metadata)
    return TrainedModel(teacher, tokenizer, Path(out_dir), result)


def obtain_teacher(cfg: ExperimentConfig, data: DataBundle, cache_dir: Path, log_dir: Optional[Path] = None) -> TrainedModel:
    """The configured teacher: `teacher.path` when set, else a pretrained one from `cache_dir` if it matches
    this config and data exactly, else a newly pretrained one saved there."""
    if cfg.teacher.path is not None:
        model, tokenizer = load_dual_encoder(cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
        return TrainedModel(model, tokenizer, Path(cfg.teacher.path))
    if read_metadata(cache_dir).get("fingerprint") == teacher_fingerprint(cfg, data):
        model, tokenizer = load_dual_encoder(cache_dir)
        return TrainedModel(model, tokenizer, Path(cache_dir))
    return pretrain_teacher(cfg, data, cache_dir, log_dir)


def check_teacher_fits_data(teacher: CLIPDualEncoder, data_image_size: int) -> None:
    """Raise ValueError when the data's images are not the size the teacher's image tower takes."""
    expected = teacher.model.config.vision_config.image_size
    if expected != data_image_size:
        raise ValueError(f"data.image_size is {data_image_size} but the teacher takes {expected}x{expected} images")


def held_out_batch(data: DataBundle, tokenizer, max_length: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A fixed, unaugmented batch for gap weighting: `batch_size` pairs (at most the split) drawn with
    `seed` from the validation split when there is one, else from the training split."""
    split = data.val if data.val is not None else data.train
    pairs = InMemoryPairs(split.images, split.captions)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return PairCollator(make_tokenize(tokenizer, max_length))([pairs[i] for i in order.tolist()])


def train_student(
    cfg: ExperimentConfig,
    data: DataBundle,
    teacher: TrainedModel,
    out_dir: Path,
    *,
    losses: Optional[Mapping[str, Mapping[str, Any]]] = None,
    inherit: Optional[bool] = None,
    desc: str = "distill student",
    log_path: Optional[Path] = None,
) -> TrainedModel:
    """Build the configured student from the teacher's config, train it with `losses` (default:
    `cfg.distill.losses`; the teacher runs online only if a loss needs it) and save it to `out_dir`."""
    losses = cfg.distill.losses if losses is None else losses
    inherit = cfg.student.inherit if inherit is None else inherit
    check_teacher_fits_data(teacher.model, cfg.data.image_size)
    set_seed(cfg.seed)
    student = CLIPDualEncoder(CLIPModel(student_config_from_teacher(teacher.model.model.config, cfg.student.model)))
    if inherit:
        inherit_weights(student.model, teacher.model.model)
    context = LossContext(
        student.embed_dim,
        teacher.model.embed_dim,
        student_spec=spec_from_clip_config(student.model.config),
        teacher_spec=spec_from_clip_config(teacher.model.model.config),
    )
    objective = build_objective(losses, context, where="distill.losses", weighting=cfg.distill.weighting)
    optim = cfg.distill.train
    max_length = teacher.model.model.config.text_config.max_position_embeddings
    batches = _batches(
        data.train, teacher.tokenizer, max_length, optim.batch_size, optim.steps, cfg.seed, cfg.data.augment
    )
    held_out = (
        held_out_batch(data, teacher.tokenizer, max_length, optim.batch_size, cfg.seed)
        if objective.needs_held_out
        else None
    )
    result = train(
        student, objective, batches, optim, teacher=teacher.model, desc=desc, log_path=log_path, held_out_batch=held_out
    )
    metadata = {
        "role": "student",
        "teacher": str(teacher.path),
        "teacher_spec": asdict(spec_from_clip_config(teacher.model.model.config)),
        "losses": {k: dict(v) for k, v in losses.items()},
        "inherit": inherit,
        "seed": cfg.seed,
        "vldistill": __version__,
    }
    save_dual_encoder(student, teacher.tokenizer, out_dir, metadata=metadata)
    return TrainedModel(student, teacher.tokenizer, Path(out_dir), result)
