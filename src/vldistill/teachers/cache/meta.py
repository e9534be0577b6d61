"""What a teacher cache was made from, written into its manifest and checked when it is read: the
teachers' identity, the data, the transform settings that make each view, and the vldistill version.

Built and read the same way (`cache_meta`), so a cache made with other teacher weights, data or
augmentation is refused with one line per differing key.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill import __version__
from vldistill.binding import plain_digest
from vldistill.config import ExperimentConfig
from vldistill.data.bundle import DataBundle
from vldistill.models.contract import DualEncoder
from vldistill.models.signals import cached_per_model


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the model's state_dict in sorted key order: each key, dtype, shape and tensor bytes."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    return plain_digest(payload, length=64)


def per_model_signals(model: DualEncoder) -> dict[str, Optional[float]]:
    """The teacher's constant per-model signals the cache keeps (models/signals.py `cache_meta`): its
    exponentiated logit scale and, for SigLIP, its logit bias (None otherwise)."""
    return {kind.name: kind.cache_meta(model) for kind in cached_per_model()}


def teacher_identity(model: DualEncoder, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Who a teacher is: class, architecture, weights' sha256, tokenizer's sha256 and logit settings."""
    return {
        "class": type(model).__name__,
        "config": model.architecture_config(),
        "sha256": state_dict_sha256(model),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        **per_model_signals(model),
    }


ITM_SAMPLING = "blip-hard-negatives-per-view-build-batch-v1"  # how cached ITM negatives are drawn (see build.py)


def caches_itm(teachers: Sequence[Any]) -> bool:
    """Whether a cache of `teachers` (TrainedModels) stores ITM: a lone teacher that scores image-text matching
    (BLIP retrieval). An ensemble's members would each draw their own negatives, so none is stored for one."""
    return len(teachers) == 1 and bool(getattr(teachers[0].model, "scores_itm", False))


def itm_settings(model: Any) -> dict[str, Any]:
    """What a cached teacher's ITM negatives depend on besides its weights and the data: the seed of its
    negative sampling and the sampling scheme."""
    return {"seed": int(model.itm_seed), "sampling": ITM_SAMPLING}


def cache_meta(cfg: ExperimentConfig, data: DataBundle, teachers: Sequence[Any]) -> dict[str, Any]:
    """The manifest meta of a cache of `teachers` (TrainedModels: the primary, then the ensemble's) on
    `data`'s training split, with the views `cfg` makes. bf16 teachers (`teacher.precision`) are recorded;
    fp32 ones, the default, are not, so caches made before the setting existed still match; so are the ITM
    settings (`itm_settings`) of a cache that stores ITM (`caches_itm`)."""
    data_settings = {k: v for k, v in asdict(cfg.data).items() if k != "augment"}
    precision = {"teacher_precision": cfg.teacher.precision} if cfg.teacher.precision != "fp32" else {}
    itm = {"itm": itm_settings(teachers[0].model)} if caches_itm(teachers) else {}
    return {
        **precision,
        **itm,
        "teachers": {str(k): teacher_identity(t.model, t.tokenizer) for k, t in enumerate(teachers)},
        "data": {"fingerprint": data.fingerprint, "settings": data_settings, "train_pairs": len(data.train)},
        "transform": {
            "augment": asdict(cfg.data.augment),
            "input_specs": {str(k): asdict(t.model.input_spec) for k, t in enumerate(teachers)},
            "views": cfg.cache.views,
            "seed": cfg.seed,
        },
        "vldistill": __version__,
    }
