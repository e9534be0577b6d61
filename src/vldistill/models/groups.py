"""Named parameter groups of a model (what staged training's `trainable` selectors name): a map from a group
name (`vision`, `text`, `vision.layers.0`, ...) to the prefixes of the parameter names it holds. Each adapter
builds its own map with `tower_groups` (its `parameter_groups()` method), so callers never read a family's
module names themselves."""

from __future__ import annotations

from typing import Sequence

ParameterGroups = dict[str, tuple[str, ...]]


def tower_groups(tower: str, prefixes: Sequence[str], layers: str, count: int) -> ParameterGroups:
    """The groups of one tower: `tower` (every parameter under `prefixes`) and `tower.layers.N` for each of its
    `count` encoder layers (the parameters under `layers`.N)."""
    groups: ParameterGroups = {tower: tuple(prefixes)}
    for index in range(count):
        groups[f"{tower}.layers.{index}"] = (f"{layers}.{index}.",)
    return groups


def nested_groups(attribute: str, groups: ParameterGroups) -> ParameterGroups:
    """The `groups` of a model held as `attribute` of a wrapper (e.g. a prompted model's base), as the
    wrapper's own: every prefix under `attribute`."""
    return {name: tuple(f"{attribute}.{prefix}" for prefix in prefixes) for name, prefixes in groups.items()}
