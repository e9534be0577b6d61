"""Zero-shot classification sets: a folder per class of images, decoded lazily, plus prompt templates."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch.utils.data import Dataset

from vldistill.data.images import decode_counted
from vldistill.data.quality import DataQuality
from vldistill.data.sources import IMAGE_EXTENSIONS, first_in_pass
from vldistill.data.templates import expand_templates

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


class ClassSample(NamedTuple):
    """One labelled image: uint8 (H, W, 3), its class index into `classnames`, its dataset index."""

    image: torch.Tensor
    label: int
    index: int


class ImageFolderClasses(Dataset):
    """Images under `root/<class folder>/` (any depth; see IMAGE_EXTENSIONS), classes in sorted folder
    order. Class names are the folder names with underscores as spaces, or the values of
    `classnames_json` ({folder: name}, which must cover every folder). Items are `ClassSample`s, or
    None for an image that cannot be used (see images.decode_image; recorded in `quality` once per pass, as in
    vldistill.data.sources)."""

    def __init__(
        self, root: Union[str, Path], image_size: int, quality: DataQuality,
        classnames_json: Optional[Union[str, Path]] = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"class folder root {self.root} does not exist")
        self.image_size = image_size
        self.quality = quality
        self.folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.folders:
            raise ValueError(f"{self.root} has no class folders")
        self.classnames = self._names(classnames_json)
        self.items = [
            (path, label)
            for label, folder in enumerate(self.folders)
            for path in sorted((self.root / folder).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.items:
            raise ValueError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        self._counted: set[int] = set()

    def _names(self, classnames_json: Optional[Union[str, Path]]) -> list[str]:
        if classnames_json is None:
            return [folder.replace("_", " ") for folder in self.folders]
        path = Path(classnames_json)
        if not path.is_file():
            raise FileNotFoundError(f"class names file {path} does not exist")
        try:
            mapping = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno} is not valid JSON ({error.msg})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise ValueError(f"{path} must map each class folder to a non-empty class name")
        missing = [folder for folder in self.folders if folder not in mapping]
        if missing:
            raise ValueError(f"{path} has no class name for folder(s) {', '.join(missing)}")
        return [mapping[folder].strip() for folder in self.folders]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Optional[ClassSample]:
        index = int(index)
        path, label = self.items[index]
        if len(self._counted) == len(self.items):
            self._counted.clear()  # a new pass (see vldistill.data.sources)
        image = decode_counted(path, self.image_size, self.quality, first_in_pass(self._counted, index), str(path))
        return None if image is None else ClassSample(image, label, index)


def load_templates(path: Optional[Union[str, Path]] = None) -> list[str]:
    """Prompt templates, one per non-empty line of `path`, each with `{}` for the class name;
    DEFAULT_TEMPLATES when `path` is None."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"templates file {path} does not exist")
    templates = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if "{}" not in line:
            raise ValueError(f"{path}:{number}: template {line.strip()!r} has no '{{}}' for the class name")
        templates.append(line.strip())
    if not templates:
        raise ValueError(f"templates file {path} has no templates")
    return templates


def class_name_templates(
    path: Optional[Union[str, Path]], eval_entries: Optional[Sequence[str]], data_templates: Optional[Sequence[str]]
) -> list[str]:
    """The templates a command embeds class names with: the file `path` (`load_templates`), else the templates the
    `eval.templates` entries name (`expand_templates`: templates, `library:<domain>`, `file:<path>`), else the
    data's, else DEFAULT_TEMPLATES."""
    if path is not None:
        return load_templates(path)
    if eval_entries:
        return expand_templates(eval_entries)
    return list(data_templates or DEFAULT_TEMPLATES)
