"""The data an experiment uses: train/val/test pair splits plus zero-shot classes and prompts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tqdm.auto import tqdm

from vldistill.config import DataConfig
from vldistill.data import synthetic

# Bump when the generator's output changes, so cached teachers trained on the old data are refused.
SHAPES_VERSION = 1


@dataclass
class DataBundle:
    """Splits with images, captions and class labels; class names and prompt templates for zero-shot."""

    name: str
    train: synthetic.ShapesSplit
    val: synthetic.ShapesSplit
    test: synthetic.ShapesSplit
    classnames: list[str]
    templates: list[str]
    fingerprint: str


def data_fingerprint(cfg: DataConfig) -> str:
    """A short hash identifying the data a config produces (settings plus generator version)."""
    payload = json.dumps({"config": cfg.__dict__, "shapes_version": SHAPES_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_data(cfg: DataConfig, progress: bool = True) -> DataBundle:
    """Build the configured dataset's splits (the embedded shapes set is drawn from `cfg.seed`)."""
    splits = {}
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    for split in tqdm(sizes, desc="generate data", disable=not progress):
        splits[split] = synthetic.make_split(split, sizes[split], seed=cfg.seed, image_size=cfg.image_size)
    return DataBundle(
        name=cfg.dataset,
        classnames=synthetic.class_names(),
        templates=list(synthetic.ZERO_SHOT_TEMPLATES),
        fingerprint=data_fingerprint(cfg),
        **splits,
    )
