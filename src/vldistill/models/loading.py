"""Load any supported dual encoder from a folder or hub id: its model_type picks the adapter registered for
it in `models.adapters` (as transformers' AutoModel picks a class).

The adapter modules are imported here so that they register themselves: a new model family is one
adapter module with a `@register_adapter(...)` loader, named in the import below.
"""

from __future__ import annotations

import os

from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Importing an adapter module registers its family.
from vldistill.models import adapters, blip, clip, onnx_pair, prompted, quantized, siglip, two_tower  # noqa: F401
from vldistill.models.adapters import Adapter, describe_adapters
from vldistill.models.contract import DualEncoder
from vldistill.models.locate import CONFIG_FILE, ModelNotFoundError, NotAModelError, hub_errors, local_folder, model_config


def supported_model_types() -> list[str]:
    """The model types `load_dual_encoder_any` can load, sorted."""
    return adapters.ADAPTERS.names()


def model_type_of(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False) -> str:
    """The model type at a folder or hub id: a registered family's marker file in the folder (e.g.
    two_tower.json), else the model_type of its config.json (checked to hold a model, see `model_config`)."""
    folder = local_folder(name_or_path)
    if folder is None:
        with hub_errors(name_or_path, local=False):
            config, _ = PretrainedConfig.get_config_dict(name_or_path, trust_remote_code=trust_remote_code)
        if not isinstance(config.get("model_type"), str):
            raise NotAModelError(f"{name_or_path}'s {CONFIG_FILE} names no model_type")
        return config["model_type"]
    families = [adapters.ADAPTERS.get(name) for name in adapters.ADAPTERS.names()]
    markers = {family.marker: family.model_type for family in families if family.marker is not None}
    for marker, name in markers.items():
        if (folder / marker).is_file():
            return name
    if not (folder / CONFIG_FILE).is_file():
        kinds = " nor ".join([*markers, CONFIG_FILE])
        raise ModelNotFoundError(f"{folder} is not a model folder: it has neither {kinds}")
    return model_config(folder)["model_type"]


def adapter_for(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False) -> Adapter:
    """The registered adapter for the model at a folder or hub id; an unknown model type raises a one-line
    NotAModelError listing the supported ones."""
    model_type = model_type_of(name_or_path, trust_remote_code=trust_remote_code)
    if model_type not in adapters.ADAPTERS:
        raise NotAModelError(
            f"{name_or_path} holds a model of type {model_type!r}, which is not a supported dual encoder; "
            f"supported model types: {describe_adapters()}"
        )
    return adapters.ADAPTERS.get(model_type)


def load_dual_encoder_any(
    name_or_path: str | os.PathLike, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[DualEncoder, PreTrainedTokenizerBase]:
    """The dual-encoder adapter and tokenizer for a folder or hub id, loaded by the adapter registered for
    its model type (see `model_type_of`). A path that is no model folder, a hub id the hub cannot serve,
    or an unsupported model type raises a one-line ModelNotFoundError / NotAModelError naming it."""
    adapter = adapter_for(name_or_path, trust_remote_code=trust_remote_code)
    with hub_errors(name_or_path, local=local_folder(name_or_path) is not None):
        return adapter.load(name_or_path, attentions=attentions, trust_remote_code=trust_remote_code)
