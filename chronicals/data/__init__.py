"""The data layer: loading (JSONL, Parquet, Hugging Face datasets), row formats (text, prompt/completion, chat
messages with assistant-only loss), cached tokenization, SequencePacker, the packed and padded collators, and the
embedded defaults (a tokenizer and text that ship with the project, so the main job runs without any download)."""

from .default_text import default_dataset, default_texts
from .default_tokenizer import default_tokenizer
from .packed_collator import PackedCollator
from .packer import SequencePacker, best_fit_decreasing
from .padded_collator import PaddedCollator
from .sequences import FitStats, fit_sequences

__all__ = [
    "FitStats",
    "PackedCollator",
    "PaddedCollator",
    "SequencePacker",
    "best_fit_decreasing",
    "default_dataset",
    "default_texts",
    "default_tokenizer",
    "fit_sequences",
]
