"""Load any supported teacher (HF CLIP, HF SigLIP, a vldistill two-tower folder) from what a folder holds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.two_tower import TEXT_DIR, TWO_TOWER_FILE, TwoTowerDualEncoder

DualEncoder = Union[CLIPDualEncoder, SiglipDualEncoder, TwoTowerDualEncoder]

SUPPORTED_KINDS = (
    f"a vldistill two-tower folder ({TWO_TOWER_FILE})",
    "an HF CLIP model (model_type 'clip')",
    "an HF SigLIP model (model_type 'siglip')",
)


def load_dual_encoder_any(
    name_or_path: str | os.PathLike, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[DualEncoder, PreTrainedTokenizerBase]:
    """The dual-encoder adapter and tokenizer for a folder or hub id: a folder with two_tower.json is a
    `TwoTowerDualEncoder` (tokenizer from text/); otherwise the config's model_type picks
    `CLIPDualEncoder` ("clip") or `SiglipDualEncoder` ("siglip")."""
    path = Path(name_or_path)
    kwargs = {"attentions": attentions, "trust_remote_code": trust_remote_code}
    if (path / TWO_TOWER_FILE).is_file():
        model = TwoTowerDualEncoder.from_pretrained(path, **kwargs)
        return model, _required(model.tokenizer, path / TEXT_DIR)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder: it has neither {TWO_TOWER_FILE} nor config.json")
    model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
    if model_type == "clip":
        model = CLIPDualEncoder.from_pretrained(name_or_path, **kwargs)
        return model, AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if model_type == "siglip":
        model = SiglipDualEncoder.from_pretrained(name_or_path, **kwargs)
        return model, _required(model.tokenizer, name_or_path)
    raise ValueError(
        f"{name_or_path} holds a model of type {model_type!r}, which is not a supported dual encoder; "
        f"supported: {'; '.join(SUPPORTED_KINDS)}"
    )


def _required(
    tokenizer: PreTrainedTokenizerBase | None, folder: str | os.PathLike
) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise FileNotFoundError(f"{folder} holds no tokenizer (tokenizer_config.json or tokenizer.json)")
    return tokenizer
