"""Image-caption pair datasets and the collator that turns samples into model-ready batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vldistill.data.transforms import to_pixel_values


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


class InMemoryPairs(Dataset):
    """Pairs held in memory: uint8 images (N, H, W, 3) and one caption each."""

    def __init__(self, images: np.ndarray, captions: list[str]) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index], self.captions[index]


class PairCollator:
    """Stack images into normalized pixel values and tokenize captions padded to the batch's longest."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, samples: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*samples)
        return {"pixel_values": to_pixel_values(torch.stack(images)), **self.tokenize(list(captions))}


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
