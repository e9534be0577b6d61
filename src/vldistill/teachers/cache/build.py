"""`vldistill cache`: run the teachers once over every view of every training pair and store their
embeddings, so distillation can read them for many epochs instead of running the teachers.

Row `sample_index * views + view` of field `teacher{k}/image` (`/text`) holds teacher k's embedding
of that view (regenerated exactly at distillation time, see data.pairs.make_view). The build goes
shard by shard (a DataLoader over the next shard's rows, so loading overlaps the teachers' forward
when `cache.num_workers` > 0); an interrupted build resumes at the first shard not yet written.
Field `view_hash` holds each row's view fingerprint (data.pairs.view_hash), which distillation checks
its regenerated views against. A lone BLIP retrieval teacher's ITM is stored too (`teacher0/itm`,
`teacher0/itm_negatives`, see models/blip_signals.py): its batches then hold one view each (`itm_batches`),
and within each the teacher draws its hard negatives from its own similarity, as it does in training. With `cache.batch_size: auto` the teachers' throughput is probed on real
batches first and the fastest size is used.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from vldistill.teachers.cache.meta import cache_meta, caches_itm
from vldistill.teachers.cache.store import CacheReader, CacheWriter
from vldistill.teachers.cache.cached import VIEW_HASH, check_cacheable_teachers, field_name
from vldistill.config import AUTO_BATCH_SIZE, ExperimentConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.pairs import PairCollator, PairSample
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.distributed import join_process_group
from vldistill.teachers.ensemble import TeacherEnsemble
from vldistill.models.signals import cached_per_sample
from vldistill.teachers.assemble import check_teacher_fits_data, ensemble_members, teacher_ensemble
from vldistill.precision import report_cpu_bf16
from vldistill.trained import TrainedModel

logger = logging.getLogger(__name__)


@dataclass
class CacheBuildResult:
    """What a build did: the cache's size, the shards this run wrote, its wall time and the bytes one
    training pair takes (all its views, every field)."""

    path: Path
    samples: int
    views: int
    rows: int
    shards_written: int
    shards_total: int
    seconds: float
    bytes_per_sample: int
    disk_bytes: int

    def summary(self) -> str:
        """One line for the console."""
        resumed = "" if self.shards_written == self.shards_total else f", {self.shards_total - self.shards_written} already there"
        return (
            f"teacher cache {self.path}: {self.rows} rows ({self.samples} pairs x {self.views} views), "
            f"{self.shards_written} of {self.shards_total} shards built in {self.seconds:.1f} s{resumed}; "
            f"{self.bytes_per_sample} bytes per sample, {self.disk_bytes / 1e6:.2f} MB on disk"
        )


class ShardRows(Dataset):
    """Rows [start, stop) of a cache as (pair, view) items: row r is view r % views of pair r // views."""

    def __init__(self, pairs: Dataset, views: int, start: int, stop: int) -> None:
        self.pairs, self.views, self.start, self.stop = pairs, views, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, position: int) -> tuple[PairSample, int]:
        row = self.start + position
        return self.pairs[row // self.views], row % self.views


class RowCollator:
    """Collate (pair, view) items with a PairCollator, each pair in its own view."""

    def __init__(self, collator: PairCollator) -> None:
        self.collator = collator

    def __call__(self, items: Sequence[tuple[PairSample, int]]) -> dict[str, torch.Tensor]:
        samples, views = zip(*items)
        return self.collator.collate(samples, views)


def cache_fields(members: Sequence[TrainedModel], dtype: str) -> dict[str, tuple[int, str]]:
    """The cache's fields: per teacher k, `teacher{k}/<field>` for every per-sample signal kind it produces
    (models/signals.py `cache_field` and `cache_width`: its image and text embeddings; a lone BLIP retrieval
    teacher's ITM logits and negatives, see meta.caches_itm), in `dtype` unless the kind names its own, and
    `view_hash` (int64) fingerprinting the view each row was computed from."""
    fields = {
        field_name(k, kind.cache_field): (width, kind.cache_dtype or dtype)
        for k, m in enumerate(members)
        for kind in cached_per_sample()
        if (kind.request is None or caches_itm(members)) and (width := kind.cache_width(m.model)) is not None
    }
    return {**fields, VIEW_HASH: (1, "int64")}


def requested_kinds(fields: dict[str, tuple[int, str]]) -> frozenset[str]:
    """The signals among the cache's fields that a teacher returns only when asked (its ITM)."""
    return frozenset(
        kind.name for kind in cached_per_sample()
        if kind.request is not None and field_name(0, kind.cache_field) in fields
    )


def itm_batches(begin: int, stop: int, views: int, batch_size: int, samples: int) -> list[list[int]]:
    """The build batches (lists of cache rows) of the cache rows [begin, stop) when the teacher's ITM is stored:
    each holds one view of distinct samples, so a sample's hard negatives are other samples of its view, drawn
    from the teacher's similarity within that batch. Batches hold `batch_size` rows (at least 2); a last one of
    a single row joins the batch before it, and a shard holding one sample of a view borrows the neighbouring
    sample's row of that view (computed, not written: it belongs to another shard)."""
    if samples < 2:
        raise ValueError(f"caching ITM needs at least 2 training pairs to draw negatives from, got {samples}")
    size, batches = max(batch_size, 2), []
    for view in range(views):
        first = begin + (view - begin) % views
        rows = list(range(first, stop, views))
        if not rows:
            continue
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            chunks[-2].extend(chunks.pop())
        if len(chunks[0]) < 2:
            sample = chunks[0][0] // views
            chunks[0].append((sample - 1 if sample > 0 else sample + 1) * views + view)
        batches.extend(chunks)
    return batches


MISSING_VIEW = -1  # view_hash of a row whose sample was bad input (real fingerprints are >= 0)
PROBE_SIZES = (64, 128, 256, 512, 1024)
MIN_GAIN = 0.05  # a larger probe batch must raise images/s by at least this fraction to probe further


def pick_batch_size(
    measure: Callable[[int], float], sizes: Sequence[int] = PROBE_SIZES, min_gain: float = MIN_GAIN
) -> tuple[int, dict[int, float]]:
    """The size of the highest images/s (`measure(size)`) among `sizes`, probed in increasing order, and
    every measured rate. Probing stops at a size that raises RuntimeError (e.g. out of memory) or whose
    rate beats the previous size's by less than `min_gain`; a RuntimeError at the first size is raised."""
    if not sizes:
        raise ValueError("no batch sizes to probe")
    rates: dict[int, float] = {}
    for size in sizes:
        try:
            rate = measure(size)
        except RuntimeError as error:
            if not rates:
                raise RuntimeError(f"cache.batch_size auto: the teachers failed on a probe batch of {size}: {error}") from error
            break
        previous = rates[next(reversed(rates))] if rates else None
        rates[size] = rate
        if previous is not None and rate < previous * (1 + min_gain):
            break
    best = max(rates, key=lambda size: (rates[size], -size))
    return best, rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(
    ensemble: TeacherEnsemble, collator: RowCollator, rows: ShardRows, device: torch.device, repeats: int = 2
) -> Callable[[int], float]:
    """A function timing the teachers' images/s on the first `size` rows of `rows` (one warm-up
    forward, then the fastest of `repeats`; collation and the copy to `device` are not timed)."""

    def measure(size: int) -> float:
        batch = {key: value.to(device) for key, value in collator([rows[i] for i in range(size)]).items()}
        seconds = math.inf
        with torch.inference_mode():
            ensemble.outputs(batch)
            _sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                ensemble.outputs(batch)
                _sync(device)
                seconds = min(seconds, time.perf_counter() - start)
        return size / max(seconds, 1e-9)

    return measure


def auto_batch_size(
    ensemble: TeacherEnsemble, collator: RowCollator, pairs: Dataset, views: int, device: torch.device,
    report: bool = True,
) -> int:
    """The batch size `cache.batch_size: auto` builds with: the fastest of PROBE_SIZES (those no larger
    than the cache's rows; all rows when fewer than the smallest) by `pick_batch_size`; logs the choice
    when `report`."""
    total = len(pairs) * views
    sizes = [size for size in PROBE_SIZES if size <= total]
    if not sizes:
        if report:
            logger.info(f"cache.batch_size auto: using {total}, the cache's {total} rows in one batch")
        return total
    best, rates = pick_batch_size(_throughput(ensemble, collator, ShardRows(pairs, views, 0, total), device), sizes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    probed = ", ".join(f"{size}: {rate:.0f}" for size, rate in rates.items())
    if report:
        logger.info(f"cache.batch_size auto: using {best} ({rates[best]:.0f} images/s; probed {probed} images/s)")
    return best


def _shard_arrays(
    ensemble: TeacherEnsemble,
    loader: DataLoader,
    fields: dict[str, tuple[int, str]],
    rows: range,
    views: int,
    device: torch.device,
    progress: tqdm,
) -> dict[str, np.ndarray]:
    """Every field's (rows, dim) array for one shard, filled batch by batch from the teachers' outputs at
    each sample's row (rows outside the shard, borrowed as ITM negatives, are not written). Rows of bad input
    (skipped by the collator) stay zero with `view_hash` -1, a value no view has (and ITM negatives -1), so
    they are never mistaken for data (training never asks for them: bad samples are dropped from its batches
    too)."""
    arrays = {name: np.zeros((len(rows), dim), dtype=dtype) for name, (dim, dtype) in fields.items()}
    for name, (_, dtype) in fields.items():
        if np.dtype(dtype).kind in "iu":
            arrays[name][:] = MISSING_VIEW
    needs = requested_kinds(fields)
    with torch.inference_mode():
        for batch in loader:
            if not batch:
                continue
            if needs and len(batch["sample_index"]) < 2:
                raise ValueError("a teacher-cache build batch holds a single good pair (the others are bad input): "
                                 "ITM negatives need 2; raise cache.batch_size")
            batch = {key: value.to(device) for key, value in batch.items()}
            global_rows = batch["sample_index"] * views + batch["view"]
            local = global_rows.cpu().numpy() - rows.start
            keep = (local >= 0) & (local < len(rows))
            for k, output in enumerate(ensemble.outputs(batch, needs)):
                for kind in cached_per_sample():
                    name = field_name(k, kind.cache_field)
                    if name in arrays:
                        stored = kind.to_cache_rows(output[kind.name], global_rows).cpu().numpy()
                        arrays[name][local[keep]] = stored[keep]
            arrays[VIEW_HASH][local[keep], 0] = batch[VIEW_HASH].cpu().numpy()[keep]
            progress.update(int(keep.sum()))
    return arrays


def build_cache(
    cfg: ExperimentConfig, data: DataBundle, primary: TrainedModel, out: Path, progress: bool = True
) -> CacheBuildResult:
    """Build (or resume) the teacher cache of `primary` and `teacher.ensemble` over `data`'s training
    split at `out`, with `cfg.cache`'s views, dtype, shard size, batch size (probed when `auto`, see
    `auto_batch_size`) and loader workers. Under torchrun / accelerate launch the processes share the
    work: in each round process r builds the r-th of the next shards and writes its files, and the first
    process lists the round's shards in the manifest in order (so an interrupted build resumes as
    one started by a single process would)."""
    start_time = time.perf_counter()
    check_teacher_fits_data(primary.model, cfg.data.image_size)
    settings = cfg.cache
    pairs = data.train
    if isinstance(pairs, IterableDataset):
        raise ValueError(
            "the teacher cache needs a map-style training set (addressed by sample index): webdataset shards "
            "are streamed; use a manifest, image folder or HF dataset, or distill online"
        )
    join_process_group()
    state = PartialState(cpu=not torch.accelerator.is_available())
    members = ensemble_members(cfg, primary)
    check_cacheable_teachers(members)
    ensemble, extra = teacher_ensemble(cfg, primary, primary.model.input_spec, members)
    ensemble = ensemble.to(state.device).eval()
    if ensemble.precision == "bf16" and state.device.type == "cpu" and state.is_main_process:
        report_cpu_bf16("bf16 teachers (teacher.precision: bf16)", training=False)
    preprocess = BatchPreprocessor.for_model(primary.tokenizer, primary.model.input_spec)
    collator = RowCollator(PairCollator(preprocess, augment=cfg.data.augment, seed=cfg.seed, extra=extra))
    fields = cache_fields(members, settings.dtype)
    total = len(pairs) * settings.views
    with state.main_process_first():  # the first process creates (or cleans) the folder, then the others open it
        writer = CacheWriter.open(out, cache_meta(cfg, data, members), fields, total, settings.shard_rows)
    state.wait_for_everyone()  # nobody writes shard files while another process still cleans the folder
    first = writer.next_shard()
    batch_size = settings.batch_size
    if batch_size == AUTO_BATCH_SIZE and first is not None:
        batch_size = auto_batch_size(ensemble, collator, pairs, settings.views, state.device, report=state.is_main_process)
    written = 0
    done = total if first is None else first[0]
    with tqdm(total=total, initial=done, desc="teacher cache", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for round_start in range(writer.next_index(), writer.num_shards, state.num_processes):
            index = round_start + state.process_index
            files = None
            if index < writer.num_shards:
                begin, stop = writer.shard_range(index)
                if requested_kinds(fields):  # ITM: batches of one view each, indexed by cache row
                    loader = DataLoader(
                        ShardRows(pairs, settings.views, 0, total),
                        batch_sampler=itm_batches(begin, stop, settings.views, batch_size, len(pairs)),
                        num_workers=settings.num_workers,
                        collate_fn=collator,
                    )
                else:
                    loader = DataLoader(
                        ShardRows(pairs, settings.views, begin, stop),
                        batch_size=batch_size,
                        shuffle=False,
                        num_workers=settings.num_workers,
                        collate_fn=collator,
                    )
                arrays = _shard_arrays(ensemble, loader, fields, range(begin, stop), settings.views, state.device, bar)
                files = writer.write_shard_files(index, arrays)
            for offset, shard_files in enumerate(gather_object([files])):  # every process's, in rank order
                if shard_files is not None and state.is_main_process:
                    writer.record_shard(round_start + offset, shard_files)
                    written += 1
                    if offset != state.process_index:  # the others' rows, for the progress bar
                        begin, stop = writer.shard_range(round_start + offset)
                        bar.update(stop - begin)
    if state.is_main_process:
        writer.finish()
    state.wait_for_everyone()
    reader = CacheReader.open(out)
    return CacheBuildResult(
        path=Path(out),
        samples=len(pairs),
        views=settings.views,
        rows=total,
        shards_written=written,
        shards_total=writer.num_shards,
        seconds=time.perf_counter() - start_time,
        bytes_per_sample=reader.bytes_per_row() * settings.views,
        disk_bytes=reader.disk_bytes(),
    )
