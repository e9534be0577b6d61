"""Domains of the embedded shapes data (`data.shapes_filter`): the images whose attributes take the listed
values, e.g. `{shape: [circle, square, triangle]}` for one domain and `{shape: [cross, diamond]}` for another.
Continual re-distillation (vldistill/continual.py) distils a student on one domain, then on the next.

A domain keeps the drawn images that match (of `train_size` drawn, about the matching share remains) and its
zero-shot classes are the size x colour x shape classes it can hold, so accuracy on a domain is classification
among that domain's classes only. The filter is a mapping attribute -> non-empty list of its values (size,
colour, shape, position; see data/grammar.py); an attribute not named is unrestricted."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from vldistill.data.grammar import COLOURS, POSITIONS, SHAPES, SIZES, class_names
from vldistill.data.pairs import PairSplit

DOMAIN_VALUES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS),
}


def check_shapes_filter(value: Any, where: str) -> None:
    """Raise ValueError naming `where`.<attribute> unless `value` maps known attributes to non-empty lists of
    their known values."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping attribute -> list of values, got {value!r}")
    for attribute, values in value.items():
        if attribute not in DOMAIN_VALUES:
            raise ValueError(f"{where}: unknown attribute {attribute!r}; known: {', '.join(DOMAIN_VALUES)}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{where}.{attribute} must be a non-empty list of values, got {values!r}")
        unknown = [v for v in values if v not in DOMAIN_VALUES[attribute]]
        if unknown:
            raise ValueError(
                f"{where}.{attribute}: unknown value {unknown[0]!r}; known: {', '.join(DOMAIN_VALUES[attribute])}"
            )


def matches(attrs: Mapping[str, str], shapes_filter: Mapping[str, list[str]]) -> bool:
    """Whether an image with attributes `attrs` is in the domain `shapes_filter`."""
    return all(attrs[attribute] in values for attribute, values in shapes_filter.items())


def domain_classnames(shapes_filter: Mapping[str, list[str]]) -> list[str]:
    """The zero-shot classes ("size colour shape") a domain can hold, in the order of `grammar.class_names`."""
    kept = []
    for name in class_names():
        size, colour, shape = name.split(" ")
        if matches({"size": size, "colour": colour, "shape": shape, "position": ""},
                   {k: v for k, v in shapes_filter.items() if k != "position"}):
            kept.append(name)
    return kept


def filter_split(split: PairSplit, shapes_filter: Mapping[str, list[str]], what: str = "split") -> PairSplit:
    """The images of `split` (one caption each, with attributes) in the domain, their labels renumbered to
    `domain_classnames(shapes_filter)`. ValueError when none is left."""
    if split.attributes is None or split.text_to_image is not None:
        raise ValueError(f"{what}: a domain filter needs one caption per image and the images' attributes")
    keep = [i for i, attrs in enumerate(split.attributes) if matches(attrs, shapes_filter)]
    if not keep:
        raise ValueError(f"data.shapes_filter leaves no image of the {what} ({len(split)} drawn): draw more or widen it")
    labels = None
    if split.labels is not None:
        full = class_names()
        renumber = {full.index(name): index for index, name in enumerate(domain_classnames(shapes_filter))}
        labels = np.array([renumber[int(split.labels[i])] for i in keep], dtype=np.int64)
    return dataclasses.replace(
        split,
        images=split.images[keep],
        captions=[split.captions[i] for i in keep],
        labels=labels,
        attributes=[split.attributes[i] for i in keep],
        references=[split.references[i] for i in keep] if split.references is not None else None,
    )
