"""The table of model families vldistill can load, keyed by `model_type` (as transformers' AutoModel maps
a config's model_type to a class). Each adapter module registers a loader for its family:

    @register_adapter("clip", "an HF CLIPModel")
    def load_clip(name_or_path, *, attentions=False, trust_remote_code=False): ...

A loader takes a local folder or hub id and returns (dual encoder, tokenizer), the model satisfying
`models.contract.DualEncoder`; `models.loading` reads a folder's model_type and calls the loader
registered for it. A family whose folders have no
`config.json` (the vldistill two-tower folder) names a `marker` file that identifies its folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from transformers import PreTrainedTokenizerBase

from vldistill.models.contract import DualEncoder
from vldistill.registry import Registry

Loader = Callable[..., tuple[DualEncoder, PreTrainedTokenizerBase]]


@dataclass(frozen=True)
class Adapter:
    """One model family: its model_type, what it is (for error messages), the loader
    `load(name_or_path, *, attentions, trust_remote_code) -> (model, tokenizer)`, and the file that marks
    its local folders when they have no config.json (None: the folder's config.json names the type)."""

    model_type: str
    description: str
    load: Loader
    marker: Optional[str] = None


ADAPTERS: Registry[Adapter] = Registry("model type")


def register_adapter(model_type: str, description: str, *, marker: Optional[str] = None) -> Callable[[Loader], Loader]:
    """Decorator: register the decorated loader as the adapter for `model_type` (unique)."""

    def add(load: Loader) -> Loader:
        ADAPTERS.register(model_type)(Adapter(model_type, description, load, marker))
        return load

    return add


def describe_adapters() -> str:
    """'clip (an HF CLIPModel), siglip (...)': every registered model type with what it is, sorted."""
    return ", ".join(f"{name} ({ADAPTERS.get(name).description})" for name in ADAPTERS.names())
