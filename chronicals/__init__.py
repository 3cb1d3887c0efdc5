"""Chronicals: fast, lean fine-tuning of Hugging Face causal LMs on one GPU."""

__version__ = "0.1.0"

__all__ = ["apply", "apply_to_classes"]


def __getattr__(name):
    # Resolved on first use, so `import chronicals` stays cheap (no torch, no transformers).
    if name in ("apply", "apply_to_classes"):
        from chronicals.models import patch

        return getattr(patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
