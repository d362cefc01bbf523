"""Model families as a registry: a new family is one module with a `Family` subclass and one entry here.

Loading (by pipeline class), the branch cache and MAC counting (by transformer class), sampling, training,
quality and request validation read a family from `FAMILIES`; none of them tests a family's name.
Torch-free: `validation` imports it for the gateway.
"""

from __future__ import annotations

from typing import Any

from .base import Conditioning, Family
from .dit import DiTFamily
from .pixart import PixArtFamily

__all__ = ["FAMILIES", "Conditioning", "Family", "family_of", "pipeline_family"]

FAMILIES: dict[str, Family] = {family.name: family for family in (DiTFamily(), PixArtFamily())}


def family_of(transformer: Any) -> Family:
    """The family whose transformer class `transformer` is (or derives from)."""
    classes = {cls.__name__ for cls in type(transformer).__mro__}
    for family in FAMILIES.values():
        if classes.intersection(family.transformers):
            return family
    known = ", ".join(name for family in FAMILIES.values() for name in family.transformers)
    raise TypeError(f"{type(transformer).__name__} belongs to no model family; supported: {known}")


def pipeline_family(class_name: str) -> Family | None:
    """The family that loads diffusers pipelines of class `class_name`, if any."""
    return next((family for family in FAMILIES.values() if class_name in family.pipelines), None)
