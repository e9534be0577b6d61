"""Load any supported teacher (HF CLIP, HF SigLIP, a vldistill two-tower folder) from what a folder holds."""

from __future__ import annotations

import os
from typing import Union

from transformers import AutoConfig, PreTrainedTokenizerBase

from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.common import load_tokenizer_if_present
from vldistill.models.locate import (
    CONFIG_FILE, ModelNotFoundError, NotAModelError, hub_errors, local_folder, model_config, require_tokenizer,
)
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
    `CLIPDualEncoder` ("clip") or `SiglipDualEncoder` ("siglip"). A path that is no model folder, or a hub
    id the hub cannot serve, raises a one-line ModelNotFoundError / NotAModelError naming it."""
    folder = local_folder(name_or_path)
    kwargs = {"attentions": attentions, "trust_remote_code": trust_remote_code}
    if folder is not None and (folder / TWO_TOWER_FILE).is_file():
        model = TwoTowerDualEncoder.from_pretrained(folder, **kwargs)
        return model, require_tokenizer(model.tokenizer, folder / TEXT_DIR)
    if folder is not None and not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"{folder} is not a model folder: it has neither {TWO_TOWER_FILE} nor {CONFIG_FILE}")
    with hub_errors(name_or_path, local=folder is not None):
        if folder is not None:
            model_type = model_config(folder)["model_type"]
        else:
            model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
        if model_type == "clip":
            model = CLIPDualEncoder.from_pretrained(name_or_path, **kwargs)
            tokenizer = load_tokenizer_if_present(name_or_path, trust_remote_code=trust_remote_code)
            return model, require_tokenizer(tokenizer, name_or_path)
        if model_type == "siglip":
            model = SiglipDualEncoder.from_pretrained(name_or_path, **kwargs)
            return model, require_tokenizer(model.tokenizer, name_or_path)
    raise NotAModelError(
        f"{name_or_path} holds a model of type {model_type!r}, which is not a supported dual encoder; "
        f"supported: {'; '.join(SUPPORTED_KINDS)}"
    )
