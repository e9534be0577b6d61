"""Global batches split across processes and accumulation micro-batches: every rank's slices, in order,
make up exactly the batches one process would draw, and resuming skips whole slices. A bad pair is
replaced by the next good one at its place (lane) in later batches, on its own rank, so every rank's
batches stay full and the global batches are the same for any number of processes."""

from __future__ import annotations

import pytest
import torch
from helpers import IndexPairs
from torch.utils.data import BatchSampler, IterableDataset, RandomSampler

from vldistill.data.pairs import (
    PairCollator, RefillingPairs, SkippingBatchSampler, pair_loader, repeat_batches,
)
from vldistill.data.quality import DataQuality, DataQualityError

# The 3 global batches of 8 that seed 0 draws from 30 indices (the last 6 dropped), listed so the refill
# cases below can be worked by hand.
EPOCH_0 = [[14, 13, 23, 27, 29, 9, 25, 4], [6, 21, 11, 12, 18, 22, 20, 26], [0, 10, 16, 7, 15, 2, 19, 8]]


def global_batches(seed: int = 0) -> BatchSampler:
    return BatchSampler(RandomSampler(range(30), generator=torch.Generator().manual_seed(seed)), 8, drop_last=True)


def read(slices, bad=frozenset()) -> list[list[int]]:
    """The indices of the pairs each slice reads (Nones for positions without a good candidate)."""
    pairs = RefillingPairs(IndexPairs(30, bad))
    return [[None if sample is None else sample.index for sample in pairs.__getitems__(part)] for part in slices]


def test_ranks_and_micro_batches_partition_each_global_batch_in_order():
    expected = list(global_batches())
    assert expected == EPOCH_0
    slices = {rank: list(SkippingBatchSampler(global_batches(), rank, world=2, micro_batches=2)) for rank in (0, 1)}
    assert all(len(s) == 6 and all(len(part) == 2 for part in s) for s in slices.values())
    for step, batch in enumerate(expected):
        micro = [slices[rank][2 * step + k] for k in range(2) for rank in (0, 1)]  # micro-batch, then rank
        assert [slot[0] for part in micro for slot in part] == batch
    assert len(SkippingBatchSampler(global_batches(), 1, world=2, micro_batches=2)) == 6


def test_each_position_s_candidates_are_its_lane_in_the_later_batches_wrapping_around():
    rank1 = list(SkippingBatchSampler(global_batches(), rank=1, world=2, micro_batches=2))
    # step 0, second micro-batch, rank 1: global positions 6 and 7; their lanes in batches 0, 1, 2
    assert rank1[1] == [(25, 20, 19), (4, 26, 8)]
    # step 2 wraps around: batches 2, 0, 1
    assert rank1[4] == [(16, 23, 11), (7, 27, 12)]
    assert list(SkippingBatchSampler(global_batches(), 0, candidates=2))[1] == [
        (6, 0), (21, 10), (11, 16), (12, 7), (18, 15), (22, 2), (20, 19), (26, 8)
    ]


def test_skip_drops_the_first_slices_of_one_pass():
    whole = list(SkippingBatchSampler(global_batches(), rank=1, world=2, micro_batches=2))
    sampler = SkippingBatchSampler(global_batches(), rank=1, world=2, micro_batches=2)
    sampler.skip = 3
    assert list(sampler) == whole[3:]
    assert sampler.skip == 0 and len(list(sampler)) == 6  # the next pass is whole again


def test_bad_pairs_are_refilled_on_their_rank_and_the_global_batches_do_not_depend_on_the_processes():
    # batch 0: positions 0 and 1 (rank 0's first slice) are bad, and position 0's lane is bad in batch 1 too;
    # position 5 (rank 0's in the second micro-batch) is bad in batch 2: its lane wraps around to batch 0
    bad = {14, 13, 6, 2}
    slices = {rank: read(SkippingBatchSampler(global_batches(), rank, world=2, micro_batches=2), bad) for rank in (0, 1)}
    assert slices[0][0] == [0, 21] and slices[1][0] == [23, 27]  # 14 -> 6 (bad) -> 0; 13 -> 21
    assert slices[0][5] == [15, 9]  # step 2, second micro-batch, rank 0: 2 -> 9
    assert all(len(part) == 2 and None not in part for s in slices.values() for part in s)
    one = read(SkippingBatchSampler(global_batches(), 0), bad)
    assert one == [
        [0, 21, 23, 27, 29, 9, 25, 4], [0, 21, 11, 12, 18, 22, 20, 26], [0, 10, 16, 7, 15, 9, 19, 8]
    ]
    for step, batch in enumerate(one):  # two processes x two micro-batches draw what one process draws
        assert [i for k in range(2) for rank in (0, 1) for i in slices[rank][2 * step + k]] == batch
        assert len(set(batch)) == 8  # positions never share a pair


def test_a_position_whose_candidates_are_all_bad_takes_one_its_slice_left_unused():
    lane_0 = {14, 6, 0}
    # position 1 took 13, leaving 21 and 10 of its lane unused: position 0 takes 21
    assert read(SkippingBatchSampler(global_batches(), 0), lane_0)[0] == [21, 13, 23, 27, 29, 9, 25, 4]
    # with 2 processes, rank 0's first slice is positions 0 and 1 of the first micro-batch: the same
    assert read(SkippingBatchSampler(global_batches(), 0, world=2, micro_batches=2), lane_0)[0] == [21, 13]
    assert read(SkippingBatchSampler(global_batches(), 0, candidates=2), {14, 6})[0][:2] == [21, 13]
    assert read(SkippingBatchSampler(global_batches(), 0, candidates=3), {14, 6})[0][0] == 0
    # one candidate per position: nothing to lend
    assert read(SkippingBatchSampler(global_batches(), 0, candidates=1), {14})[0][:2] == [None, 13]


def collate(quality=None) -> PairCollator:
    return PairCollator(lambda images, captions: {"pixel_values": images.float()}, quality=quality)


def loaded(loader, steps: int, start_step: int = 0) -> list[list[int]]:
    """The pair indices of each batch `repeat_batches` yields."""
    return [batch["sample_index"].tolist() for batch in repeat_batches(loader, steps, start_step=start_step)]


def all_but_three() -> set[int]:
    """Every pair but the first 3 of the first global batch a seed-0 loader draws."""
    first = loaded(pair_loader(IndexPairs(30), collate(), 8, seed=0), steps=1)[0]
    return set(range(30)) - set(first[:3])


@pytest.mark.parametrize("workers", [0, 1])
def test_every_rank_s_loader_yields_full_batches_that_make_up_the_one_process_batches(monkeypatch, workers):
    bad = {14, 13, 6, 2, 21, 0}
    natural = loaded(pair_loader(IndexPairs(30), collate(), 8, seed=0), steps=4)
    shares = [[batch[p] for batch in natural for p in positions] for positions in ([0, 1, 4, 5], [2, 3, 6, 7])]
    assert [sum(i in bad for i in share) for share in shares] == [4, 2]  # bad pairs in each rank's share
    one = loaded(pair_loader(IndexPairs(30, bad), collate(), 8, seed=0), steps=4)
    assert one[1][:2] == [23, 24]  # 2 -> 13 (bad) -> 23 (its lane wraps around to batch 0); 0 -> 24
    assert [len(batch) for batch in one] == [8] * 4 and len(bad & {i for batch in one for i in batch}) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ranks[rank] = loaded(pair_loader(IndexPairs(30, bad), collate(), 8, seed=0, num_workers=workers, micro_batches=2), 16)
        resumed = pair_loader(IndexPairs(30, bad), collate(), 8, seed=0, micro_batches=2)
        assert loaded(resumed, 16, start_step=10) == ranks[rank][10:]  # step 5 of 8, in the second pass
    assert all(len(part) == 2 for rank in (0, 1) for part in ranks[rank])  # 2 micro-batches of 2 pairs per step
    for step, batch in enumerate(one):
        assert [i for k in range(2) for rank in (0, 1) for i in ranks[rank][2 * step + k]] == batch


def test_a_batch_without_enough_good_candidates_stops_the_run():
    loader = pair_loader(IndexPairs(30, all_but_three()), collate(), 8, seed=0)
    with pytest.raises(ValueError, match=r"batch 1 holds 3 of its 8 pairs: its 24 candidate pairs held no more good "
                                         r"ones, so nearly all of the training data is bad input"):
        loaded(loader, steps=3)


class CountedPairs(IndexPairs):
    """`IndexPairs` recording each fetch in a tally, as the lazy sources do."""

    def __init__(self, bad, quality: DataQuality) -> None:
        super().__init__(30, bad)
        self.quality = quality

    def __getitem__(self, index: int):
        sample = super().__getitem__(index)
        if sample is None:
            self.quality.record_bad("corrupt", f"pair {index}")
        else:
            self.quality.record_good()
        return sample


def test_the_quality_threshold_is_checked_before_a_short_batch_is_reported():
    quality = DataQuality(threshold=0.05)
    loader = pair_loader(CountedPairs(all_but_three(), quality), collate(quality), 8, seed=0)
    with pytest.raises(DataQualityError, match=r"too much bad input \(87.50% > 5.00%\)"):  # 21 bad of 24 fetched
        list(repeat_batches(loader, steps=3, quality=quality))


class Stream(IterableDataset):
    """A stream of 20 pairs in which every third is bad input (None)."""

    def __iter__(self):
        for index in range(20):
            yield None if index % 3 == 0 else IndexPairs(30)[index]


def test_a_stream_s_bad_pairs_are_left_out_before_batching():
    loader = pair_loader(Stream(), collate(), 4, seed=0)
    indices = [b["sample_index"].tolist() for b in repeat_batches(loader, steps=4)]
    assert indices == [[1, 2, 4, 5], [7, 8, 10, 11], [13, 14, 16, 17], [1, 2, 4, 5]]  # 13 good: 3 batches a pass
