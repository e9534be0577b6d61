"""The data an experiment uses: a training set (in memory, lazily decoded or streamed), an in-memory
test split for retrieval, an optional labelled split and prompts for zero-shot classification, and
the bad-input accounting of the run."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from vldistill.config import DataConfig, plain_digest
from vldistill.data import synthetic
from vldistill.data.classes import ImageFolderClasses, load_templates
from vldistill.data.pairs import InMemoryPairs, PairSplit
from vldistill.data.quality import DataQuality
from vldistill.data.sources import open_pairs
from vldistill.data.tokenizer import words_in

# Bump when the generator's output changes, so cached teachers trained on the old data are refused.
SHAPES_VERSION = 2


@dataclass
class DataBundle:
    """Everything an experiment reads.

    train: a dataset of `PairSample`s (map-style or streaming); val: an optional held-out one.
    test: the retrieval pairs, decoded in memory. zeroshot: labelled images for zero-shot
    classification over `classnames` with `templates` (None: retrieval only).
    quality: counts of skipped bad samples (shared by every source of this bundle).
    grammar: extra words the data may produce (the shapes captions' full vocabulary).
    """

    name: str
    train: Dataset
    test: PairSplit
    zeroshot: Optional[PairSplit]
    classnames: Optional[list[str]]
    templates: list[str]
    fingerprint: str
    quality: DataQuality
    val: Optional[Dataset] = None
    grammar: tuple[str, ...] = ()

    def words(self) -> set[str]:
        """Every word of the captions, prompt templates, class names and grammar: a tokenizer's vocabulary."""
        texts = [
            *dataset_captions(self.train), *self.test.captions, *self.templates, *(self.classnames or []), *self.grammar
        ]
        return words_in(text.replace("{}", " ") for text in texts)


def in_memory_bundle(
    train: PairSplit,
    test: PairSplit,
    val: Optional[PairSplit] = None,
    name: str = "in-memory",
    classnames: Optional[list[str]] = None,
    templates: tuple[str, ...] = (),
) -> DataBundle:
    """A bundle over splits already in memory (zero-shot on `test` when it has labels and class names)."""
    as_pairs = lambda split: InMemoryPairs(split.images, split.captions, split.attributes)  # noqa: E731
    labelled = test.labels is not None and classnames is not None
    return DataBundle(
        name=name,
        train=as_pairs(train),
        val=as_pairs(val) if val is not None else None,
        test=test,
        zeroshot=test if labelled else None,
        classnames=classnames if labelled else None,
        templates=list(templates),
        fingerprint=name,
        quality=DataQuality(),
    )


def dataset_captions(dataset: Dataset) -> list[str]:
    """The captions of a map-style pair dataset, read without decoding any image."""
    if isinstance(dataset, InMemoryPairs):
        return list(dataset.captions)
    if hasattr(dataset, "pairs"):
        return [caption for _, caption in dataset.pairs]
    raise ValueError(
        f"the captions of a streaming {type(dataset).__name__} are unknown before reading it: pretrain the "
        "teacher on a manifest, image folder or HF dataset, or give teacher.path"
    )


def _path_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's listing (relative path, size, mtime) without reading it."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
    else:
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def data_fingerprint(cfg: DataConfig) -> str:
    """A short hash identifying the data a config gives (settings, file contents or listings, generator version)."""
    payload = {"config": asdict(cfg), "shapes_version": SHAPES_VERSION}
    for key in ("train", "test", "classes", "classnames", "templates"):
        if getattr(cfg, key):
            payload[key] = _path_digest(Path(getattr(cfg, key)))
    return plain_digest(payload)


def decode_all(samples: Iterable, desc: str, progress: bool) -> list:
    """Every good sample of a source (bad ones, returned as None, are already counted and dropped)."""
    return [sample for sample in tqdm(samples, desc=desc, disable=not progress) if sample is not None]


def _iterate(dataset: Dataset) -> Iterable:
    if isinstance(dataset, IterableDataset):
        return iter(dataset)
    return (dataset[i] for i in range(len(dataset)))


def decode_pairs(dataset: Dataset, desc: str, progress: bool) -> PairSplit:
    """Decode a (small) pair dataset into an in-memory split, skipping bad samples."""
    samples = decode_all(_iterate(dataset), desc, progress)
    if not samples:
        raise ValueError(f"{desc}: no usable pairs (see the data quality report)")
    return PairSplit(np.stack([s.image.numpy() for s in samples]), [s.caption for s in samples])


def decode_classes(dataset: ImageFolderClasses, progress: bool) -> PairSplit:
    """Decode a class-folder set into a labelled split (captions are the class names)."""
    samples = decode_all(_iterate(dataset), "read classes", progress)
    if not samples:
        raise ValueError(f"{dataset.root}: no usable images (see the data quality report)")
    labels = np.array([s.label for s in samples], dtype=np.int64)
    images = np.stack([torch.as_tensor(s.image).numpy() for s in samples])
    return PairSplit(images, [dataset.classnames[label] for label in labels], labels)


def _shapes(cfg: DataConfig, progress: bool) -> DataBundle:
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    splits = {
        split: synthetic.make_split(split, sizes[split], seed=cfg.seed, image_size=cfg.image_size)
        for split in tqdm(sizes, desc="generate data", disable=not progress)
    }
    in_memory = {name: InMemoryPairs(s.images, s.captions, s.attributes) for name, s in splits.items()}
    return DataBundle(
        name="shapes",
        train=in_memory["train"],
        val=in_memory["val"],
        test=splits["test"],
        zeroshot=splits["test"],
        classnames=synthetic.class_names(),
        templates=list(synthetic.ZERO_SHOT_TEMPLATES),
        fingerprint=data_fingerprint(cfg),
        quality=DataQuality(threshold=cfg.max_bad_share),
        grammar=tuple(synthetic.vocabulary()),
    )


def _files(cfg: DataConfig, progress: bool) -> DataBundle:
    quality = DataQuality(threshold=cfg.max_bad_share)
    test = decode_pairs(open_pairs(cfg.test, cfg.image_size, quality), "read test pairs", progress)
    zeroshot = classnames = None
    if cfg.classes:
        classes = ImageFolderClasses(cfg.classes, cfg.image_size, quality, cfg.classnames)
        zeroshot, classnames = decode_classes(classes, progress), classes.classnames
    return DataBundle(
        name=Path(cfg.test).stem,
        train=open_pairs(cfg.train, cfg.image_size, quality),
        test=test,
        zeroshot=zeroshot,
        classnames=classnames,
        templates=load_templates(cfg.templates),
        fingerprint=data_fingerprint(cfg),
        quality=quality,
    )


def load_data(cfg: DataConfig, progress: bool = True) -> DataBundle:
    """Build or open the configured dataset (test and zero-shot splits are decoded now, training
    data stays lazy or streamed)."""
    return {"shapes": _shapes, "files": _files}[cfg.dataset](cfg, progress)
