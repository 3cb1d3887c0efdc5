"""How Hugging Face architectures are patched, and the built-in model shapes.

`apply` / `apply_to_classes` resolve lazily: importing them pulls in transformers."""

from .presets import PRESETS, build_model, preset_config
from .registry import FAMILIES, family_for

__all__ = ["FAMILIES", "PRESETS", "apply", "apply_to_classes", "build_model", "family_for", "preset_config"]


def __getattr__(name):
    if name in ("apply", "apply_to_classes", "FLAGS"):
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
