"""Image-caption pair datasets and the collator that turns samples into model-ready batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vldistill.data.augment import AugmentConfig, apply_augment, sample_params


@dataclass
class PairSplit:
    """One split held in memory: uint8 images (N, H, W, 3), a caption each, optional class labels
    (indices into the bundle's class names) and optional per-sample attributes."""

    images: np.ndarray
    captions: list[str]
    labels: Optional[np.ndarray] = None
    attributes: Optional[list[dict[str, str]]] = None

    def __len__(self) -> int:
        return len(self.captions)


Sample = tuple[torch.Tensor, str, Optional[dict[str, str]]]
Preprocess = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


class InMemoryPairs(Dataset):
    """Pairs held in memory: uint8 images (N, H, W, 3), one caption each and optional per-sample
    attributes (the shapes data's, used by caption paraphrase); items are (image, caption, attributes)."""

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

    def __getitem__(self, index: int) -> Sample:
        attributes = self.attributes[index] if self.attributes is not None else None
        return self.images[index], self.captions[index], attributes


class PairCollator:
    """Collate samples into model inputs: `preprocess` makes the student's (and primary teacher's)
    unprefixed `pixel_values`/`input_ids`/`attention_mask`; each `extra[name]` makes the same keys
    prefixed `name.` for a teacher that takes other inputs (tokenizer, image size, normalization).

    With `augment` (training only; None = off), each pair is first replaced by a random view drawn
    from a generator seeded with `seed`, so every model in the batch sees the same view. Views
    depend on the order of calls, so use it in the main process (num_workers=0, as `pair_loader` does).
    """

    def __init__(
        self,
        preprocess: Preprocess,
        augment: Optional[AugmentConfig] = None,
        seed: int = 0,
        extra: Optional[Mapping[str, Preprocess]] = None,
    ) -> None:
        self.preprocess = preprocess
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self.extra = dict(extra or {})

    def _view(self, sample: Sample) -> tuple[torch.Tensor, str]:
        image, caption, attributes = sample
        if self.augment is None:
            return image, caption
        params = sample_params(self.generator, self.augment, image.shape[0], caption, attributes)
        return apply_augment(image, caption, params, attributes)

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        images, captions = zip(*(self._view(sample) for sample in samples))
        images, captions = torch.stack(images), list(captions)
        batch = self.preprocess(images, captions)
        for name, preprocess in self.extra.items():
            batch.update({f"{name}.{key}": value for key, value in preprocess(images, captions).items()})
        return batch


def pair_loader(dataset: Dataset, collate: PairCollator, batch_size: int, seed: int) -> DataLoader:
    """A shuffling loader with a seeded order that drops the last incomplete batch."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate, generator=generator)


def repeat_batches(loader: DataLoader, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield exactly `steps` batches, starting a new (reshuffled) epoch whenever one ends."""
    if len(loader) == 0:
        raise ValueError("the dataset is smaller than one batch; lower the batch size or add data")
    produced = 0
    while produced < steps:
        for batch in loader:
            yield batch
            produced += 1
            if produced == steps:
                return
