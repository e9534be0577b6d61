"""Global batches split across processes and accumulation micro-batches: every rank's slices, in order,
make up exactly the batches one process would draw, and resuming skips whole slices."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, RandomSampler

from vldistill.data.pairs import SkippingBatchSampler


def global_batches(seed: int = 0) -> BatchSampler:
    return BatchSampler(RandomSampler(range(30), generator=torch.Generator().manual_seed(seed)), 8, drop_last=True)


def test_ranks_and_micro_batches_partition_each_global_batch_in_order():
    expected = list(global_batches())
    assert len(expected) == 3  # 30 samples, batches of 8, the last 6 dropped
    slices = {rank: list(SkippingBatchSampler(global_batches(), rank, world=2, micro_batches=2)) for rank in (0, 1)}
    assert all(len(s) == 6 and all(len(part) == 2 for part in s) for s in slices.values())
    for step, batch in enumerate(expected):
        micro = [slices[rank][2 * step + k] for k in range(2) for rank in (0, 1)]  # micro-batch, then rank
        assert [i for part in micro for i in part] == batch
    assert len(SkippingBatchSampler(global_batches(), 1, world=2, micro_batches=2)) == 6


def test_skip_drops_the_first_slices_of_one_pass():
    whole = list(SkippingBatchSampler(global_batches(), rank=1, world=2, micro_batches=2))
    sampler = SkippingBatchSampler(global_batches(), rank=1, world=2, micro_batches=2)
    sampler.skip = 3
    assert list(sampler) == whole[3:]
    assert sampler.skip == 0 and len(list(sampler)) == 6  # the next pass is whole again
