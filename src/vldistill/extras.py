"""Optional dependencies: a library that only some commands need (onnxruntime for ONNX export and evaluation)
is imported when first used, and its absence is one error line saying which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names it and the pip extra that installs it."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import and return `module`, or raise MissingExtraError saying that `needed_for` needs it and
    `pip install 'vldistill[<extra>]'` installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{needed_for} needs {module.split('.')[0]}, which is not installed ({error}): "
            f"pip install 'vldistill[{extra}]'"
        ) from None
