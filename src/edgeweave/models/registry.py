"""Model registry: a name (plus keyword arguments) builds a model, so a checkpoint can store the
name and rebuild the exact architecture.

Names: our own models (``cifar_resnet18``, ``small_cnn``, ...), torchvision's classification
models as ``torchvision:NAME`` (random initialisation: nothing is downloaded), and the short
aliases ``vgg11/13/16`` and ``resnet18/34/50`` for the torchvision ones.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from edgeweave.errors import EdgeweaveError

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}

TORCHVISION_ALIASES = ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50")


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator: make ``fn(num_classes=..., in_channels=..., **kw)`` buildable by ``name``."""

    def deco(fn: ModelFn) -> ModelFn:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _torchvision_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except ValueError:
        raise EdgeweaveError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
        ) from None
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one with ``in_channels`` inputs (same kernel/stride/padding)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, new)
                return
    raise EdgeweaveError("model has no Conv2d whose input channels could be changed")


def _ensure_builtin_models_loaded() -> None:
    # Importing the model files registers them (one architecture per file, like torchvision).
    from edgeweave.models import cifar_resnet, compact_blocks, small  # noqa: F401
    from edgeweave.models import multi_exit_resnet, multi_exit_small, multi_exit_torchvision  # noqa: F401
    from edgeweave.models import variants  # noqa: F401


def list_models() -> list[str]:
    _ensure_builtin_models_loaded()
    return sorted(_REGISTRY) + list(TORCHVISION_ALIASES) + ["torchvision:<name>"]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a randomly initialised model by registry name; unknown names raise EdgeweaveError."""
    _ensure_builtin_models_loaded()
    if name.startswith("torchvision:"):
        return _torchvision_model(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if name in TORCHVISION_ALIASES:
        return _torchvision_model(name, num_classes, in_channels, **kwargs)
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    raise EdgeweaveError(
        f"unknown model {name!r}; known: {', '.join(list_models())} (or a checkpoint path)"
    )
