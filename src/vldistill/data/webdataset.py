"""Streaming image-caption pairs from webdataset tar shards in the img2dataset layout: each shard
holds, per sample key, an image `{key}.jpg|jpeg|png|webp`, a caption `{key}.txt` and optionally
`{key}.json`, with a key's members next to each other. Shards are read one member at a time, so memory
stays flat however many shards there are.

Each sample's `index` is `shard_number * SHARD_STRIDE + position`, where `shard_number` is the shard's
place in the sorted list of shard paths and `position` the key's place in its shard (counting every
key, bad ones too), so it is stable across epochs, ranks, workers and resumption.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vldistill.data.images import BadImage, decode_image
from vldistill.distributed import process_rank
from vldistill.data.pairs import PairSample
from vldistill.data.quality import DataQuality
from vldistill.data.synthetic import make_split

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
SHARD_STRIDE = 10**6  # sample index = shard number * SHARD_STRIDE + position in the shard
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # webdataset's rule: key up to the basename's first dot


def list_shards(shards: list[str] | str) -> list[str]:
    """Sorted shard paths: an explicit list, a folder (its `*.tar` files) or a glob pattern."""
    if isinstance(shards, (list, tuple)):
        paths = [str(path) for path in shards]
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"shard files do not exist: {', '.join(missing[:5])}")
    elif Path(shards).is_dir():
        paths = [str(path) for path in Path(shards).glob("*.tar")]
    else:
        paths = glob.glob(shards)
    if not paths:
        raise FileNotFoundError(f"no webdataset shards (.tar) found at {shards!r}")
    return sorted(paths)


def resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """(rank, world_size): as given, else the process's (see vldistill.distributed.process_rank)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    if rank is None:
        rank, world_size = process_rank()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard numbers in the order epoch `epoch` reads them: a permutation drawn from (seed, epoch), or sorted."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def split_shards(order: list[int], rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """The shards one DataLoader worker of one rank reads: every world_size-th shard of the epoch's order
    from `rank`, then every num_workers-th of those from `worker` (together a partition of `order`)."""
    return order[rank::world_size][worker::num_workers]


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, e.g. "dir/000010005.jpg" -> ("dir/000010005", "jpg")."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


class WebDatasetPairs(IterableDataset):
    """Image-caption pairs streamed from img2dataset-style tar shards (see the module docstring),
    yielding `PairSample(image uint8 (S, S, 3), caption, None, index)`.

    Each epoch (`set_epoch`) reads the shards in an order drawn from (seed, epoch) (sorted when
    `shuffle_shards` is False), split across ranks and then DataLoader workers so every sample is read
    by exactly one worker of one rank; within a shard, samples come in file order. Images decode by
    the rules every source shares (images.decode_image). Bad samples are skipped and counted in
    `quality` by kind; a shard that cannot be opened counts once as "unreadable_member". With
    DataLoader workers, each worker counts into its own copy of `quality`.

    `state_dict()` is the position of single-process iteration (num_workers=0): the epoch, the
    cursor into this rank's shard list and the samples already consumed from that shard.
    `load_state_dict` resumes at the next sample. With workers the position is not tracked (the
    dataset in the main process never iterates), so resuming restarts the epoch.
    """

    def __init__(
        self,
        shards: list[str] | str,
        image_size: int,
        quality: DataQuality,
        seed: int = 0,
        shuffle_shards: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        self.shards = list_shards(shards)
        self.image_size = image_size
        self.quality = quality
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.epoch, self.shard_cursor, self.sample_in_shard = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch`'s shard order from now on; a new epoch starts at its beginning (setting the
        current epoch again keeps a position restored by `load_state_dict`)."""
        if epoch != self.epoch:
            self.epoch, self.shard_cursor, self.sample_in_shard = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        """The single-process read position: {"epoch", "shard_cursor", "sample_in_shard"}."""
        return {"epoch": self.epoch, "shard_cursor": self.shard_cursor, "sample_in_shard": self.sample_in_shard}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the position `state_dict()` returned."""
        missing = {"epoch", "shard_cursor", "sample_in_shard"} - set(state)
        if missing:
            raise KeyError(f"webdataset state lacks {', '.join(sorted(missing))}")
        self.epoch, self.shard_cursor, self.sample_in_shard = (
            int(state["epoch"]), int(state["shard_cursor"]), int(state["sample_in_shard"])
        )

    def rank_shards(self) -> list[int]:
        """This rank's shard numbers for the current epoch, in reading order."""
        order = epoch_shard_order(len(self.shards), self.seed, self.epoch, self.shuffle_shards)
        return split_shards(order, self.rank, self.world_size, 0, 1)

    def __iter__(self) -> Iterator[PairSample]:
        info = get_worker_info()
        shards = self.rank_shards()
        if info is not None and info.num_workers > 1:
            yield from self._read_all(shards[info.id :: info.num_workers], track=False)
            return
        start, skip = self.shard_cursor, self.sample_in_shard
        yield from self._read_all(shards[start:], track=True, skip=skip)
        self.shard_cursor, self.sample_in_shard = 0, 0  # a finished epoch reads from its start again

    def _read_all(self, shards: list[int], track: bool, skip: int = 0) -> Iterator[PairSample]:
        """Samples of `shards` in order, the first `skip` keys of the first shard left out; with `track`
        the read position is kept in `shard_cursor`/`sample_in_shard`."""
        for number in shards:
            for sample in self._read_shard(number, skip):
                if track:
                    self.sample_in_shard = sample.index % SHARD_STRIDE + 1
                yield sample
            skip = 0
            if track:
                self.shard_cursor, self.sample_in_shard = self.shard_cursor + 1, 0

    def _read_shard(self, number: int, skip: int) -> Iterator[PairSample]:
        """The good samples of shard `number` from key position `skip` on, recording each in `quality`."""
        name = os.path.basename(self.shards[number])
        for position, key, files in self._member_groups(number, skip):
            if position >= SHARD_STRIDE:
                raise ValueError(f"shard {name} holds more than {SHARD_STRIDE} samples; sample indices would collide")
            sample = self._make_sample(name, key, files, number * SHARD_STRIDE + position)
            if sample is not None:
                self.quality.record_good()
                yield sample

    def _member_groups(self, number: int, skip: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(position, key, {extension: bytes}) per key of shard `number`, streamed member by member; keys
        before position `skip` are passed over unread. An unreadable shard or member is recorded as
        "unreadable_member" and ends the shard."""
        path = self.shards[number]
        name = os.path.basename(path)
        wanted = (*IMAGE_EXTENSIONS, CAPTION_EXTENSION)
        try:
            archive = tarfile.open(path, mode="r|*")
        except (tarfile.TarError, OSError) as error:
            self.quality.record_bad("unreadable_member", f"{name}: cannot open shard ({error})")
            return
        with archive:
            position, key, files = -1, None, {}
            try:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = split_member_name(member.name)
                    if member_key != key:
                        if key is not None and position >= skip:
                            yield position, key, files
                        position, key, files = position + 1, member_key, {}
                    if position >= skip and extension in wanted:
                        files[extension] = archive.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as error:
                self.quality.record_bad("unreadable_member", f"{name}:{key}: unreadable tar member ({error})")
                return
            if key is not None and position >= skip:
                yield position, key, files

    def _make_sample(self, shard: str, key: str, files: dict[str, bytes], index: int) -> Optional[PairSample]:
        """The sample of one key, or None after recording why it is bad."""
        image_data = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
        if image_data is None or CAPTION_EXTENSION not in files:
            lacking = "an image" if image_data is None else "a caption (.txt)"
            self.quality.record_bad("missing", f"{shard}:{key}: no {lacking}")
            return None
        try:
            caption = files[CAPTION_EXTENSION].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            self.quality.record_bad("not_utf8", f"{shard}:{key}: caption is not valid UTF-8 (byte 0x{files[CAPTION_EXTENSION][error.start]:02x})")
            return None
        if not caption:
            self.quality.record_bad("empty_caption", f"{shard}:{key}: empty caption")
            return None
        try:
            image = decode_image(image_data, self.image_size)
        except BadImage as error:
            self.quality.record_bad(error.kind, f"{shard}:{key}: {error.reason}")
            return None
        return PairSample(image, caption, None, index)


def _chunk_seed(seed: int, shard: int) -> int:
    """A 63-bit seed for the synthetic pairs of shard `shard`, from (seed, shard)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{shard}".encode(), digest_size=8).digest(), "little") >> 1


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular file (fixed mtime, so shards are byte-reproducible)."""
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    archive.addfile(member, io.BytesIO(data))


def write_synthetic_shards(
    folder: str | Path, num_pairs: int, pairs_per_shard: int, image_size: int = 32, seed: int = 0
) -> list[Path]:
    """Write `num_pairs` shapes pairs (training captions) as img2dataset-style shards
    `{shard:05d}.tar` in `folder`, members `{key}.jpg`, `{key}.txt`, `{key}.json` with key
    `{shard:05d}{position:04d}`; one shard is generated at a time. Returns the shard paths."""
    if num_pairs < 1 or not 1 <= pairs_per_shard < 10**4:
        raise ValueError(f"need num_pairs >= 1 and 1 <= pairs_per_shard < 10000, got {num_pairs}, {pairs_per_shard}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_pairs, pairs_per_shard)):
        count = min(pairs_per_shard, num_pairs - start)
        split = make_split("train", count, seed=_chunk_seed(seed, shard), image_size=image_size)
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for position in range(count):
                key = f"{shard:05d}{position:04d}"
                encoded = io.BytesIO()
                Image.fromarray(split.images[position]).save(encoded, format="JPEG", quality=95)
                caption = split.captions[position]
                record: dict[str, Any] = {"key": key, "caption": caption, "status": "success", "width": image_size, "height": image_size}
                _add_member(archive, f"{key}.jpg", encoded.getvalue())
                _add_member(archive, f"{key}.txt", caption.encode("utf-8"))
                _add_member(archive, f"{key}.json", json.dumps(record).encode("utf-8"))
        paths.append(path)
    return paths
