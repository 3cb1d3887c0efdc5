"""How Hugging Face architectures are patched, and the built-in model shapes."""

from .presets import PRESETS, build_model, preset_config

__all__ = ["PRESETS", "build_model", "preset_config"]
