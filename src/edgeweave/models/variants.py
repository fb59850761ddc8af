"""A deployment's variants of one task in one model: e.g. the full multi-exit network, its
distilled compact student, a pruned copy. Each variant is an ordinary registered model; the set
is stored, shipped to followers and hashed as one checkpoint, so a cluster holds every variant at
once and the on-demand policy (``runtime.variants``) can answer each request with whichever
(variant, operating point) serves it best.

    variant_set(variants=[{"name": "full", "model": "multi_exit_tv_resnet", "kwargs": {...}},
                          {"name": "student", "model": "compact", "kwargs": {"base": ...}}])

A distributed plan names the piece it runs as ``{"variant": NAME, ...}`` (``exit_part``):
leader and followers cut the same variant, and the same segment of it, out of the set.
``forward(x)`` is the first variant's, so the set is also an ordinary classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from edgeweave.errors import EdgeweaveError
from edgeweave.models.registry import build_model, register_model


class VariantSet(nn.Module):
    def __init__(self, variants: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not variants:
            raise EdgeweaveError("a variant set needs at least one variant")
        self.variants = nn.ModuleDict(dict(variants))

    @property
    def names(self) -> list[str]:
        return list(self.variants.keys())

    def variant(self, name: str) -> nn.Module:
        if name not in self.variants:
            raise EdgeweaveError(f"no variant named {name!r}; this set holds {', '.join(self.names)}")
        return self.variants[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.variants[self.names[0]](x)


def variant_entry(name: str, model: str, **kwargs: Any) -> dict[str, Any]:
    """One entry of ``variant_set(variants=...)``: the registry name and its keyword arguments
    (``num_classes``/``in_channels`` come from the set)."""
    return {"name": name, "model": model, "kwargs": kwargs}


@register_model("variant_set")
def variant_set(num_classes: int = 10, in_channels: int = 3, variants: Sequence[Mapping[str, Any]] = ()) -> VariantSet:
    built: dict[str, nn.Module] = {}
    for v in variants:
        name = str(v["name"])
        if not name.isidentifier() or name in built:
            raise EdgeweaveError(f"variant names must be distinct identifiers, got {name!r}")
        built[name] = build_model(str(v["model"]), num_classes=num_classes, in_channels=in_channels,
                                  **dict(v.get("kwargs", {})))
    return VariantSet(built)


__all__ = ["VariantSet", "variant_entry", "variant_set"]
