"""`vldistill cache`: run the teachers once over every view of every training pair and store their
embeddings, so distillation can read them for many epochs instead of running the teachers.

Row `sample_index * views + view` of field `teacher{k}/image` (`/text`) holds teacher k's embedding
of that view (regenerated exactly at distillation time, see data.pairs.make_view). The build goes
shard by shard (a DataLoader over the next shard's rows, so loading overlaps the teachers' forward
when `cache.num_workers` > 0); an interrupted build resumes at the first shard not yet written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vldistill.cache.meta import cache_meta
from vldistill.cache.store import CacheReader, CacheWriter
from vldistill.cache.teacher import TOWERS, field_name
from vldistill.config import ExperimentConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.pairs import InMemoryPairs, PairCollator, PairSample
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.models.ensemble import TeacherEnsemble
from vldistill.train.runs import TrainedModel, check_teacher_fits_data, ensemble_members, teacher_ensemble


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

    def __init__(self, pairs: InMemoryPairs, views: int, start: int, stop: int) -> None:
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
    """The cache's fields: `teacher{k}/image` and `teacher{k}/text` of each teacher's embedding size."""
    return {field_name(k, tower): (m.model.embed_dim, dtype) for k, m in enumerate(members) for tower in TOWERS}


def _shard_arrays(
    ensemble: TeacherEnsemble,
    loader: DataLoader,
    fields: dict[str, tuple[int, str]],
    rows: int,
    device: torch.device,
    progress: tqdm,
) -> dict[str, np.ndarray]:
    """Every field's (rows, dim) array for one shard, filled batch by batch from the teachers' outputs."""
    arrays = {name: np.empty((rows, dim), dtype=dtype) for name, (dim, dtype) in fields.items()}
    filled = 0
    with torch.inference_mode():
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            count = batch["sample_index"].shape[0]
            for k, output in enumerate(ensemble.outputs(batch)):
                for tower, embeds in zip(TOWERS, (output.image_embeds, output.text_embeds)):
                    arrays[field_name(k, tower)][filled : filled + count] = embeds.float().cpu().numpy()
            filled += count
            progress.update(count)
    if filled != rows:
        raise RuntimeError(f"the shard's loader gave {filled} rows, expected {rows}")
    return arrays


def build_cache(
    cfg: ExperimentConfig, data: DataBundle, primary: TrainedModel, out: Path, progress: bool = True
) -> CacheBuildResult:
    """Build (or resume) the teacher cache of `primary` and `teacher.ensemble` over `data`'s training
    split at `out`, with `cfg.cache`'s views, dtype, shard size, batch size and loader workers."""
    start_time = time.perf_counter()
    check_teacher_fits_data(primary.model, cfg.data.image_size)
    settings = cfg.cache
    members = ensemble_members(cfg, primary)
    ensemble, extra = teacher_ensemble(cfg, primary, primary.model.input_spec, members)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ensemble = ensemble.to(device).eval()
    preprocess = BatchPreprocessor.for_model(primary.tokenizer, primary.model.input_spec)
    collator = RowCollator(PairCollator(preprocess, augment=cfg.data.augment, seed=cfg.seed, extra=extra))
    pairs = InMemoryPairs(data.train.images, data.train.captions, data.train.attributes)
    fields = cache_fields(members, settings.dtype)
    total = len(pairs) * settings.views
    writer = CacheWriter.open(out, cache_meta(cfg, data, members), fields, total, settings.shard_rows)
    first = writer.next_shard()
    done = total if first is None else first[0]
    written = 0
    with tqdm(total=total, initial=done, desc="teacher cache", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        while (span := writer.next_shard()) is not None:
            begin, stop = span
            loader = DataLoader(
                ShardRows(pairs, settings.views, begin, stop),
                batch_size=settings.batch_size,
                shuffle=False,
                num_workers=settings.num_workers,
                collate_fn=collator,
            )
            arrays = _shard_arrays(ensemble, loader, fields, stop - begin, device, bar)
            writer.write_shard(begin // writer.shard_rows, arrays)
            written += 1
    writer.finish()
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
