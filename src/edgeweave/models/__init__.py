"""Model zoo. ``build_model(name, num_classes, in_channels)``; see registry for the names."""

from edgeweave.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
