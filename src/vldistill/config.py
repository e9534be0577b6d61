"""Experiment configs: plain dataclasses filled from YAML plus `--set a.b=c` overrides, validated up
front so a bad key, type or value fails before any work with a message naming it."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from vldistill.binding import ConfigError, apply_override, build_dataclass, over_defaults
from vldistill.data.augment import AugmentConfig
from vldistill.data.caption_json import parse_split
from vldistill.data.domains import check_shapes_filter
from vldistill.data.templates import check_template_entries
from vldistill.losses.base import LossContext
from vldistill.losses.registry import LossSpec, build_objective, parse_loss_specs, specs_need
from vldistill.teachers.ensemble import COMBINE_METHODS, TEACHER_PRECISIONS
from vldistill.models.inherit import check_inheritable
from vldistill.models.prompts import PromptConfig
from vldistill.models.spec import DualEncoderSpec, TowerSpec
from vldistill.models.two_tower import TEXT_POOLINGS, VISION_POOLINGS
from vldistill.losses.schedules import WeightingConfig

PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 on a GPU that supports it, else fp32
RETRIEVAL_MATCHES = ("pair", "identical_caption")
DATASETS = ("shapes", "files")
CACHE_DTYPES = ("float16", "float32")
CACHE_MODES = ("auto", "require")
AUTO_BATCH_SIZE = "auto"  # cache.batch_size: probe the teachers' throughput for the fastest size
SWEEP_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # sweep.students names: they name run folders
TEACHER_FAMILIES = ("clip", "blip")  # teacher.family: what `pretrain-teacher` builds from teacher.model


def check_caption_file_options(
    source: Optional[str], split: Optional[str], image_root: Optional[str], keys: tuple[str, str, str]
) -> None:
    """Raise ConfigError naming the setting when a split or image folder is given for a source that is
    not a .json caption file, a split names no Karpathy split, or the image folder is not a folder.
    `keys` name the source, split and image folder settings (config keys or command-line options)."""
    source_key, split_key, root_key = keys
    for key, value in ((split_key, split), (root_key, image_root)):
        if value is not None and not (source and Path(source).suffix.lower() == ".json"):
            raise ConfigError(
                f"{key} applies only to a .json caption file (Karpathy split or COCO captions) in {source_key}, got {source!r}"
            )
    if split is not None:
        try:
            parse_split(split)
        except ValueError as error:
            raise ConfigError(f"{split_key}: {error}") from None
    if image_root is not None and not (image_root and Path(image_root).is_dir()):
        raise ConfigError(f"{root_key}: {image_root!r} is not a folder")


@dataclass
class DataConfig:
    """Which pair data to train and evaluate on: the embedded synthetic `shapes` set (sizes and seed
    below), or your own `files`: `train` and `test` pairs (a JSONL/CSV manifest, a folder of images
    with .txt captions, a saved Hugging Face dataset, webdataset .tar shards, or a .json caption file:
    a Karpathy split file such as dataset_coco.json or a COCO captions_*.json), optionally `classes`
    (a folder per class; `classnames`: a JSON {folder: name} map, else folder names) for zero-shot
    classification and `templates` (a file, one prompt per line).
    For a Karpathy split file, `train_split` / `test_split` choose the split (train, val, test or
    restval, or a union such as train+restval; null: train for `train`, test for `test`); a COCO
    captions file is one split and takes none. `train_image_root` / `test_image_root`: the folder the
    caption file's image paths are under (null: the file's folder).
    Broken samples are skipped and counted; a bad share above `max_bad_share` stops the run.
    `num_workers` processes decode training batches (0: in the training process).
    `augment` sets the training views (evaluation never augments)."""

    dataset: str = "shapes"
    image_size: int = 32
    train_size: int = 20000
    val_size: int = 512
    test_size: int = 1000
    seed: int = 0
    train: Optional[str] = None
    test: Optional[str] = None
    classes: Optional[str] = None
    classnames: Optional[str] = None
    templates: Optional[str] = None
    train_split: Optional[str] = None
    test_split: Optional[str] = None
    train_image_root: Optional[str] = None
    test_image_root: Optional[str] = None
    max_bad_share: float = 0.01
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shapes_filter: dict[str, Any] = field(default_factory=dict)
    """One domain of the shapes data: attribute -> the values kept, e.g. {shape: [circle, square]} (data/domains.py)."""

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"{where}.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "files":
            for name in ("train", "test"):
                if not getattr(self, name):
                    raise ConfigError(f"{where}.{name} is required when {where}.dataset is files")
        for name in ("train", "test", "classes", "classnames", "templates"):
            if getattr(self, name) and not Path(getattr(self, name)).exists():
                raise ConfigError(f"{where}.{name}: {getattr(self, name)!r} does not exist")
        for role in ("train", "test"):
            keys = (f"{where}.{role}", f"{where}.{role}_split", f"{where}.{role}_image_root")
            check_caption_file_options(getattr(self, role), getattr(self, f"{role}_split"), getattr(self, f"{role}_image_root"), keys)
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_bad_share < 1:
            raise ConfigError(f"{where}.max_bad_share must be in [0, 1), got {self.max_bad_share}")
        if self.image_size < 8:
            raise ConfigError(f"{where}.image_size must be >= 8, got {self.image_size}")
        for name in ("train_size", "val_size", "test_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.shapes_filter and self.dataset != "shapes":
            raise ConfigError(f"{where}.shapes_filter selects a domain of the shapes data, but {where}.dataset is {self.dataset}")
        try:
            check_shapes_filter(self.shapes_filter, f"{where}.shapes_filter")
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, for a fixed number of steps. A step whose loss is NaN
    or infinite is skipped (no update); `max_nonfinite` of them in a row stop the run. `batch_size` is
    the global batch of one optimizer step: split across processes and, with `accumulation_steps` > 1,
    into that many micro-batches whose losses still see the whole batch (see train/loop.py)."""

    steps: int = 600
    batch_size: int = 128
    accumulation_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: Optional[float] = 1.0
    precision: str = "fp32"
    log_every: int = 50
    max_nonfinite: int = 10

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.steps < 1:
            raise ConfigError(f"{where}.steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ConfigError(f"{where}.batch_size must be >= 2 (contrastive losses need negatives), got {self.batch_size}")
        if self.accumulation_steps < 1:
            raise ConfigError(f"{where}.accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.batch_size % self.accumulation_steps:
            raise ConfigError(
                f"{where}.batch_size ({self.batch_size}) must be divisible by {where}.accumulation_steps "
                f"({self.accumulation_steps})"
            )
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"{where}.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"{where}.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where}.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_nonfinite < 1:
            raise ConfigError(f"{where}.max_nonfinite must be >= 1, got {self.max_nonfinite}")
        if self.log_every < 1:
            raise ConfigError(f"{where}.log_every must be >= 1, got {self.log_every}")


def _teacher_spec() -> DualEncoderSpec:
    return DualEncoderSpec(
        vision=TowerSpec(layers=4, width=128, heads=4, patch_size=8), text=TowerSpec(layers=4, width=128, heads=4),
        projection_dim=128,
    )


@dataclass
class ExtraTeacherConfig:
    """A further teacher of an ensemble: a model folder or hub id (CLIP, SigLIP or two-tower) and its weight."""

    path: str = ""
    weight: float = 1.0
    trust_remote_code: bool = False

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if not self.path:
            raise ConfigError(f"{where}.path is required")
        if self.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {self.weight}")


@dataclass
class TwoTowerTeacherConfig:
    """A teacher made of a pretrained HF vision backbone and a pretrained HF text encoder (folders or
    hub ids) whose projection heads `pretrain-teacher` trains with the backbones locked (LiT)."""

    vision: str = ""
    text: str = ""
    projection_dim: int = 256
    vision_pooling: str = "cls"
    text_pooling: str = "mean"

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        for name in ("vision", "text"):
            if not getattr(self, name):
                raise ConfigError(f"{where}.{name} is required: a model folder or hub id")
        if self.projection_dim < 1:
            raise ConfigError(f"{where}.projection_dim must be >= 1, got {self.projection_dim}")
        if self.vision_pooling not in VISION_POOLINGS:
            raise ConfigError(f"{where}.vision_pooling must be one of {', '.join(VISION_POOLINGS)}, got {self.vision_pooling!r}")
        if self.text_pooling not in TEXT_POOLINGS:
            raise ConfigError(f"{where}.text_pooling must be one of {', '.join(TEXT_POOLINGS)}, got {self.text_pooling!r}")


@dataclass
class TeacherConfig:
    """The (primary) teacher: a model folder or hub id (`path`), or one pretrained here: of `family` clip, a
    CLIP from `model` or the heads of a `two_tower` teacher; of `family` blip, a BLIP retrieval model from
    `model` (vision tower, text encoder whose layers are also the fusion layers, projection size) and a BLIP
    captioning model (the vision tower and `model.decoder`, default the text spec); plus optional further
    teachers (`ensemble`) combined with it by `combine` (see teachers/ensemble.py). `precision` is what the
    teachers run in when distilling online and building the teacher cache: fp32, or bf16 (bfloat16 weights,
    float32 signals); the student trains in `distill.train.precision`, a teacher pretrains in `train.precision`."""

    path: Optional[str] = None
    family: str = "clip"
    model: DualEncoderSpec = field(default_factory=_teacher_spec)
    two_tower: Optional[TwoTowerTeacherConfig] = None
    train: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1500, lr=5e-4, warmup_steps=100))
    trust_remote_code: bool = False
    weight: float = 1.0
    ensemble: list[ExtraTeacherConfig] = field(default_factory=list)
    combine: str = "fixed"
    precision: str = "fp32"

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.precision not in TEACHER_PRECISIONS:
            raise ConfigError(f"{where}.precision must be one of {', '.join(TEACHER_PRECISIONS)}, got {self.precision!r}")
        if self.combine not in COMBINE_METHODS:
            raise ConfigError(f"{where}.combine must be one of {', '.join(COMBINE_METHODS)}, got {self.combine!r}")
        if self.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {self.weight}")
        if self.ensemble and self.weight + sum(t.weight for t in self.ensemble) <= 0:
            raise ConfigError(f"{where}.weight and {where}.ensemble weights must not all be 0")
        self._validate_family(where)

    def _validate_family(self, where: str) -> None:
        """The `family` is known and `model` / `two_tower` hold what that family can build."""
        if self.family not in TEACHER_FAMILIES:
            raise ConfigError(f"{where}.family must be one of {', '.join(TEACHER_FAMILIES)}, got {self.family!r}")
        if self.family == "clip":
            for name in ("fusion", "decoder"):
                if getattr(self.model, name) is not None:
                    raise ConfigError(
                        f"{where}.model.{name} is set, but a CLIP teacher has no {name} module "
                        f"(set {where}.family: blip for a BLIP teacher)"
                    )
            return
        if self.two_tower is not None:
            raise ConfigError(f"{where}.two_tower is a CLIP-style teacher: it cannot be pretrained as {where}.family blip")
        fusion = self.model.fusion
        if fusion is not None and fusion != self.model.text:
            raise ConfigError(
                f"{where}.model.fusion ({fusion}) must be null or equal {where}.model.text ({self.model.text}): "
                "BLIP's fusion layers are its text encoder's layers, run with cross-attention to the image"
            )

    def retrieval_spec(self) -> DualEncoderSpec:
        """The spec of the retrieval teacher `model` describes, as the model reports it (`architecture_spec`):
        for a BLIP teacher its fusion encoder is the text encoder and it has no decoder."""
        if self.family == "blip":
            return dataclasses.replace(self.model, fusion=self.model.text, decoder=None)
        return self.model

    def decoder_spec(self) -> TowerSpec:
        """The captioning teacher's decoder (BLIP): `model.decoder`, else the text spec."""
        return self.model.decoder if self.model.decoder is not None else self.model.text


@dataclass
class StudentConfig:
    """The student's towers, whether it starts from the teacher's weights (TinyCLIP inheritance) and its
    learnable prompts (`prompts`, models/prompts.py: n_ctx, ctx_init, n_vis, depth, projector_dim; null: none)."""

    model: DualEncoderSpec = field(default_factory=DualEncoderSpec)
    inherit: bool = True
    prompts: Optional[PromptConfig] = None


def _default_losses() -> dict[str, dict[str, Any]]:
    return {"clip": {"weight": 1.0}, "kd": {"weight": 1.0, "temperature": 2.0}, "feature": {"weight": 1.0}}


def _default_caption_losses() -> dict[str, dict[str, Any]]:
    return {"lm": {"weight": 1.0}, "lm_kd": {"weight": 1.0, "temperature": 2.0}}


@dataclass
class CheckpointConfig:
    """Training checkpoints: every `every` steps (0: none) and at the end, the newest `keep` kept, in
    `<out>-checkpoints/` beside the student folder; `vldistill distill --resume` continues from one."""

    every: int = 0
    keep: int = 2

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.every < 0:
            raise ConfigError(f"{where}.every must be >= 0 (0: no checkpoints), got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"{where}.keep must be >= 1, got {self.keep}")


@dataclass
class StageConfig:
    """One stage of a staged run (`distill.stages`, train/stages.py): `steps` optimizer steps at peak learning
    rate `lr` (null: distill.train.lr) after `warmup_steps` of linear warmup (null: distill.train.warmup_steps
    for the first stage, 0 for later ones), then cosine decay to 0 at the stage's end, training only the
    parameter groups `trainable` names (student, objective, prompts, projector, or a group of the student's:
    vision, text, vision.layers.N, ...); every other parameter is frozen."""

    name: str = ""
    steps: int = 0
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    trainable: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if not self.name.strip():
            raise ConfigError(f"{where}.name is required (it names the stage in logs and checkpoints)")
        if self.steps < 1:
            raise ConfigError(f"{where}.steps must be >= 1, got {self.steps}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"{where}.lr must be > 0 or null (distill.train.lr), got {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"{where}.warmup_steps must be null or in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.trainable:
            raise ConfigError(f"{where}.trainable must name at least one parameter group (e.g. [student])")
        for index, selector in enumerate(self.trainable):
            if not selector.strip():
                raise ConfigError(f"{where}.trainable[{index}] is empty")
        if len(set(self.trainable)) != len(self.trainable):
            raise ConfigError(f"{where}.trainable names a group twice: {self.trainable}")


def validate_stages(stages: list[StageConfig], train: OptimConfig, where: str) -> None:
    """Raise ConfigError naming `where` unless the `stages` (when any) have distinct names, their steps sum to
    `train.steps` and the first stage's default warmup (`train.warmup_steps`) fits in it."""
    if not stages:
        return
    names = [stage.name for stage in stages]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"{where}.stages[{index}].name: {name!r} names an earlier stage too; stage names must differ")
    total = sum(stage.steps for stage in stages)
    if total != train.steps:
        raise ConfigError(
            f"{where}.stages: the stages' steps sum to {total}, but {where}.train.steps is {train.steps}; "
            f"they must be equal (set {where}.train.steps: {total})"
        )
    first = stages[0]
    if first.warmup_steps is None and train.warmup_steps > first.steps:
        raise ConfigError(
            f"{where}.stages[0] has {first.steps} steps, fewer than its warmup ({where}.train.warmup_steps: "
            f"{train.warmup_steps}); set {where}.stages[0].warmup_steps"
        )


@dataclass
class DistillConfig:
    """The distillation run: optimizer settings, the weighted losses (name -> {weight, params}; weights
    and temperatures may be schedules), how the weights adapt (`weighting`) and how many training pairs
    the student sees (`train_pairs`: the first N of the training data; null: all of it). A teacher
    pretrained here always learns from all of them: the regime where distillation has something to
    transfer (a teacher trained on far more data than the student's). `losses` train a retrieval
    (dual-encoder) student; `caption_losses` (same form) a captioning student (from a captioning teacher). `stages` (empty: one stage
    training every parameter) split the run into stages that each train some parameter groups at their own
    learning rate (train/stages.py); their steps sum to `train.steps`."""

    train: OptimConfig = field(default_factory=OptimConfig)
    train_pairs: Optional[int] = None
    losses: dict[str, dict[str, Any]] = field(default_factory=_default_losses)
    caption_losses: dict[str, dict[str, Any]] = field(default_factory=_default_caption_losses)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    stages: list[StageConfig] = field(default_factory=list)

    @functools.cached_property
    def loss_specs(self) -> list[LossSpec]:
        """`losses` parsed once into typed specs (registered name, weight schedule, validated params)."""
        return parse_loss_specs(self.losses, "distill.losses")

    @functools.cached_property
    def caption_loss_specs(self) -> list[LossSpec]:
        """`caption_losses` parsed once into typed specs, as `loss_specs`."""
        return parse_loss_specs(self.caption_losses, "distill.caption_losses")

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        try:
            specs = self.loss_specs
            self.caption_loss_specs  # parsed here so that a bad caption loss fails with the config
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None
        if self.train_pairs is not None and self.train_pairs < self.train.batch_size:
            raise ConfigError(
                f"{where}.train_pairs must be null or >= {where}.train.batch_size ({self.train.batch_size}), "
                f"got {self.train_pairs}"
            )
        if self.weighting.kind == "gap" and not specs_need(specs):
            raise ConfigError(f"{where}.weighting.kind is gap, but no loss in {where}.losses uses the teacher")
        validate_stages(self.stages, self.train, where)


@dataclass
class EvalConfig:
    """Evaluation settings: batch size, zero-shot templates (null: the dataset's; each entry a template with `{}`,
    `library:<domain>[,<domain>...]` for the shipped library's templates or `file:<path>` for a templates file,
    see data/templates), retrieval matching, and
    `rerank_k`, the contrastive top-k candidates of each query an ITM head re-ranks (models with one: BLIP)."""

    batch_size: int = 256
    templates: Optional[list[str]] = None
    retrieval_match: str = "identical_caption"
    throughput_batch_size: int = 256
    rerank_k: int = 16

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.retrieval_match not in RETRIEVAL_MATCHES:
            raise ConfigError(
                f"{where}.retrieval_match must be one of {', '.join(RETRIEVAL_MATCHES)}, got {self.retrieval_match!r}"
            )
        if self.batch_size < 1 or self.throughput_batch_size < 1:
            raise ConfigError(f"{where}.batch_size and {where}.throughput_batch_size must be >= 1")
        if self.rerank_k < 1:
            raise ConfigError(f"{where}.rerank_k must be >= 1, got {self.rerank_k}")
        try:
            check_template_entries(self.templates or [], f"{where}.templates")
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass
class CacheConfig:
    """The teacher cache: `vldistill cache` stores the teachers' embeddings of `views` views of every
    training pair (in `dtype`, `shard_rows` rows a shard, `batch_size` pairs a teacher forward, or `auto`
    for the fastest of 64..1024 measured on real batches, loaded by `num_workers` workers); distillation reads them from `path` instead of running the teachers when
    every loss needs only embeddings. Otherwise `mode: auto` runs the teachers online (saying why) and
    `mode: require` fails."""

    views: int = 1
    batch_size: Union[int, str] = 256
    shard_rows: int = 4096
    dtype: str = "float16"
    num_workers: int = 0
    path: Optional[str] = None
    mode: str = "auto"

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        for name in ("views", "shard_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        size = self.batch_size
        if size != AUTO_BATCH_SIZE and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"{where}.batch_size must be a positive int or {AUTO_BATCH_SIZE!r}, got {size!r}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers must be >= 0, got {self.num_workers}")
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.dtype!r}")
        if self.mode not in CACHE_MODES:
            raise ConfigError(f"{where}.mode must be one of {', '.join(CACHE_MODES)}, got {self.mode!r}")
        if self.path is not None and not self.path:
            raise ConfigError(f"{where}.path must be a folder or null, got an empty string")


@dataclass
class SweepConfig:
    """What `vldistill sweep` runs besides the task loss alone: each of `losses` (empty: every registered
    loss) beside the task loss, with `loss_params[name]` as its options, and the named `combinations`;
    every run once per seed in `seeds` (the same seeds for every run: each seed fixes the student's
    initialization and data order; the teacher is the one of the config's `seed`). With named `students`
    (module ablation), every run is made once per student variant: each a partial `student.model` (`vision`,
    `text`, `fusion`, `decoder`, `projection_dim`; a module or field left out keeps student.model's)."""

    losses: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    combinations: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    students: dict[str, dict[str, Any]] = field(default_factory=dict)

    def student_specs(self, base: DualEncoderSpec, where: str = "sweep") -> dict[str, DualEncoderSpec]:
        """Each named student variant as a whole spec: its modules laid over `base` (student.model) field by
        field; a ConfigError naming `where`.students.<name>.<field> when one cannot be built."""
        specs = {}
        for name, override in self.students.items():
            key = f"{where}.students.{name}"
            if not SWEEP_RUN_NAME.fullmatch(name):
                raise ConfigError(
                    f"{key}: a student name may hold only letters, digits, '_', '-' and '.', not first (it names folders)"
                )
            fields = dataclasses.asdict(base)
            for module, value in override.items():  # a module given as a mapping keeps base's other fields
                both = isinstance(value, dict) and isinstance(fields.get(module), dict)
                fields[module] = {**fields[module], **value} if both else value
            specs[name] = build_dataclass(DualEncoderSpec, fields, key)
        return specs

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{where}.seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        try:
            for name in self.losses:
                parse_loss_specs({name: self.loss_params.get(name, {})}, f"{where}.loss_params")
            for name in self.loss_params:
                if self.losses and name not in self.losses:
                    raise ValueError(f"{where}.loss_params.{name}: {name} is not in {where}.losses")
                parse_loss_specs({name: self.loss_params[name]}, f"{where}.loss_params")
            for name, losses in self.combinations.items():
                parse_loss_specs(losses, f"{where}.combinations.{name}")
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None


TRACKERS = ("tensorboard", "wandb", "mlflow")  # experiment trackers accelerate reports to (log.trackers)


def missing_tracker_packages(trackers: list[str]) -> list[str]:
    """The Python packages (named as the trackers) that `trackers` need and this environment lacks."""
    return [name for name in trackers if importlib.util.find_spec(name) is None]


@dataclass
class LogConfig:
    """Experiment trackers the training loop reports its per-step records to through accelerate, besides the
    JSONL log: any of `tensorboard`, `wandb` (offline: nothing leaves the machine; `wandb sync` uploads later)
    and `mlflow` (a file store); none by default. They write under `dir` (null: the run's logs/trackers), one
    tracker run per training (teacher, student, baseline, ...), with the resolved config as hyperparameters."""

    trackers: list[str] = field(default_factory=list)
    dir: Optional[str] = None

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> for an unknown or repeated tracker, or one whose package is missing."""
        for index, name in enumerate(self.trackers):
            if name not in TRACKERS:
                raise ConfigError(f"{where}.trackers[{index}] must be one of {', '.join(TRACKERS)}, got {name!r}")
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"{where}.trackers lists a tracker twice: {self.trackers}")
        for name in missing_tracker_packages(self.trackers):
            raise ConfigError(f"{where}.trackers: {name} is selected but the package {name} is not installed: pip install {name}")
        if self.dir is not None and not self.dir:
            raise ConfigError(f"{where}.dir must be a folder or null, got an empty string")


def _default_prompt_losses() -> dict[str, dict[str, Any]]:
    return {"class_kd": {"weight": 1.0, "temperature": 1.0}, "feature": {"weight": 1.0, "towers": ["image"]}}


@dataclass
class PromptDistillConfig:
    """`vldistill prompt-distill` (PromptKD, Li et al., 2024): a student learns prompts and a projector on
    unlabeled images of the target domain to match the teacher's class logits over stored class-name embeddings.

    student: a saved dual encoder to prompt (the "student without prompts"); null: the configured student trained
    on the data's captioned pairs without a teacher first (`distill.train`, the demo's baseline).
    images: a folder of class folders whose images are trained on (their labels only choose the base classes);
    null: the data's own training images (shapes: the train split).
    base_share / split_seed: the share of the classes that are base classes (trained on) and the seed of the split;
    the others are novel, never seen in training.
    low_resource: the share of the base images a second, low-resource run trains on (null: no such run).
    templates: prompt templates for the teacher's class-name embeddings (a file, one per line; null: eval.templates,
    else the data's).
    train / losses / stages: the training run, as in `distill` (losses read image signals only); without stages,
    only the prompts and the projector train (the student's weights stay frozen)."""

    student: Optional[str] = None
    images: Optional[str] = None
    base_share: float = 0.5
    split_seed: int = 0
    low_resource: Optional[float] = 0.1
    templates: Optional[str] = None
    train: OptimConfig = field(default_factory=lambda: OptimConfig(steps=300, lr=5e-3, warmup_steps=30, weight_decay=0.0))
    losses: dict[str, dict[str, Any]] = field(default_factory=_default_prompt_losses)
    stages: list[StageConfig] = field(default_factory=list)

    @functools.cached_property
    def loss_specs(self) -> list[LossSpec]:
        """`losses` parsed once into typed specs."""
        return parse_loss_specs(self.losses, "prompt_distill.losses")

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        for name in ("student", "images", "templates"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).exists():
                raise ConfigError(f"{where}.{name}: {getattr(self, name)!r} does not exist")
        if not 0 < self.base_share < 1:
            raise ConfigError(f"{where}.base_share must be in (0, 1), got {self.base_share}")
        if self.low_resource is not None and not 0 < self.low_resource < 1:
            raise ConfigError(f"{where}.low_resource must be in (0, 1) or null, got {self.low_resource}")
        try:
            specs = self.loss_specs
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None
        text = sorted({need for spec in specs for need in spec.needs if need.startswith("text")})
        if text:
            raise ConfigError(
                f"{where}.losses read the teacher's {', '.join(text)}, but prompt distillation trains on images "
                "without captions: use image-side losses (class_kd, feature with towers: [image], attention/hidden "
                "with towers: [vision])"
            )
        validate_stages(self.stages, self.train, where)


@dataclass
class ContinualConfig:
    """Continual re-distillation (`vldistill continual`, vldistill/continual.py): the student of the run folder
    `previous` (its config.yaml and student/, e.g. from `vldistill distill` on an old domain) distilled further on
    this config's data, the new domain `domain`, with an EWC penalty of strength `ewc_lambda` (0: none) whose
    diagonal Fisher information is estimated on `fisher_batches` batches of the previous run's data and losses,
    and (a prompted student, `prompt_memory`) its earlier domains' prompts kept by name (`previous_domain` names
    the previous run's domain)."""

    previous: Optional[str] = None
    previous_domain: str = "previous"
    domain: str = "new"
    ewc_lambda: float = 0.0
    fisher_batches: int = 8
    prompt_memory: bool = True

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        if self.previous is not None:
            folder = Path(self.previous)
            for part in ("config.yaml", "student"):
                if not (folder / part).exists():
                    raise ConfigError(f"{where}.previous: {self.previous!r} is no run folder (it has no {part})")
        if not (isinstance(self.ewc_lambda, (int, float)) and 0 <= self.ewc_lambda < float("inf")):
            raise ConfigError(f"{where}.ewc_lambda must be a finite number >= 0, got {self.ewc_lambda!r}")
        if self.fisher_batches < 1:
            raise ConfigError(f"{where}.fisher_batches must be >= 1, got {self.fisher_batches}")
        for name in ("previous_domain", "domain"):
            value = getattr(self, name)
            if not value or "/" in value:
                raise ConfigError(f"{where}.{name} must be a non-empty name without '/', got {value!r}")
        if self.domain == self.previous_domain:
            raise ConfigError(f"{where}.domain and {where}.previous_domain must differ, both are {self.domain!r}")


def _default_region_losses() -> dict[str, dict[str, Any]]:
    return {"region_text": {"weight": 1.0, "temperature": 0.01}, "region_image": {"weight": 1.0, "distance": "l1"}}


REGION_ARMS = {"text": ("region_text",), "image": ("region_image",), "both": ("region_text", "region_image")}
UNLABELLED_OBJECTS = ("background", "ignore")


@dataclass
class RegionDistillConfig:
    """`vldistill region-distill` (ViLD, Gu et al., 2022): a region student (the student's image tower, RoIAlign over
    its token grid, a projection and a background embedding) learns from the teacher's embeddings of cropped regions
    (`region_image`) and of the base class names (`region_text`); novel classes are recognized by name alone.

    detections / test_detections: COCO-style detection files to train and evaluate on (images under
    image_root / test_image_root, default each file's folder); null: the embedded scenes (`train_scenes` /
    `test_scenes` of up to `max_objects` shapes, 40 "colour shape" classes).
    image_size: the side the region student sees images at (its position embeddings are interpolated to it).
    base_share / split_seed: the share of the classes whose labels training may read (base), and the split's seed.
    background_boxes / test_background_boxes: random boxes per image clear of its objects (IoU < 0.3): background
    regions in training; in evaluation, the false positives AP50 counts.
    unlabelled_objects: what ViLD-text makes of the boxes of novel-class objects in training images, which carry no
    label a user could give: `background` (as a detector labels proposals matching no base annotation) or `ignore`.
    crop_context: how much the teacher's crops enlarge each box (ViLD: 1.5). pool_size: RoIAlign's k x k bins.
    templates: prompt templates for the class-name embeddings (a file; null: eval.templates, else the data's).
    arms: which region students to train, each with its losses from `losses`: text (region_text), image
    (region_image), both. train: each arm's training run."""

    detections: Optional[str] = None
    test_detections: Optional[str] = None
    image_root: Optional[str] = None
    test_image_root: Optional[str] = None
    image_size: int = 64
    train_scenes: int = 4000
    test_scenes: int = 500
    max_objects: int = 3
    base_share: float = 0.5
    split_seed: int = 0
    background_boxes: int = 2
    test_background_boxes: int = 2
    unlabelled_objects: str = "background"
    crop_context: float = 1.5
    pool_size: int = 2
    templates: Optional[str] = None
    arms: list[str] = field(default_factory=lambda: list(REGION_ARMS))
    train: OptimConfig = field(default_factory=lambda: OptimConfig(steps=600, batch_size=64, lr=1e-3, warmup_steps=50))
    losses: dict[str, dict[str, Any]] = field(default_factory=_default_region_losses)

    def arm_losses(self, arm: str) -> dict[str, dict[str, Any]]:
        """The losses arm `arm` trains with: its entries of `losses`."""
        return {name: self.losses[name] for name in REGION_ARMS[arm]}

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        for name in ("detections", "test_detections", "image_root", "test_image_root", "templates"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).exists():
                raise ConfigError(f"{where}.{name}: {getattr(self, name)!r} does not exist")
        if (self.detections is None) != (self.test_detections is None):
            raise ConfigError(f"{where}: give both detections and test_detections (user data) or neither (the embedded scenes)")
        for name in ("image_size", "train_scenes", "test_scenes", "max_objects", "pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("background_boxes", "test_background_boxes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.base_share < 1:
            raise ConfigError(f"{where}.base_share must be in (0, 1), got {self.base_share}")
        if self.unlabelled_objects not in UNLABELLED_OBJECTS:
            raise ConfigError(f"{where}.unlabelled_objects must be one of {', '.join(UNLABELLED_OBJECTS)}, got {self.unlabelled_objects!r}")
        if self.crop_context < 1:
            raise ConfigError(f"{where}.crop_context must be >= 1 (1: the box itself), got {self.crop_context}")
        if not self.arms or any(arm not in REGION_ARMS for arm in self.arms):
            raise ConfigError(f"{where}.arms must list some of {', '.join(REGION_ARMS)}, got {self.arms}")
        unknown = sorted(set(self.losses) - set(REGION_ARMS["both"]))
        if unknown:
            raise ConfigError(f"{where}.losses: {', '.join(unknown)} is no region loss; region distillation trains with region_text and region_image")
        for arm in self.arms:
            missing = [name for name in REGION_ARMS[arm] if name not in self.losses]
            if missing:
                raise ConfigError(f"{where}.arms: arm {arm!r} trains with {', '.join(missing)}, which {where}.losses does not set")
        try:
            parse_loss_specs(self.losses, f"{where}.losses")
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None


@dataclass
class ExperimentConfig:
    """One experiment: data, teacher, student, distillation (optionally from a teacher cache), evaluation and
    the trackers training reports to."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    log: LogConfig = field(default_factory=LogConfig)
    prompt_distill: PromptDistillConfig = field(default_factory=PromptDistillConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    region_distill: RegionDistillConfig = field(default_factory=RegionDistillConfig)

    def validate(self, where: str) -> None:
        """Raise an error naming `where`.<field> when a value is impossible."""
        variants = self.sweep.student_specs(self.student.model)
        if self.teacher.path is not None:
            return  # the teacher's architecture is known only once its config is read
        if self.student.inherit:
            students = {"student.model": self.student.model, **{f"sweep.students.{n}": s for n, s in variants.items()}}
            try:
                for key, spec in students.items():
                    check_inheritable(spec, self.teacher.model, where=key)
            except ValueError as error:
                raise ConfigError(f"{error} [student.inherit is true]") from None
        context = LossContext(
            self.student.model.projection_dim,
            self.teacher.model.projection_dim,
            student_spec=self.student.model,
            teacher_spec=self.teacher.retrieval_spec(),
        )
        try:  # losses whose options depend on both architectures (layer maps, head counts)
            build_objective(self.distill.loss_specs, context, where="distill.losses")
        except (KeyError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what `load_config` reads back)."""
        return dataclasses.asdict(self)


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Read an experiment from a YAML file over the defaults, apply `a.b=c` overrides, validate.

    Nested sections merge with their defaults; a mapping of losses replaces the default set whole.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    data = over_defaults(ExperimentConfig, ExperimentConfig().to_dict(), data)
    for assignment in overrides:
        apply_override(data, assignment)
    return build_dataclass(ExperimentConfig, data, "")


def packaged_config(name: str) -> Path:
    """Path of a config shipped with vldistill (`demo`, `tiny`)."""
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no packaged config {name!r}; packaged configs: {', '.join(known)}")
    return path
