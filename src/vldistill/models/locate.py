"""Where a model is read from, checked before any loader runs: a local folder that must hold a model, or
a Hugging Face hub id (a string like `org/name` that names no local path). Whatever is wrong with either
becomes one error line naming it, instead of a traceback from deep inside the hub client."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedTokenizerBase

CONFIG_FILE = "config.json"
# What transformers 5 loads weights from: a single file or the index of a sharded checkpoint.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelNotFoundError(FileNotFoundError):
    """No model where one was named: no such path (and not a hub id), a folder without a model in it, or
    a hub id the hub cannot serve. The message is one line naming the path or id."""


class NotAModelError(ValueError):
    """A folder whose files do not describe a model (e.g. a config.json without a model_type)."""


def local_folder(name_or_path: str | os.PathLike) -> Optional[Path]:
    """The local folder `name_or_path` names, or None when no such path exists and it reads as a hub id
    (`name` or `org/name`). Raises ModelNotFoundError for a path that is a file, or that exists nowhere
    and cannot be a hub id (e.g. `/abs/path`, `./x`, `a/b/c`)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model folder")
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise ModelNotFoundError(f"{name_or_path}: no such model folder (and not a hub id like org/name)") from None
    return None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file at `path`; NotAModelError naming the file when it is not valid UTF-8
    JSON or holds something other than an object (`what` says what it should have been)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NotAModelError(f"{path} is not valid JSON ({error}): not {what}") from None
    if not isinstance(value, dict):
        raise NotAModelError(f"{path} holds a JSON {type(value).__name__}, not {what}")
    return value


def model_config(folder: Path) -> dict[str, Any]:
    """The config.json of a local Hugging Face model folder, after checking that the folder holds a model:
    a config that parses and names its model_type, and a weights file."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} is not a model folder: it has no {CONFIG_FILE}")
    config = read_json_object(path, "a model config")
    if not isinstance(config.get("model_type"), str):
        raise NotAModelError(f"{path} names no model_type: {folder} is not a Hugging Face model folder")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelNotFoundError(f"{folder} holds no model weights ({' or '.join(WEIGHT_FILES[::2])})")
    return config


def checked_source(name_or_path: str | os.PathLike) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """(folder, its config.json) for a local model folder, checked by `model_config`; (None, None) for a
    hub id, which `hub_errors` must wrap the loading of."""
    folder = local_folder(name_or_path)
    return (folder, model_config(folder)) if folder is not None else (None, None)


@contextmanager
def hub_errors(name_or_path: str | os.PathLike, local: bool) -> Iterator[None]:
    """Run the block loading `name_or_path`; when it is a hub id (`local` False), turn the OSError the hub
    client raises (unreachable hub, unknown or private repository, missing file) into a one-line
    ModelNotFoundError naming the id."""
    try:
        yield
    except OSError as error:
        if local or isinstance(error, ModelNotFoundError):
            raise
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ModelNotFoundError(
            f"{name_or_path} is neither a local folder nor a model the Hugging Face hub can serve: {reason}"
        ) from None


def require_tokenizer(tokenizer: Optional[PreTrainedTokenizerBase], folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """`tokenizer`, or a ModelNotFoundError saying that `folder` holds none."""
    if tokenizer is None:
        raise ModelNotFoundError(f"{folder} holds no tokenizer (tokenizer_config.json or tokenizer.json)")
    return tokenizer
