"""Image-caption pair datasets and the collator that turns samples into model-ready batches."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, get_worker_info

from vldistill.data.quality import DataQuality
from vldistill.distributed import process_rank
from vldistill.data.augment import AugmentConfig, apply_augment, sample_params


@dataclass
class PairSplit:
    """One split held in memory: distinct uint8 images (N, H, W, 3), their captions (T >= N), optional
    class labels (indices into the bundle's class names) and optional attributes, one each per image.

    `text_to_image[j]` is the index of the image caption j describes (T,); None means one caption per
    image, caption i describing image i. Every image has at least one caption. The retrieval benchmarks
    (COCO, Flickr30k) have about five captions per image, held once each here: retrieval is scored over
    the distinct images (see eval.retrieval).

    `references[i]` are the reference captions a generated caption of image i is scored against (captioning
    metrics); None means each image's own captions in the split (see `image_references`).
    """

    images: np.ndarray
    captions: list[str]
    labels: Optional[np.ndarray] = None
    attributes: Optional[list[dict[str, str]]] = None
    text_to_image: Optional[np.ndarray] = None
    references: Optional[list[list[str]]] = None

    def __post_init__(self) -> None:
        n_images = len(self.images)
        if self.text_to_image is None:
            if len(self.captions) != n_images:
                raise ValueError(f"{n_images} images but {len(self.captions)} captions and no text_to_image")
        else:
            self.text_to_image = np.asarray(self.text_to_image, dtype=np.int64)
            if self.text_to_image.shape != (len(self.captions),):
                raise ValueError(f"text_to_image has shape {self.text_to_image.shape}, expected ({len(self.captions)},)")
            if not np.array_equal(np.unique(self.text_to_image), np.arange(n_images)):
                raise ValueError(f"text_to_image must give each of the {n_images} images a caption, and no other image")
        for name in ("labels", "attributes", "references"):
            value = getattr(self, name)
            if value is not None and len(value) != n_images:
                raise ValueError(f"{len(value)} {name} for {n_images} images")
        empty = [i for i, refs in enumerate(self.references or []) if isinstance(refs, str) or not refs]
        if empty:
            raise ValueError(f"references of image {empty[0]} must be a non-empty list of captions")

    def __len__(self) -> int:
        """The number of (distinct) images."""
        return len(self.images)

    def caption_images(self) -> np.ndarray:
        """(T,) the image index of each caption."""
        return self.text_to_image if self.text_to_image is not None else np.arange(len(self.images))

    def image_references(self) -> list[list[str]]:
        """Each image's reference captions: `references` when set, else the image's own captions in the
        split in caption order (a Karpathy-format set's five per image)."""
        if self.references is not None:
            return [list(refs) for refs in self.references]
        grouped: list[list[str]] = [[] for _ in range(len(self.images))]
        for caption, image in zip(self.captions, self.caption_images().tolist()):
            grouped[image].append(caption)
        return grouped

    def as_pairs(self) -> "InMemoryPairs":
        """The split as training pairs: one `InMemoryPairs` row per caption (its image repeated)."""
        if self.text_to_image is None:
            return InMemoryPairs(self.images, self.captions, self.attributes)
        rows = self.text_to_image
        attributes = [self.attributes[i] for i in rows] if self.attributes is not None else None
        return InMemoryPairs(self.images[rows], self.captions, attributes)


class PairSample(NamedTuple):
    """One pair as a dataset yields it: uint8 image (H, W, 3), caption, optional attributes and its
    index in the dataset (None for a pair built by hand, which cannot be augmented)."""

    image: torch.Tensor
    caption: str
    attributes: Optional[dict[str, str]] = None
    index: Optional[int] = None


Preprocess = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


class InMemoryPairs(Dataset):
    """Pairs held in memory: uint8 images (N, H, W, 3), one caption each and optional per-sample
    attributes (the shapes data's, used by caption paraphrase); items are `PairSample`s."""

    def __init__(
        self, images: np.ndarray, captions: list[str], attributes: Optional[list[dict[str, str]]] = None
    ) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if attributes is not None and len(attributes) != len(captions):
            raise ValueError(f"{len(attributes)} attribute records but {len(captions)} captions")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.captions = captions
        self.attributes = attributes

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> PairSample:
        attributes = self.attributes[index] if self.attributes is not None else None
        return PairSample(self.images[index], self.captions[index], attributes, int(index))


def drop_bad(samples: Sequence[Optional[tuple]]) -> list[tuple]:
    """The samples without the Nones a lazily decoding source returns for bad input."""
    return [sample for sample in samples if sample is not None]


def view_generator(seed: int, index: int, view: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, sample index, view id), not on call order."""
    digest = hashlib.blake2b(f"{seed}:{index}:{view}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def make_view(sample: PairSample, augment: Optional[AugmentConfig], seed: int, view: int) -> tuple[torch.Tensor, str]:
    """View `view` of one pair: the pair itself without `augment`, else the augmentation drawn from
    `view_generator(seed, sample.index, view)`, so it can be regenerated exactly (e.g. by a teacher cache)."""
    if augment is None:
        return sample.image, sample.caption
    if sample.index is None:
        raise ValueError("augmenting a pair needs its dataset index (PairSample.index) to seed its view")
    generator = view_generator(seed, sample.index, view)
    params = sample_params(generator, augment, sample.image.shape[0], sample.caption, sample.attributes)
    return apply_augment(sample.image, sample.caption, params, sample.attributes)


def view_hash(image: torch.Tensor, caption: str) -> int:
    """63-bit fingerprint of a view as models are fed it (after augmentation, before preprocessing):
    blake2b (8-byte digest) of its shape as "HxWxC:", its uint8 image bytes in C order, then its
    caption as UTF-8, read little-endian and shifted right by one so it fits an int64."""
    if image.dtype != torch.uint8:
        raise ValueError(f"a view's image must be uint8 to fingerprint, got {image.dtype}")
    digest = hashlib.blake2b(("x".join(map(str, image.shape)) + ":").encode(), digest_size=8)
    digest.update(image.detach().cpu().contiguous().numpy().tobytes())
    digest.update(caption.encode("utf-8"))
    return int.from_bytes(digest.digest(), "little") >> 1


class PairCollator:
    """Collate samples into model inputs: `preprocess` makes the student's (and primary teacher's)
    unprefixed `pixel_values`/`input_ids`/`attention_mask`; each `extra[name]` makes the same keys
    prefixed `name.` for a teacher that takes other inputs (tokenizer, image size, normalization).

    With `augment` (training only; None = off), each pair is first replaced by its view (see
    `make_view`), so every model in the batch sees the same view. Calling the collator uses view
    `self.view` for every sample (`set_epoch` moves it: epoch e uses view e, or e % `views` when
    `views` is set, e.g. by a teacher cache holding that many views). When every sample carries its
    index, the batch also holds `sample_index`, `view` and `view_hash` (each view's `view_hash`, the
    fingerprint a teacher cache checks its stored rows against), (B,) LongTensors. `attach`, when given, adds
    the entries it makes from the batch's samples and their view ids (e.g. a teacher cache's ITM negatives'
    inputs, teachers/cache/negatives.py).

    Inside a DataLoader worker, the bad-input counts the worker's copy of `quality` gathered since the
    last batch travel with the batch as `batch["data_quality"]` (`repeat_batches` merges them into the
    main process's `quality`).
    """

    def __init__(
        self,
        preprocess: Preprocess,
        augment: Optional[AugmentConfig] = None,
        seed: int = 0,
        extra: Optional[Mapping[str, Preprocess]] = None,
        views: Optional[int] = None,
        quality: Optional[DataQuality] = None,
        attach: Optional[Callable[[Sequence[PairSample], Sequence[int]], dict[str, torch.Tensor]]] = None,
    ) -> None:
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1 or None, got {views}")
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.extra = dict(extra or {})
        self.views = views
        self.view = 0
        self.quality = quality
        self.attach = attach

    def set_epoch(self, epoch: int) -> None:
        """Use the view of training epoch `epoch` for the batches collated from now on."""
        self.view = epoch if self.views is None else epoch % self.views

    def __call__(self, samples: Sequence[Optional[tuple]]) -> dict[str, torch.Tensor]:
        """The batch of view `self.view` of every sample (with the worker's bad-input counts, in a worker)."""
        batch = self.collate(samples, [self.view] * len(samples))
        if self.quality is not None and get_worker_info() is not None:
            batch["data_quality"] = self.quality.drain()
        return batch

    def collate(self, samples: Sequence[Optional[tuple]], views: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of view `views[j]` of each sample j (PairSamples, or (image, caption, attributes));
        None samples (bad input a lazy source skipped, see `drop_bad`) are left out of the batch."""
        if len(views) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(views)} view ids")
        kept = [(sample, view) for sample, view in zip(samples, views) if sample is not None]
        if not kept:
            return {}  # every sample was bad input (already counted): the batch is skipped
        samples, views = [PairSample(*sample) for sample, _ in kept], [view for _, view in kept]
        images, captions = zip(*(make_view(s, self.augment, self.seed, v) for s, v in zip(samples, views)))
        images, captions = torch.stack(images), list(captions)
        batch = self.preprocess(images, captions)
        for name, preprocess in self.extra.items():
            batch.update({f"{name}.{key}": value for key, value in preprocess(images, captions).items()})
        if all(s.index is not None for s in samples):
            batch["sample_index"] = torch.tensor([s.index for s in samples], dtype=torch.long)
            batch["view"] = torch.tensor(list(views), dtype=torch.long)
            batch["view_hash"] = torch.tensor([view_hash(i, c) for i, c in zip(images, captions)], dtype=torch.long)
        if self.attach is not None:
            batch.update(self.attach(samples, views))
        return batch


class _EmptyWorkerTally:
    """Worker start hook: empty the worker's copy of the tally, so it ships only what the worker counts."""

    def __init__(self, quality: DataQuality) -> None:
        self.quality = quality

    def __call__(self, worker_id: int) -> None:
        self.quality.drain()


REFILL_CANDIDATES = 32  # candidate pairs per batch position: its own and those at its place in later batches


class SkippingBatchSampler(Sampler):
    """A batch sampler over global batches that yields this rank's slices of each: the global batch is cut
    into `micro_batches` consecutive parts (gradient accumulation), each part into `world` equal slices,
    and rank r takes the r-th slice of every part. It can skip its next pass's first `skip` slices without
    fetching them (their indices are still drawn, so the random order after them is unchanged).

    Each position of a slice is a tuple of candidate indices, read by `RefillingPairs` as the first good
    pair among them: the global batch's index at that position, then the indices at the same position
    ("lane") of the pass's next global batches, wrapping around to its first ones, `candidates` at most
    (and at most the pass's batches; see `RefillingPairs` for a position whose candidates are all bad). So
    a bad pair is replaced by its own rank from further along its own share, every rank's slices stay full,
    and two positions of a batch never share an index. The batches depend only on the seed and the global
    batch size, not on the number of processes or micro-batches (except where a position borrows), and the
    data position is the step, so a resumed run reads what an uninterrupted one would (a replacement pair
    is also read at its own place, so twice in that pass)."""

    def __init__(
        self, inner: BatchSampler, rank: int = 0, world: int = 1, micro_batches: int = 1,
        candidates: int = REFILL_CANDIDATES,
    ) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.inner, self.rank, self.world, self.micro_batches = inner, rank, world, micro_batches
        self.candidates = candidates
        self.rows = inner.batch_size // (micro_batches * world)  # pairs in each of this rank's slices
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner) * self.micro_batches

    def depth(self) -> int:
        """Candidates per position: `candidates`, or the pass's global batches when there are fewer."""
        return min(self.candidates, len(self.inner))

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        skip, self.skip = self.skip, 0
        batches = [torch.tensor(indices) for indices in self.inner]  # the pass's global batches, drawn in full
        if not batches:
            return
        order = torch.stack(batches)
        later = torch.arange(self.depth())
        micro = self.inner.batch_size // self.micro_batches
        number = 0
        for step in range(len(order)):
            lanes = order[(step + later) % len(order)].T  # (batch_size, depth): each position's candidates
            for start in range(0, self.inner.batch_size, micro):
                if number >= skip:
                    first = start + self.rank * self.rows
                    yield [tuple(lane) for lane in lanes[first : first + self.rows].tolist()]
                number += 1


class RefillingPairs(Dataset):
    """A map-style pair dataset read through slices of candidate tuples (see `SkippingBatchSampler`; the
    dataset gives None for bad input): each position of a slice takes the first good pair among its own
    candidates, and a position whose candidates are all bad takes the first good one among the slice's
    candidates the other positions left unused (so the slice stays full, without repeating a pair, when
    the dataset holds few batches and thus few candidates per position). A position is None only when
    the whole slice's candidates hold fewer good pairs than it has positions."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, candidates: Sequence[int]) -> Optional[PairSample]:
        return self.__getitems__([candidates])[0]

    def __getitems__(self, slots: Sequence[Sequence[int]]) -> list[Optional[PairSample]]:
        """The pair each position of a slice reads (see the class docstring)."""
        chosen: list[Optional[PairSample]] = []
        spare: list[int] = []  # candidates no position reached: lent to positions whose own ones are all bad
        for candidates in slots:
            sample = None
            for k, index in enumerate(candidates):
                sample = self.dataset[index]
                if sample is not None:
                    spare.extend(candidates[k + 1 :])
                    break
            chosen.append(sample)
        lent = (sample for sample in map(self.dataset.__getitem__, spare) if sample is not None)
        return [sample if sample is not None else next(lent, None) for sample in chosen]


class GoodPairs(IterableDataset):
    """A stream of pairs without the Nones (bad input) its source yields, so batches cut from it are full;
    `set_epoch` reaches the source."""

    def __init__(self, stream: IterableDataset) -> None:
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        """Tell the source which epoch it reads (when it shuffles per epoch)."""
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[PairSample]:
        return (sample for sample in self.stream if sample is not None)


def held_out_pairs(
    dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, source: str = "the data"
) -> list[PairSample]:
    """Process `rank`'s share of a fixed batch of good pairs: `batch_size // world` of them (all processes' shares
    equal in size). From a map-style dataset, the batch is the first `n` good pairs of the order `seed` shuffles
    it in (the training loader's first order for that seed), with n = `batch_size`, or the dataset's size when
    it is smaller, rounded down to a multiple of `world`: a bad pair is replaced by the next good one in that
    order, and process r takes the r-th of `world` consecutive parts, so the shares together are exactly the
    one-process batch. Every process reads the same pairs (the first `REFILL_CANDIDATES` x n of the order at
    most), so all agree on the batch or all fail alike. From a stream, the share is the first good pairs of
    this process's own shards. ValueError, naming `source`, when the data cannot supply that many good pairs."""
    share = batch_size // world
    if isinstance(dataset, IterableDataset):
        samples = list(itertools.islice(GoodPairs(dataset), share))
        if len(samples) < share:
            raise ValueError(
                f"the held-out batch needs {share} good pairs from process {rank}'s part of {source}, which holds "
                f"only {len(samples)}; lower the batch size or add data"
            )
        return samples
    count = min(batch_size, len(dataset)) // world * world
    if count == 0:
        raise ValueError(f"the held-out batch needs a pair per process, but {source} holds {len(dataset)} for {world}")
    share = count // world
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: count * REFILL_CANDIDATES]
    mine, found = [], 0
    for index in order.tolist():
        sample = dataset[index]
        if sample is None:
            continue
        if found // share == rank:
            mine.append(sample)
        found += 1
        if found == count:
            return mine
    raise ValueError(
        f"the held-out batch needs {count} good pairs, but the {len(order)} pairs of {source} it drew hold only "
        f"{found} (see the data quality report)"
    )


def pair_loader(
    dataset: Dataset,
    collate: PairCollator,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    micro_batches: int = 1,
) -> DataLoader:
    """A loader of this process's share of each global batch of `batch_size` (the same global batches for
    any number of processes), cut into `micro_batches` consecutive micro-batches for gradient accumulation
    (each yielded in turn), dropping the last incomplete batch, decoding in `num_workers` processes.
    Every batch holds its full share of good pairs, so all processes' batches have the same size: a
    map-style dataset is shuffled in a seeded order and a bad pair is replaced by the next good one at its
    place in later batches (see `SkippingBatchSampler`; batches can be skipped to resume, see
    `repeat_batches`); a streaming one (IterableDataset) shuffles its shards itself (`set_epoch`), splits
    them across the workers, and its bad pairs are left out before batching."""
    workers = {"num_workers": num_workers}
    if num_workers and collate.quality is not None:
        workers["worker_init_fn"] = _EmptyWorkerTally(collate.quality)
    rank, world = process_rank()
    if batch_size % (world * micro_batches):
        raise ValueError(
            f"the batch size {batch_size} must be divisible by the {world} processes x {micro_batches} "
            "accumulation steps"
        )
    if isinstance(dataset, IterableDataset):  # the stream splits its shards across ranks itself
        size = batch_size // (world * micro_batches)
        return DataLoader(GoodPairs(dataset), batch_size=size, drop_last=True, collate_fn=collate, **workers)
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
    batches = SkippingBatchSampler(sampler, rank, world, micro_batches)
    return DataLoader(RefillingPairs(dataset), batch_sampler=batches, collate_fn=collate, generator=generator, **workers)


def _short_batch(loader: DataLoader, number: int, found: int) -> Optional[str]:
    """Why batch `number` of `loader`, holding `found` pairs, is not full (None when it is)."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, SkippingBatchSampler):  # a stream: bad pairs are left out before batching
        rows = loader.batch_size
        return None if found == rows else f"batch {number} holds {found} of its {rows} pairs"
    if found == sampler.rows:
        return None
    return (
        f"batch {number} holds {found} of its {sampler.rows} pairs: its {sampler.rows * sampler.depth()} candidate "
        "pairs held no more good ones, so nearly all of the training data is bad input"
    )


def repeat_batches(
    loader: DataLoader,
    steps: int,
    quality: Optional[DataQuality] = None,
    check_every: int = 50,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches `start_step` to `steps` of the run, starting a new (reshuffled) epoch whenever one
    ends; a `PairCollator` (and a streaming dataset) is told each epoch (`set_epoch`) so it yields that
    epoch's views and shard order. Resuming (`start_step` > 0) reproduces the same order: a map-style
    loader's earlier batches are drawn but not fetched; a stream's are read and dropped. Every batch is
    full (see `pair_loader`); a batch that is not, because a position found no good pair among all its
    candidates, stops the run with an error. With `quality`, its threshold is checked every `check_every`
    batches, at each epoch's end and before that error (DataQualityError when exceeded)."""
    streaming = isinstance(loader.dataset, IterableDataset)
    if not streaming and len(loader) == 0:
        raise ValueError("the dataset is smaller than one batch; lower the batch size or add data")
    produced, epoch = 0, 0
    while produced < steps:
        if isinstance(loader.collate_fn, PairCollator):
            loader.collate_fn.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        if not streaming and produced + len(loader) <= start_step:  # an epoch before the resume point
            loader.batch_sampler.skip = len(loader)
            for _ in loader:
                pass
            produced += len(loader)
            epoch += 1
            continue
        if not streaming and produced < start_step:
            loader.batch_sampler.skip = start_step - produced
            produced = start_step
        produced_before = produced
        for batch in loader:
            counts = batch.pop("data_quality", None)
            if counts is not None and quality is not None:
                quality.merge(counts)
            short = _short_batch(loader, produced + 1, len(batch["pixel_values"]) if batch else 0)
            if short is not None:
                if quality is not None:
                    quality.check()
                raise ValueError(f"{short} (see the data quality report)")
            produced += 1
            if produced > start_step:
                yield batch
            if quality is not None and produced % check_every == 0:
                quality.check()
            if produced == steps:
                return
        if quality is not None:
            quality.check()
        if produced == produced_before:
            raise ValueError("a whole pass over the training data gave no usable batch; see the data quality report")
        epoch += 1
