"""The data an experiment uses: train/val/test pair splits plus zero-shot classes and prompts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from vldistill.config import DataConfig
from vldistill.data import synthetic
from vldistill.data.manifest import manifest_classnames, read_manifest
from vldistill.data.pairs import PairSplit
from vldistill.data.tokenizer import words_in

# Bump when the generator's output changes, so cached teachers trained on the old data are refused.
SHAPES_VERSION = 2
MANIFEST_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


@dataclass
class DataBundle:
    """Splits with images and captions; class names and prompt templates for zero-shot (None: no
    class labels, so only retrieval is evaluated)."""

    name: str
    train: PairSplit
    test: PairSplit
    classnames: Optional[list[str]]
    templates: list[str]
    fingerprint: str
    val: Optional[PairSplit] = None
    grammar: tuple[str, ...] = ()

    def words(self) -> set[str]:
        """Every word of the captions, prompt templates, class names and the data's caption grammar
        (words augmentation may produce): a tokenizer's vocabulary."""
        texts = [*self.train.captions, *self.test.captions, *self.templates, *(self.classnames or []), *self.grammar]
        return words_in(text.replace("{}", " ") for text in texts)


def data_fingerprint(cfg: DataConfig) -> str:
    """A short hash identifying the data a config produces (settings, manifest contents, generator version)."""
    payload = {"config": asdict(cfg), "shapes_version": SHAPES_VERSION}
    for key in ("train_manifest", "test_manifest"):
        if getattr(cfg, key):
            payload[key] = hashlib.sha256(Path(getattr(cfg, key)).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _shapes(cfg: DataConfig, progress: bool) -> DataBundle:
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    splits = {
        split: synthetic.make_split(split, sizes[split], seed=cfg.seed, image_size=cfg.image_size)
        for split in tqdm(sizes, desc="generate data", disable=not progress)
    }
    return DataBundle(
        name="shapes",
        classnames=synthetic.class_names(),
        templates=list(synthetic.ZERO_SHOT_TEMPLATES),
        fingerprint=data_fingerprint(cfg),
        grammar=tuple(synthetic.vocabulary()),
        **splits,
    )


def _manifest(cfg: DataConfig, progress: bool) -> DataBundle:
    classnames = manifest_classnames(cfg.test_manifest)
    return DataBundle(
        name=Path(cfg.test_manifest).stem,
        train=read_manifest(cfg.train_manifest, cfg.image_size, progress=progress),
        test=read_manifest(cfg.test_manifest, cfg.image_size, classnames, progress=progress),
        classnames=classnames,
        templates=list(MANIFEST_TEMPLATES),
        fingerprint=data_fingerprint(cfg),
    )


def load_data(cfg: DataConfig, progress: bool = True) -> DataBundle:
    """Build or read the configured dataset's splits."""
    return {"shapes": _shapes, "manifest": _manifest}[cfg.dataset](cfg, progress)
