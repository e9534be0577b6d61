"""Whole runs: pretrain a teacher, obtain a teacher (pretrained here or loaded), train a student."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Sized

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import IterableDataset, Subset
from transformers import CLIPModel, PreTrainedTokenizerBase

from vldistill import __version__
from vldistill.teachers.cache.meta import cache_meta
from vldistill.teachers.cache.cached import CachedTeacher, open_cached_teacher, serve_from_cache
from vldistill.teachers.cache.negatives import ITMNegativeInputs
from vldistill.binding import plain_digest
from vldistill.config import ExperimentConfig
from vldistill.data.augment import AugmentConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.pairs import PairCollator, held_out_pairs, pair_loader, repeat_batches
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.quality import DataQualityError
from vldistill.distributed import process_rank
from vldistill.export import export_student
from vldistill.data.tokenizer import build_word_tokenizer
from vldistill.losses import LOSSES, LossContext, build_objective
from vldistill.losses.registry import LossSpec, parse_loss_specs, specs_need
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.contract import BuildsStudents, Captioner, DualEncoder
from vldistill.models.inherit import inherit_weights
from vldistill.models.prompts import PROJECTED_IMAGE_EMBEDS, with_prompts
from vldistill.models.two_tower import TwoTowerDualEncoder
from vldistill.models.io import read_metadata
from vldistill.profile.throughput import count_parameters
from vldistill.models.student import clip_config_from_spec, student_config_for_tokens, student_config_from_teacher
from vldistill.train.checkpoint import (
    CheckpointDamagedError, CheckpointError, TrainState, checkpoints, latest_checkpoint, load_checkpoint,
)
from vldistill.train.blip_pretrain import (
    CAPTIONING_LOSSES, RETRIEVAL_LOSSES, captioning_fingerprint, new_captioning_teacher, new_retrieval_teacher,
    retrieval_fingerprint,
)
from vldistill.train.loop import Checkpointer, train
from vldistill.train.plan import DistillPlan
from vldistill.train.stages import Stage, plan_stages
from vldistill.train.trackers import TRACKERS_DIR, Trackers, trackers_for
from vldistill.teachers.assemble import check_teacher_fits_data, ensemble_members, load_teacher, teacher_ensemble, teacher_weights
from vldistill.trained import TrainedModel

logger = logging.getLogger(__name__)

TEXT_LENGTH = 32  # text positions of a teacher pretrained here; longer captions are truncated
CLIP_LOSSES = {"clip": {"weight": 1.0}}


def teacher_fingerprint(cfg: ExperimentConfig, data: DataBundle) -> str:
    """Hash of everything that determines a pretrained teacher: its spec, training, seed, data, version (for
    `teacher.family` blip, of the retrieval teacher: train/blip_pretrain.py)."""
    if cfg.teacher.family == "blip":
        return retrieval_fingerprint(cfg, data)
    payload = {
        "model": asdict(cfg.teacher.model),
        "two_tower": asdict(cfg.teacher.two_tower) if cfg.teacher.two_tower else None,
        "train": asdict(cfg.teacher.train),
        "seed": cfg.seed,
        "data": data.fingerprint,
        "vldistill": __version__,
    }
    return plain_digest(payload)


def _batches(
    data: DataBundle,
    preprocess,
    optim,
    seed: int,
    augment: AugmentConfig,
    extra=None,
    views=None,
    num_workers: int = 0,
    start_step: int = 0,
    attach=None,
):
    """`optim.steps` training batches of `data.train`, each as `optim.accumulation_steps` micro-batches, each
    pair augmented per `augment` (one view for every model), preprocessed for the student/primary teacher
    and, prefixed, for each `extra` teacher, plus what `attach` adds (a teacher cache's ITM negatives' inputs).
    Epoch e uses view e (fresh views every epoch), or e % `views` when reading a teacher cache of that many.
    Bad input is skipped and counted; too much of it stops the run (DataQualityError)."""
    collate = PairCollator(
        preprocess, augment=augment, seed=seed, extra=extra, views=views, quality=data.quality, attach=attach
    )
    micro = optim.accumulation_steps
    loader = pair_loader(data.train, collate, optim.batch_size, seed, num_workers, micro_batches=micro)
    return repeat_batches(loader, optim.steps * micro, data.quality, start_step=start_step * micro)


def _new_two_tower(cfg: ExperimentConfig) -> tuple[TwoTowerDualEncoder, PreTrainedTokenizerBase]:
    """The configured two-tower teacher with fresh heads and locked backbones (LiT)."""
    spec = cfg.teacher.two_tower
    model = TwoTowerDualEncoder.from_backbones(
        spec.vision, spec.text, spec.projection_dim, spec.vision_pooling, spec.text_pooling,
        trust_remote_code=cfg.teacher.trust_remote_code,
    )
    if model.tokenizer is None:
        raise ValueError(f"teacher.two_tower.text: {spec.text} holds no tokenizer")
    model.freeze_backbones()
    return model, model.tokenizer


def pretrain_teacher(
    cfg: ExperimentConfig, data: DataBundle, out_dir: Path, log_dir: Optional[Path] = None, progress: bool = True
) -> TrainedModel:
    """Train the configured teacher on the training split and save it: a CLIP built from `teacher.model`
    from scratch, or only the projection heads of `teacher.two_tower` (LiT), with the CLIP loss; for
    `teacher.family` blip, a BLIP retrieval model built from `teacher.model` from scratch with ITC + ITM
    (train/blip_pretrain.py). A progress bar when `progress`."""
    set_seed(cfg.seed)
    if cfg.teacher.two_tower is not None:
        teacher, tokenizer = _new_two_tower(cfg)
        return _pretrain(cfg, data, teacher, tokenizer, out_dir, log_dir, progress)
    tokenizer = build_word_tokenizer(data.words(), max_length=TEXT_LENGTH)
    if cfg.teacher.family == "blip":
        teacher = new_retrieval_teacher(cfg, tokenizer, TEXT_LENGTH)
        return _pretrain(cfg, data, teacher, tokenizer, out_dir, log_dir, progress, losses=RETRIEVAL_LOSSES)
    config = clip_config_from_spec(
        cfg.teacher.model,
        image_size=cfg.data.image_size,
        vocab_size=len(tokenizer),
        max_text_length=TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _pretrain(cfg, data, CLIPDualEncoder(CLIPModel(config)), tokenizer, out_dir, log_dir, progress)


def run_trackers(cfg: ExperimentConfig, log_path: Optional[Path], out_dir: Path) -> Optional[Trackers]:
    """The experiment trackers `cfg.log` selects for the run saved to `out_dir`: named after its log file (else
    its folder), writing beside that log in `trackers/` (else in `out_dir`'s parent's logs/trackers) unless
    `log.dir` says where; the resolved config as hyperparameters. None when no tracker is selected."""
    name = Path(log_path).stem if log_path is not None else Path(out_dir).name
    logs = Path(log_path).parent if log_path is not None else Path(out_dir).parent / "logs"
    return trackers_for(cfg.log, name, logs / TRACKERS_DIR, cfg.to_dict())


def _pretrain(
    cfg: ExperimentConfig,
    data: DataBundle,
    teacher: nn.Module,
    tokenizer,
    out_dir: Path,
    log_dir,
    progress: bool,
    *,
    losses: Mapping[str, Mapping[str, Any]] = CLIP_LOSSES,
    fingerprint: Optional[str] = None,
    name: str = "teacher",
) -> TrainedModel:
    """Train `teacher` from the start with the task `losses` on the training split in `teacher.train`
    settings, logging to `<log_dir>/<name>.jsonl`, and save it to `out_dir` with its `fingerprint` (default:
    `teacher_fingerprint`)."""
    embed_dim = getattr(teacher, "embed_dim", 0)  # a captioner has no embedding space: its LM loss reads none
    objective = build_objective(losses, LossContext(embed_dim))
    preprocess = BatchPreprocessor.for_model(tokenizer, teacher.input_spec)
    batches = _batches(data, preprocess, cfg.teacher.train, cfg.seed, cfg.data.augment, num_workers=cfg.data.num_workers)
    log_path = log_dir / f"{name}.jsonl" if log_dir else None
    fingerprint = teacher_fingerprint(cfg, data) if fingerprint is None else fingerprint
    metadata = {"role": "teacher", "fingerprint": fingerprint, "vldistill": __version__}

    def save(folder: Path) -> Path:
        return teacher.save_pretrained(folder, metadata, tokenizer=tokenizer)

    with saved_on_bad_data(lambda: save(Path(out_dir).with_name(f"{Path(out_dir).name}-interrupted"))):
        result = train(
            teacher, objective, batches, cfg.teacher.train, desc=f"pretrain {name}", log_path=log_path, progress=progress,
            trackers=run_trackers(cfg, log_path, out_dir),
        )
    if process_rank()[0] == 0:  # one writer when several processes train together
        save(out_dir)
    return TrainedModel(teacher, tokenizer, Path(out_dir), result)


def run_fingerprint(cfg: ExperimentConfig, losses: Mapping[str, Any], inherit: bool, teacher: Path) -> str:
    """A hash of what determines a student run (config without checkpoint and tracker settings, losses, teacher,
    version): a checkpoint from a run with another fingerprint is refused."""
    config = cfg.to_dict()
    config["distill"].pop("checkpoint")
    config.pop("log")  # where training is reported to does not change what it trains
    payload = {"config": config, "losses": losses, "inherit": inherit, "teacher": str(teacher), "vldistill": __version__}
    return plain_digest(payload)


def resume_state(resume: Optional[str], folder: Path, fingerprint: str) -> Optional[TrainState]:
    """The state to resume from: the newest checkpoint in `folder` for "latest" (an error when there is
    none) or "auto" (None when there is none: a command that a scheduler may restart); the checkpoint at
    the path `resume`; without `resume`, None, refusing a `folder` that holds another run's checkpoints
    (a fresh run would interleave its checkpoints with them)."""
    if resume not in (None, "latest", "auto"):
        return load_checkpoint(Path(resume), fingerprint)
    newest = latest_checkpoint(folder)
    if resume is None:
        if newest is not None:
            raise CheckpointError(
                f"{folder} holds checkpoints of an earlier run (newest: {newest.name}): continue it with --resume, "
                "or delete the folder (or choose another --out) to start over"
            )
        return None
    if newest is None:
        if resume == "auto":
            return None
        raise CheckpointError(f"--resume: no checkpoint in {folder} (set distill.checkpoint.every to write them)")
    return _newest_readable(folder, fingerprint)


def _newest_readable(folder: Path, fingerprint: str) -> TrainState:
    """The newest checkpoint in `folder` that reads back whole, saying which damaged ones were passed over."""
    found = checkpoints(folder)
    for path in reversed(found):
        try:
            return load_checkpoint(path, fingerprint)
        except CheckpointDamagedError as error:
            logger.warning(f"{error}; trying the checkpoint before it")
    raise CheckpointError(f"--resume: every checkpoint in {folder} is damaged ({len(found)})")


@contextmanager
def saved_on_bad_data(save: Callable[[], Path]) -> Iterator[None]:
    """Run the block; if too much bad input stops it (DataQualityError), first save the model trained so
    far with `save`, then re-raise saying where it is."""
    try:
        yield
    except DataQualityError as error:
        raise DataQualityError(f"{error}\nthe model trained so far was saved to {save()}") from None


def obtain_teacher(
    cfg: ExperimentConfig, data: DataBundle, cache_dir: Path, log_dir: Optional[Path] = None, progress: bool = True
) -> TrainedModel:
    """The configured (primary) teacher: `teacher.path` when set, else a pretrained one from `cache_dir`
    if it matches this config and data exactly, else a newly pretrained one saved there (a progress bar
    when `progress`)."""
    if cfg.teacher.path is not None:
        return load_teacher(cfg.teacher.path, cfg.teacher.trust_remote_code)
    if read_metadata(cache_dir).get("fingerprint") == teacher_fingerprint(cfg, data):
        logger.info("reusing the teacher in %s (it matches this config and data)", cache_dir)
        return load_teacher(str(cache_dir))
    return pretrain_teacher(cfg, data, cache_dir, log_dir, progress)


def pretrain_captioning_teacher(
    cfg: ExperimentConfig, data: DataBundle, out_dir: Path, log_dir: Optional[Path] = None, progress: bool = True
) -> TrainedModel:
    """Train the BLIP captioning teacher of `teacher.family` blip from scratch (vision tower
    `teacher.model.vision`, decoder `teacher.model.decoder`, the retrieval teacher's tokenizer) with the
    captioning LM loss on the training split in `teacher.train` settings and save it to `out_dir` (its log
    `<log_dir>/captioner.jsonl`; a progress bar when `progress`)."""
    if cfg.teacher.family != "blip":
        raise ValueError(f"a captioning teacher is pretrained for teacher.family blip, not {cfg.teacher.family!r}")
    set_seed(cfg.seed)
    tokenizer = build_word_tokenizer(data.words(), max_length=TEXT_LENGTH)
    captioner = new_captioning_teacher(cfg, tokenizer, TEXT_LENGTH)
    return _pretrain(
        cfg, data, captioner, tokenizer, out_dir, log_dir, progress,
        losses=CAPTIONING_LOSSES, fingerprint=captioning_fingerprint(cfg, data), name="captioner",
    )


def obtain_captioning_teacher(
    cfg: ExperimentConfig, data: DataBundle, cache_dir: Path, log_dir: Optional[Path] = None, progress: bool = True
) -> TrainedModel:
    """The BLIP captioning teacher of `teacher.family` blip: the one saved in `cache_dir` if it matches this
    config and data exactly (train/blip_pretrain.captioning_fingerprint), else a newly pretrained one saved
    there (`pretrain_captioning_teacher`)."""
    if cfg.teacher.family == "blip" and read_metadata(cache_dir).get("fingerprint") == captioning_fingerprint(cfg, data):
        logger.info("reusing the captioning teacher in %s (it matches this config and data)", cache_dir)
        return load_teacher(str(cache_dir))
    return pretrain_captioning_teacher(cfg, data, cache_dir, log_dir, progress)


def cached_teacher(cfg: ExperimentConfig, data: DataBundle, primary: TrainedModel) -> CachedTeacher:
    """The teachers read from the cache at `cache.path`, which must have been built from exactly these
    teachers (loaded, never run), data and views."""
    members = ensemble_members(cfg, primary)
    return open_cached_teacher(cfg.cache.path, cache_meta(cfg, data, members), teacher_weights(cfg), cfg.teacher.combine)


def build_student(cfg: ExperimentConfig, primary: TrainedModel, inherit: bool) -> DualEncoder | Captioner:
    """The configured student (`build_plain_student`), wrapped in learnable prompts when `student.prompts` is set
    (models/prompts.py; a projector_dim of "teacher" maps to the primary teacher's embedding size)."""
    student = build_plain_student(cfg, primary, inherit)
    if cfg.student.prompts is None:
        return student
    return with_prompts(student, cfg.student.prompts, primary.tokenizer, primary.model.embed_dim)


def build_plain_student(cfg: ExperimentConfig, primary: TrainedModel, inherit: bool) -> DualEncoder | Captioner:
    """The configured student for the primary teacher's tokenizer and images, optionally inheriting its
    weights: the teacher's own kind from a teacher that builds its students (contract.BuildsStudents, e.g.
    a BLIP retrieval model or a BLIP captioner), else a CLIP (inheriting from a teacher that offers a
    CLIPModel, see DualEncoder.inheritable_clip)."""
    teacher, spec = primary.model, cfg.student.model
    if isinstance(teacher, BuildsStudents):
        return teacher.build_student(spec, inherit)
    if not isinstance(teacher, DualEncoder):
        raise ValueError(
            f"teacher.path: {primary.path} holds a {type(teacher).__name__}, not a dual encoder; "
            "vldistill distill trains image-text retrieval students from dual-encoder teachers"
        )
    source = teacher.inheritable_clip()
    if source is not None:
        config = student_config_from_teacher(source.config, spec)
    elif inherit:
        raise ValueError(
            f"student.inherit needs a CLIP teacher, but {primary.path} is a {type(teacher).__name__}; "
            "set student.inherit=false"
        )
    else:
        config = student_config_for_tokens(spec, teacher.input_spec.image_size, teacher.text_token_settings())
    student = CLIPDualEncoder(CLIPModel(config), teacher.input_spec.image_mean, teacher.input_spec.image_std)
    if inherit:
        inherit_weights(student.model, source)
    return student


def held_out_batch(
    data: DataBundle, preprocess, batch_size: int, seed: int, extra: Optional[dict] = None
) -> dict[str, torch.Tensor]:
    """A fixed, unaugmented batch for gap weighting, from the validation set when there is one, else from the
    training set: `batch_size` good pairs drawn with `seed` (fewer only when a map-style set holds fewer pairs),
    a bad pair replaced by the next good one (see `held_out_pairs`). Several processes each take an equal
    share, which the losses gather back into the whole batch; ValueError when the data lacks good pairs."""
    source = "the validation data" if data.val is not None else "the training data"
    dataset = data.val if data.val is not None else data.train
    rank, world = process_rank()
    samples = held_out_pairs(dataset, batch_size, seed, rank, world, source)
    return PairCollator(preprocess, extra=extra)(samples)


def _loss_context(student: DualEncoder | Captioner, teachers: Optional[nn.Module], primary) -> LossContext:
    """Sizes the losses build projections and layer maps from (the layer-wise losses need a primary teacher
    with an architecture spec)."""
    student_spec = student.architecture_spec()
    if isinstance(student, Captioner):  # no embedding space: its losses (caption, layer-wise) read only the specs
        teacher_spec = primary.architecture_spec() if teachers is not None else None
        return LossContext(student_spec.projection_dim, student_spec=student_spec, teacher_spec=teacher_spec)
    if teachers is None:
        return LossContext(student.embed_dim, student_spec=student_spec)
    return LossContext(
        student.embed_dim,
        teachers.embed_dim,
        student_spec=student_spec,
        teacher_spec=primary.architecture_spec(),
    )


def check_captioning_run(cfg: ExperimentConfig, specs: Sequence[LossSpec], captioner: Captioner, where: str) -> None:
    """Raise ValueError when a captioning teacher cannot train its student as configured: a further teacher
    (captioners are not ensembled), or a loss (at `where`.<name>) reading signals a captioner does not return
    (its `signal_names`: caption, vision and decoder signals; no embeddings, ITM or text-encoder layers)."""
    if cfg.teacher.ensemble:
        raise ValueError("teacher.ensemble is set, but a captioning teacher distills alone: remove teacher.ensemble")
    for spec in specs:
        missing = (spec.needs | LOSSES.get(spec.name).student_needs) - captioner.signal_names
        if missing:
            raise ValueError(
                f"{where}.{spec.name} reads {', '.join(sorted(missing))}, which a captioning model does not return "
                f"(it returns {', '.join(sorted(captioner.signal_names))}); for hidden / attention select "
                "towers vision and decoder"
            )


def first_pairs(data: DataBundle, count: Optional[int]) -> DataBundle:
    """`data` with only the first `count` training pairs (all of them when `count` is None); the pairs keep
    their indices, so their augmented views and teacher-cache rows are those of the whole set."""
    if count is None:
        return data
    if isinstance(data.train, IterableDataset):
        raise ValueError("distill.train_pairs needs map-style training data (a manifest, folder or HF dataset), not a stream")
    if count > len(data.train):
        raise ValueError(f"distill.train_pairs is {count} but the training data holds {len(data.train)} pairs")
    return dataclasses.replace(data, train=Subset(data.train, range(count)))


def unread_projector(student: nn.Module, objective: nn.Module) -> frozenset[str]:
    """The names (in loop.StudentWithObjective) of a prompted student's projector parameters when no selected loss
    reads its projected embeddings (they would get no gradient, which DDP refuses), saying so; else none."""
    projector = getattr(student, "projector", None)
    if projector is None or PROJECTED_IMAGE_EMBEDS.name in objective.needs | objective.student_needs:
        return frozenset()
    logger.warning(
        "student.prompts.projector_dim is set, but no selected loss reads the projected embeddings: the projector "
        "stays as initialized (select class_kd with student: projected, or set projector_dim: null)"
    )
    return frozenset(f"student.projector.{name}" for name, _ in projector.named_parameters())


def without_parameters(stages: Sequence[Stage], student: nn.Module, names: frozenset[str]) -> list[Stage]:
    """`stages` none of which trains the parameters `names` (frozen now, and left out of every stage's selection)."""
    if not names:
        return list(stages)
    for name, param in student.named_parameters():
        if f"student.{name}" in names:
            param.requires_grad_(False)
    return [stage if stage.trainable is None else dataclasses.replace(stage, trainable=stage.trainable - names) for stage in stages]


def plan_student_run(
    cfg: ExperimentConfig,
    data: DataBundle,
    teacher: TrainedModel,
    out_dir: Path,
    *,
    losses: Optional[Mapping[str, Mapping[str, Any]]] = None,
    inherit: Optional[bool] = None,
    resume: Optional[str] = None,
    student: Optional[DualEncoder] = None,
    class_embeddings: Optional[torch.Tensor] = None,
) -> DistillPlan:
    """Resolve a student run once: the losses (default `cfg.distill.losses`) and inheritance (default
    `cfg.student.inherit`), the teachers' source (the cache at `cache.path` when it can serve every loss, see
    cache.teacher.serve_from_cache; else the online ensemble when a loss needs a teacher; else none), the
    student (`student` when given, e.g. a saved student to fine-tune; else built from the config, seeded with
    `cfg.seed`), the objective (given the teacher's stored `class_embeddings` under prompt distillation), the
    training stages (`distill.stages`, train/stages.py; a projector no loss reads is frozen, `unread_projector`),
    the checkpoints beside `out_dir` and the state `resume` names, the batches from that state's step on and gap
    weighting's held-out batch."""
    captioning = isinstance(teacher.model, Captioner)  # a captioner's student trains with distill.caption_losses
    where = "distill.caption_losses" if captioning else "distill.losses"
    if losses is None:
        specs = cfg.distill.caption_loss_specs if captioning else cfg.distill.loss_specs
        losses = cfg.distill.caption_losses if captioning else cfg.distill.losses
    else:
        specs = parse_loss_specs(losses, where)
    if captioning:
        check_captioning_run(cfg, specs, teacher.model, where)
    inherit = cfg.student.inherit if inherit is None else inherit
    check_teacher_fits_data(teacher.model, cfg.data.image_size)
    from_cache = serve_from_cache(cfg.cache, specs, cfg.distill.weighting, where, teachers=1 + len(cfg.teacher.ensemble))
    set_seed(cfg.seed)
    student = build_student(cfg, teacher, inherit) if student is None else student
    if from_cache:  # a cache holds every training pair; the student reads the rows of its own
        teachers, extra = cached_teacher(cfg, data, teacher), {}
        teachers.require(specs_need(specs))
    else:
        teachers, extra = teacher_ensemble(cfg, teacher, student.input_spec) if specs_need(specs) else (None, {})
    context = dataclasses.replace(_loss_context(student, teachers, teacher.model), class_embeddings=class_embeddings)
    objective = build_objective(specs, context, where=where, weighting=cfg.distill.weighting)
    preprocess = BatchPreprocessor.for_model(teacher.tokenizer, student.input_spec)
    attach = None
    if from_cache and "itm_logits" in specs_need(specs):  # each batch carries the inputs of the cached ITM negatives
        attach = ITMNegativeInputs.from_cache(teachers, data.train, preprocess, cfg.data.augment, cfg.seed)
    optim = cfg.distill.train
    stages = without_parameters(plan_stages(cfg.distill.stages, optim, student, objective), student, unread_projector(student, objective))
    views = cfg.cache.views if from_cache else None
    fingerprint = run_fingerprint(cfg, losses, inherit, teacher.path)
    folder = Path(out_dir).with_name(f"{Path(out_dir).name}-checkpoints")
    checkpointer = Checkpointer(folder, cfg.distill.checkpoint.every, cfg.distill.checkpoint.keep, fingerprint)
    state = resume_state(resume, folder, fingerprint)
    start_step = state.step if state is not None else 0
    data = first_pairs(data, cfg.distill.train_pairs)
    batches = _batches(
        data, preprocess, optim, cfg.seed, cfg.data.augment, extra, views, cfg.data.num_workers, start_step, attach
    )
    held_out = held_out_batch(data, preprocess, optim.batch_size, cfg.seed, extra) if objective.needs_held_out else None
    return DistillPlan(
        losses=losses, inherit=inherit, from_cache=from_cache, student=student, teachers=teachers, objective=objective,
        data=data, batches=batches, optim=optim, held_out=held_out,
        checkpointer=checkpointer if checkpointer.every else None, resume=state, stages=stages,
    )


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
    resume: Optional[str] = None,
    progress: bool = True,
    student: Optional[DualEncoder] = None,
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None,
) -> TrainedModel:
    """Build the configured student for the (primary) teacher (or take `student`, e.g. a saved one to distill
    further), train it with `losses` (default: `cfg.distill.losses`) plus `penalty` (train/ewc.py) and save it.
    The teachers are used only if a loss needs them: read from the
    teacher cache at `cache.path` when it can serve every loss (see cache.teacher.serve_from_cache),
    else run online. A progress bar when `progress`."""
    plan = plan_student_run(cfg, data, teacher, out_dir, losses=losses, inherit=inherit, resume=resume, student=student)
    plan.penalty = penalty
    student, data = plan.student, plan.data
    metadata = {
        "role": "student",
        "teacher": str(teacher.path),
        "ensemble": [{"path": t.path, "weight": t.weight} for t in cfg.teacher.ensemble],
        "combine": cfg.teacher.combine,
        "teacher_cache": cfg.cache.path if plan.from_cache else None,
        "losses": {k: dict(v) for k, v in plan.losses.items()},
        "weighting": asdict(cfg.distill.weighting),
        "inherit": plan.inherit,
        "seed": cfg.seed,
        "vldistill": __version__,
    }
    interrupted = Path(out_dir).with_name(f"{Path(out_dir).name}-interrupted")
    with saved_on_bad_data(lambda: student.save_pretrained(interrupted, metadata, tokenizer=teacher.tokenizer)):
        result = plan.train(desc, log_path, progress, run_trackers(cfg, log_path, out_dir))
    if process_rank()[0] == 0:  # one writer when several processes train together
        export_student(student, teacher.tokenizer, out_dir, {
            **metadata, "data_quality": data.quality.summary(), "steps": result.steps,
            "train_pairs": len(data.train) if isinstance(data.train, Sized) else cfg.distill.train_pairs,
            "teacher_params": count_parameters(teacher.model),
        })
    return TrainedModel(student, teacher.tokenizer, Path(out_dir), result)
