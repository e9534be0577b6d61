"""The data an experiment uses: a training set (in memory, lazily decoded or streamed), an in-memory
test split for retrieval (distinct images, each with all its captions), an optional labelled split and
prompts for zero-shot classification, and the bad-input accounting of the run."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from vldistill.binding import plain_digest
from vldistill.config import DataConfig
from vldistill.data import grammar, synthetic
from vldistill.data.classes import ImageFolderClasses, load_templates
from vldistill.data.domains import domain_classnames, filter_split
from vldistill.data.pairs import InMemoryPairs, PairSplit
from vldistill.data.quality import DataQuality
from vldistill.data.sources import open_pairs
from vldistill.data.tokenizer import words_in

# Bump when the generator's output changes, so cached teachers trained on the old data are refused.
SHAPES_VERSION = 2


@dataclass
class DataBundle:
    """Everything an experiment reads.

    train: a dataset of `PairSample`s (map-style or streaming), one per caption; None in a bundle for
    evaluation only (see `load_test_data`). val: an optional held-out one.
    test: the retrieval split, decoded in memory: distinct images, each with its captions.
    zeroshot: labelled images for zero-shot classification over `classnames` with `templates`
    (None: retrieval only).
    quality: counts of skipped bad samples (shared by every source of this bundle).
    grammar: extra words the data may produce (the shapes captions' full vocabulary).
    labelled_val: labelled images of the zero-shot classes outside the test split (the shapes val split),
    for choosing prompt templates (eval/template_search.py); None when the data has none.
    """

    name: str
    train: Optional[Dataset]
    test: PairSplit
    zeroshot: Optional[PairSplit]
    classnames: Optional[list[str]]
    templates: list[str]
    fingerprint: str
    quality: DataQuality
    val: Optional[Dataset] = None
    grammar: tuple[str, ...] = ()
    labelled_val: Optional[PairSplit] = None

    def words(self) -> set[str]:
        """Every word of the captions, prompt templates, class names and grammar: a tokenizer's vocabulary."""
        train = dataset_captions(self.train) if self.train is not None else []
        texts = [*train, *self.test.captions, *self.templates, *(self.classnames or []), *self.grammar]
        return words_in(text.replace("{}", " ") for text in texts)


def in_memory_bundle(
    train: PairSplit,
    test: PairSplit,
    val: Optional[PairSplit] = None,
    name: str = "in-memory",
    classnames: Optional[list[str]] = None,
    templates: tuple[str, ...] = (),
) -> DataBundle:
    """A bundle over splits already in memory (zero-shot on `test` when it has labels and class names);
    training and validation pairs are one per caption."""
    labelled = test.labels is not None and classnames is not None
    return DataBundle(
        name=name,
        train=train.as_pairs(),
        val=val.as_pairs() if val is not None else None,
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


def image_groups(dataset: Dataset) -> list[list[int]]:
    """The indices of a map-style pair dataset grouped by image: one group per distinct image reference
    in its `pairs` (the lazy sources' (reference, caption) list), in order of first appearance; one
    index a group for a dataset without `pairs`."""
    if not hasattr(dataset, "pairs"):
        return [[index] for index in range(len(dataset))]
    groups: dict = {}
    for index, (ref, _) in enumerate(dataset.pairs):
        groups.setdefault(ref, []).append(index)
    return list(groups.values())


def _decode_images(dataset: Dataset, desc: str, progress: bool) -> list[tuple[np.ndarray, list[str]]]:
    """(image, its captions) for each distinct image of `dataset` that decodes. A map-style dataset's
    image is decoded once, through its first pair, so its bad-input accounting counts it once."""
    if isinstance(dataset, IterableDataset):
        return [(s.image.numpy(), [s.caption]) for s in decode_all(iter(dataset), desc, progress)]
    decoded = []
    for indices in tqdm(image_groups(dataset), desc=desc, disable=not progress):
        sample = dataset[indices[0]]
        if sample is not None:
            others = [dataset.pairs[index][1] for index in indices[1:]]
            decoded.append((sample.image.numpy(), [sample.caption, *others]))
    return decoded


def decode_pairs(dataset: Dataset, desc: str, progress: bool) -> PairSplit:
    """Decode a (small) pair dataset into an in-memory split of its distinct images, each with all its
    captions (pairs sharing an image reference are one image), skipping bad images (each counted once)."""
    decoded = _decode_images(dataset, desc, progress)
    if not decoded:
        raise ValueError(f"{desc}: no usable pairs (see the data quality report)")
    counts = [len(captions) for _, captions in decoded]
    text_to_image = np.repeat(np.arange(len(decoded)), counts) if max(counts) > 1 else None
    captions = [caption for _, image_captions in decoded for caption in image_captions]
    return PairSplit(np.stack([image for image, _ in decoded]), captions, text_to_image=text_to_image)


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
    if cfg.shapes_filter:  # one domain of the shapes (data/domains.py)
        splits = {name: filter_split(split, cfg.shapes_filter, f"{name} split") for name, split in splits.items()}
    in_memory = {name: s.as_pairs() for name, s in splits.items()}
    return DataBundle(
        name="shapes",
        train=in_memory["train"],
        val=in_memory["val"],
        test=splits["test"],
        zeroshot=splits["test"],
        classnames=domain_classnames(cfg.shapes_filter) if cfg.shapes_filter else grammar.class_names(),
        templates=list(grammar.ZERO_SHOT_TEMPLATES),
        fingerprint=data_fingerprint(cfg),
        quality=DataQuality(threshold=cfg.max_bad_share),
        grammar=tuple(grammar.vocabulary()),
        labelled_val=splits["val"],
    )


def _test_and_classes(cfg: DataConfig, quality: DataQuality, train: Optional[Dataset], progress: bool) -> DataBundle:
    source = open_pairs(cfg.test, cfg.image_size, quality, cfg.test_split, cfg.test_image_root, default_split="test")
    test = decode_pairs(source, "read test pairs", progress)
    split = getattr(source, "split", None)  # the split read from a Karpathy split file
    zeroshot = classnames = None
    if cfg.classes:
        classes = ImageFolderClasses(cfg.classes, cfg.image_size, quality, cfg.classnames)
        zeroshot, classnames = decode_classes(classes, progress), classes.classnames
    return DataBundle(
        name=Path(cfg.test).stem + (f"_{split}" if split else ""),
        train=train,
        test=test,
        zeroshot=zeroshot,
        classnames=classnames,
        templates=load_templates(cfg.templates),
        fingerprint=data_fingerprint(cfg),
        quality=quality,
    )


def load_test_data(cfg: DataConfig, progress: bool = True) -> DataBundle:
    """A bundle for evaluation only (no training data; `cfg.train` is not read): the test split of
    `cfg.test` (a Karpathy split file's `test_split`, by default test) and the zero-shot classes, decoded."""
    return _test_and_classes(cfg, DataQuality(threshold=cfg.max_bad_share), None, progress)


def _files(cfg: DataConfig, progress: bool) -> DataBundle:
    quality = DataQuality(threshold=cfg.max_bad_share)
    train = open_pairs(cfg.train, cfg.image_size, quality, cfg.train_split, cfg.train_image_root, default_split="train")
    return _test_and_classes(cfg, quality, train, progress)


def load_data(cfg: DataConfig, progress: bool = True) -> DataBundle:
    """Build or open the configured dataset (test and zero-shot splits are decoded now, training
    data stays lazy or streamed)."""
    return {"shapes": _shapes, "files": _files}[cfg.dataset](cfg, progress)
