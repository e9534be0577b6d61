"""The inputs of the ITM negatives a cached BLIP teacher scored, attached to each training batch read from
the cache, so the student scores the very pairs whose logits the cache holds.

At build time each cache row (sample i, view v) got hard negatives drawn by the teacher within its build
batch, stored as cache rows (`teacher0/itm_negatives`, models/blip_signals.py): the row whose caption is
image i's negative and the row whose image is caption i's negative. `ITMNegativeInputs` is a PairCollator
`attach` hook: for the batch's rows it regenerates those rows' views (data.pairs.make_view, checked against
their stored `view_hash`) and preprocesses them as the batch is preprocessed, under `itm_negative.` keys
(row j: image j's negative caption as `input_ids` / `attention_mask`, caption j's negative image as
`pixel_values`), with their cache rows as `itm_negative.rows` (B, 2).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vldistill.data.augment import AugmentConfig
from vldistill.data.pairs import PairSample, Preprocess, make_view, view_hash
from vldistill.models.blip_signals import ITM_NEGATIVE_KEY, ITM_NEGATIVE_ROWS
from vldistill.teachers.cache.cached import VIEW_HASH, CachedTeacher, field_name
from vldistill.teachers.cache.store import REBUILD_HINT, CacheError, CacheViewMismatchError

NEGATIVES_FIELD = field_name(0, "itm_negatives")


class ITMNegativeInputs:
    """PairCollator `attach` hook adding the cached ITM negatives' inputs to a batch (see the module doc).
    `pairs` is the whole training set the cache was built from (samples are addressed by their index),
    `preprocess`, `augment` and `seed` those of the batch's own views."""

    def __init__(
        self,
        negatives: np.ndarray,
        view_hashes: np.ndarray,
        views: int,
        pairs: Dataset,
        preprocess: Preprocess,
        augment: Optional[AugmentConfig],
        seed: int,
        where: str = "the teacher cache",
    ) -> None:
        if negatives.ndim != 2 or negatives.shape[1] != 2 or len(view_hashes) != len(negatives):
            raise ValueError(f"negatives must be (rows, 2) beside (rows,) view hashes, got {negatives.shape}, {view_hashes.shape}")
        self.negatives, self.view_hashes, self.views = negatives, view_hashes, views
        self.pairs, self.preprocess, self.augment, self.seed = pairs, preprocess, augment, seed
        self.where = where

    @classmethod
    def from_cache(
        cls, cached: CachedTeacher, pairs: Dataset, preprocess: Preprocess, augment: Optional[AugmentConfig], seed: int
    ) -> "ITMNegativeInputs":
        """The hook for a cache holding ITM (every row's negatives and view hashes read once, 24 bytes a row)."""
        reader = cached.reader
        if NEGATIVES_FIELD not in reader.fields:
            raise ValueError(f"the teacher cache at {reader.root} holds no ITM negatives ({NEGATIVES_FIELD}); {REBUILD_HINT}")
        every = np.arange(reader.total_rows)
        return cls(
            reader.rows(NEGATIVES_FIELD, every), reader.rows(VIEW_HASH, every)[:, 0], cached.views, pairs, preprocess,
            augment, seed, where=f"the teacher cache at {reader.root}",
        )

    def _view(self, row: int) -> tuple[torch.Tensor, str]:
        """The view cache row `row` holds, regenerated and checked against its stored fingerprint."""
        sample = self.pairs[row // self.views]
        if sample is None:
            raise CacheError(f"{self.where}: sample {row // self.views}, an ITM negative, is now bad input; {REBUILD_HINT}")
        image, caption = make_view(PairSample(*sample), self.augment, self.seed, row % self.views)
        if view_hash(image, caption) != self.view_hashes[row]:
            raise CacheViewMismatchError(
                f"{self.where}: sample {row // self.views} view {row % self.views}, an ITM negative, is not the view "
                f"the teacher saw; {REBUILD_HINT}"
            )
        return image, caption

    def __call__(self, samples: Sequence[PairSample], views: Sequence[int]) -> dict[str, torch.Tensor]:
        """The `itm_negative.*` entries of the batch of `samples` at `views` (see the module doc)."""
        if any(sample.index is None for sample in samples):
            raise ValueError("ITM negatives from the teacher cache need each pair's dataset index")
        rows = np.array([sample.index * self.views + view for sample, view in zip(samples, views)], dtype=np.int64)
        negatives = self.negatives[rows]
        if (negatives < 0).any():
            j = int(np.flatnonzero((negatives < 0).any(axis=1))[0])
            raise CacheError(f"{self.where} holds no ITM negatives for sample {samples[j].index} (bad input when built)")
        texts = [self._view(int(row))[1] for row in negatives[:, 0]]
        images = torch.stack([self._view(int(row))[0] for row in negatives[:, 1]])
        batch = self.preprocess(images, texts)
        return {**{f"{ITM_NEGATIVE_KEY}.{key}": value for key, value in batch.items()},
                ITM_NEGATIVE_ROWS: torch.from_numpy(negatives)}
