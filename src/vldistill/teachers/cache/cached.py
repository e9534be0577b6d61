"""The teacher cache standing in for the teachers during distillation: `CachedTeacher` is called like
a `TeacherEnsemble` (batch, needs) -> Signals, but reads the signals stored for the batch's samples and
view (the kinds models/signals.py declares cacheable: the embeddings, the logit scale and bias, and a lone
BLIP retrieval teacher's ITM logits) instead of running any model. Every batch's views are checked against
the fingerprints (`view_hash`) stored when the cache was built, so the student is fed exactly the views the
teachers saw; a batch served ITM logits must carry the inputs of the negatives the teacher scored
(teachers/cache/negatives.py), checked against the stored ones."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vldistill.teachers.cache.store import REBUILD_HINT, CacheReader, CacheViewMismatchError
from vldistill.config import CacheConfig, ConfigError
from vldistill.losses.registry import LossSpec, specs_need
from vldistill.teachers.ensemble import check_combine_method, teacher_output_over
from vldistill.models.blip_signals import ITM_NEGATIVE_ROWS
from vldistill.models.signals import SIGNALS, Signals, cacheable_signals, cached_per_model, cached_per_sample, gather_signals
from vldistill.losses.schedules import WeightingConfig
from vldistill.models.contract import Captioner
from vldistill.trained import TrainedModel

logger = logging.getLogger(__name__)

VIEW_HASH = "view_hash"  # the cache field (int64, dim 1) and batch key of each view's fingerprint (data.pairs.view_hash)


def field_name(teacher: int, signal_field: str) -> str:
    """The cache field holding teacher `teacher`'s signal stored as `signal_field` (e.g. "image" for its
    image embeddings, see models/signals.py `cache_field`)."""
    return f"teacher{teacher}/{signal_field}"


def cache_row(sample_index: torch.Tensor, view: torch.Tensor, views: int) -> torch.Tensor:
    """Row of each (sample, view) in a cache of `views` views: sample_index * views + view."""
    return sample_index * views + view


class CachedTeacher(nn.Module):
    """The teachers' combined output read from a cache: per teacher k, every per-sample signal stored for
    it (`teacher{k}/<field>`, e.g. its image and text embeddings) at the batch's `sample_index` and `view`,
    as float32 on the batch's device, plus its per-model signals (`model_signals[k]`, e.g. its logit scale
    and bias, from the cache meta), combined as `TeacherEnsemble` combines. Each batch's `view_hash` must
    equal the cached rows' (else CacheViewMismatchError)."""

    def __init__(
        self,
        reader: CacheReader,
        weights: Sequence[float],
        method: str,
        model_signals: Sequence[Mapping[str, Optional[float]]],
        views: int = 1,
    ) -> None:
        super().__init__()
        check_combine_method(method)
        count = len(model_signals)
        if len(weights) != count:
            raise ValueError("weights and model_signals must have one entry per cached teacher")
        wanted = [*(field_name(k, t) for k in range(count) for t in ("image", "text")), VIEW_HASH]
        missing = [name for name in wanted if name not in reader.fields]
        if missing:
            raise ValueError(f"teacher cache at {reader.root} lacks the fields {', '.join(missing)}; {REBUILD_HINT}")
        self.reader = reader
        self.weights = list(weights)
        self.method = method
        self.model_signals = [dict(signals) for signals in model_signals]
        self.views = views

    @property
    def embed_dim(self) -> int:
        """Size of the combined embedding, as `TeacherEnsemble.embed_dim`."""
        dims = [self.reader.fields[field_name(k, "image")][0] for k in range(len(self.model_signals))]
        return sum(dims) if len(dims) > 1 else dims[0]

    def held_signals(self, teacher: int) -> list[str]:
        """Names of the per-sample signals the cache holds for teacher `teacher`."""
        return [kind.name for kind in cached_per_sample() if field_name(teacher, kind.cache_field) in self.reader.fields]

    def _rows(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        for key in ("sample_index", "view", VIEW_HASH):
            if key not in batch:
                raise ValueError(f"a batch read from the teacher cache needs {key!r}; collate it with PairCollator from a dataset")
        view = batch["view"]
        if view.numel() and (view.min() < 0 or view.max() >= self.views):
            raise ValueError(f"batch view {int(view.max())} is out of range: the teacher cache holds {self.views} views")
        return cache_row(batch["sample_index"], view, self.views)

    def _check_views(self, batch: Mapping[str, torch.Tensor], rows: np.ndarray) -> None:
        """Raise CacheViewMismatchError unless the batch's view fingerprints equal the cached rows'."""
        found = batch[VIEW_HASH].cpu().numpy()
        stored = self.reader.rows(VIEW_HASH, rows)[:, 0]
        differ = np.flatnonzero(found != stored)
        if differ.size:
            j = int(differ[0])
            sample, view = int(batch["sample_index"][j]), int(batch["view"][j])
            raise CacheViewMismatchError(
                f"teacher cache at {self.reader.root}: sample {sample} view {view} is not the view the teachers "
                f"saw (view_hash {int(found[j])}, cache has {int(stored[j])}; {differ.size} of {len(rows)} views "
                "in the batch differ): the cache was built from other views (e.g. another vldistill version's "
                f"augmentation) and must be rebuilt: {REBUILD_HINT}"
            )

    def forward(self, batch: Mapping[str, torch.Tensor], needs: frozenset[str] = frozenset()) -> Signals:
        """The combined cached output for the batch."""
        return teacher_output_over(self, [batch], needs)

    def require(self, needs: frozenset[str]) -> None:
        """Raise ValueError unless the cache holds every signal in `needs` (ITM is stored only for a lone
        BLIP retrieval teacher, see cache.meta.caches_itm)."""
        held = set(self.held_signals(0)) | {kind.name for kind in cached_per_model()}
        if needs - held:
            raise ValueError(
                f"the teacher cache at {self.reader.root} holds {', '.join(sorted(held))}, "
                f"not {', '.join(sorted(needs - held))} (ITM is cached for a lone BLIP retrieval teacher only); "
                "run the teachers online (cache.mode auto without cache.path) or rebuild the cache"
            )

    def holds_itm(self) -> bool:
        """Whether the cache stores the primary teacher's ITM logits and negatives."""
        return field_name(0, SIGNALS.get("itm_negatives").cache_field) in self.reader.fields

    def _check_negatives(self, batch: Mapping[str, torch.Tensor], rows: np.ndarray) -> None:
        """Raise ValueError unless the batch carries the inputs of the ITM negatives the cache stores for its rows."""
        if ITM_NEGATIVE_ROWS not in batch:
            raise ValueError(
                f"a batch read with ITM from the teacher cache at {self.reader.root} must carry the negatives' inputs "
                "(collate it with PairCollator(attach=teachers.cache.negatives.ITMNegativeInputs(...)))"
            )
        stored = self.reader.rows(field_name(0, SIGNALS.get("itm_negatives").cache_field), rows)
        if not np.array_equal(batch[ITM_NEGATIVE_ROWS].cpu().numpy(), stored):
            raise ValueError(f"the batch's ITM negatives are not those the teacher cache at {self.reader.root} stores")

    @torch.no_grad()
    def gathered_outputs(self, batch: Mapping[str, torch.Tensor], needs: frozenset[str] = frozenset()) -> list[Signals]:
        """Each cached teacher's signals for the batch, its gathered signals holding every rank's rows; the
        signals a teacher returns only on request (ITM) only when `needs` names them."""
        self.require(needs)
        rows = self._rows(batch).cpu().numpy()
        self._check_views(batch, rows)
        if "itm_logits" in needs:
            self._check_negatives(batch, rows)
        device = batch["sample_index"].device
        outputs = []
        for k, per_model in enumerate(self.model_signals):
            per_sample = {
                kind.name: _as_signal(kind.from_cache_rows(torch.from_numpy(self.reader.rows(field_name(k, kind.cache_field), rows))), device)
                for kind in cached_per_sample()
                if field_name(k, kind.cache_field) in self.reader.fields and (kind.request is None or kind.name in needs)
            }
            scalars = {
                name: torch.tensor(value, dtype=torch.float32, device=device)
                for name, value in per_model.items()
                if value is not None
            }
            outputs.append(Signals(**per_sample, **scalars))
        return [gather_signals(output, keep_grad=False) for output in outputs]


def _as_signal(value: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A value read from the cache on `device`, float32 when it is floating point (None stays None)."""
    if value is None:
        return None
    return value.to(device=device, dtype=torch.float32 if value.is_floating_point() else value.dtype)


def open_cached_teacher(path: str, expected_meta: dict[str, Any], weights: Sequence[float], method: str) -> CachedTeacher:
    """A `CachedTeacher` over the complete cache at `path` made with exactly `expected_meta` (see
    cache.meta.cache_meta); the store refuses a missing, partial, mismatching or damaged cache (each
    shard file's recorded sha256 is checked as the file is first read)."""
    reader = CacheReader.open(path, expected_meta)
    teachers = reader.meta["teachers"]
    order = [teachers[str(k)] for k in range(len(teachers))]
    per_model = [kind.name for kind in cached_per_model()]
    return CachedTeacher(
        reader,
        weights,
        method,
        [{name: t.get(name) for name in per_model} for t in order],
        views=reader.meta["transform"]["views"],
    )


def cache_blockers(
    losses: Sequence[LossSpec], weighting: WeightingConfig, where: str = "distill.losses", teachers: int = 1
) -> list[str]:
    """Why the cache cannot stand in for the `teachers` (their count), one reason each: losses (configured at
    `where`) that need signals the cache cannot hold, each group saying why (models/signals.py
    `cache_refusal`: per-layer maps, token distributions); ITM for an ensemble (its members would each score
    other pairs, so the cache stores ITM for a lone teacher only; ITM of pairs the student chooses is never
    cached, as no loss asks for it); and gap weighting (it measures on held-out pairs the cache does not hold)."""
    reasons = []
    for spec in losses:
        by_reason: dict[str, list[str]] = {}
        for name in sorted(spec.needs - cacheable_signals()):
            refusal = SIGNALS.get(name).cache_refusal if name in SIGNALS else "which a cache cannot hold"
            by_reason.setdefault(refusal, []).append(name)
        if by_reason:
            groups = "; and ".join(f"{', '.join(names)}, {why}" for why, names in by_reason.items())
            reasons.append(f"{where}.{spec.name} needs the teacher's {groups}")
        requested = sorted(name for name in spec.needs & cacheable_signals() if SIGNALS.get(name).request is not None)
        if requested and teachers > 1:
            reasons.append(
                f"{where}.{spec.name} needs the teachers' {', '.join(requested)}, which a cache stores for a lone "
                "teacher only (an ensemble's members would each score other pairs)"
            )
    if weighting.kind == "gap":
        reasons.append("distill.weighting.kind gap measures the teachers on held-out pairs, which the cache does not hold")
    return reasons


def serve_from_cache(
    cache: CacheConfig, losses: Sequence[LossSpec], weighting: WeightingConfig, where: str = "distill.losses",
    teachers: int = 1,
) -> bool:
    """Whether distillation reads the `teachers` (their count) from `cache.path`: only when it is set, a loss
    uses the teacher, and nothing needs more than the cache holds (`cache_blockers`). Otherwise, with
    `cache.mode` auto, log a warning saying why the teachers run online; with `require`, raise a ConfigError
    naming the reasons (the losses by their key under `where`, e.g. distill.caption_losses)."""
    if not specs_need(losses):
        return False
    if cache.path is None:
        if cache.mode == "require":
            raise ConfigError("cache.mode is require, but cache.path is not set: build one with `vldistill cache`")
        return False
    reasons = cache_blockers(losses, weighting, where, teachers)
    if not reasons:
        return True
    if cache.mode == "require":
        raise ConfigError(f"cache.mode is require, but the teacher cache cannot serve this run: {'; '.join(reasons)}")
    logger.warning(f"teacher cache {cache.path} not used, running the teachers online: {'; '.join(reasons)}")
    return False


def check_cacheable_teachers(members: Sequence[TrainedModel]) -> None:
    """Raise ValueError naming the teacher when one of `members` is a captioning model: the cache holds
    per-sample embeddings (and a BLIP retrieval teacher's ITM), none of a captioner's signals (token_logits,
    its vision and decoder layers)."""
    for member in members:
        if isinstance(member.model, Captioner):
            held = sorted(member.model.signal_names - cacheable_signals())
            raise ValueError(
                f"teacher {member.path} is a captioning model ({type(member.model).__name__}): the teacher cache "
                f"cannot hold its signals ({', '.join(held)}); distill from it online (leave cache.path unset)"
            )
