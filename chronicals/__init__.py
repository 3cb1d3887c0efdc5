"""Chronicals: fast, lean fine-tuning of Hugging Face causal LMs on one GPU."""

__version__ = "0.1.0"
