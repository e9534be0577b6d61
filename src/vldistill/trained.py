"""Records of a run: what the training loop did (TrainResult) and the model it left or that was loaded
(TrainedModel: the model with its tokenizer and folder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn
from transformers import PreTrainedTokenizerBase


@dataclass
class TrainResult:
    """What a run did: steps taken, wall seconds of the loop, the logged history and how many steps were
    skipped for a NaN or infinite loss."""

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    nonfinite_steps: int = 0


@dataclass
class TrainedModel:
    """A trained dual encoder with its tokenizer, where it was saved and how its training went."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    path: Path
    result: Optional[TrainResult] = None
