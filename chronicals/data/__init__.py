"""The data layer: loading (JSONL, Parquet, Hugging Face datasets), row formats (text, prompt/completion, chat
messages with assistant-only loss, ShareGPT conversations, Alpaca), cached tokenization, SequencePacker, the packed
and padded collators, and the embedded defaults (a tokenizer and text that ship with the project, so the main job
runs without any download)."""

from .alpaca import alpaca_prompt
from .default_text import default_dataset, default_texts
from .default_tokenizer import default_tokenizer
from .formats import FORMATS, detect_format, tokenize_rows
from .loading import LoadedRows, load_rows
from .packed_collator import PackedCollator
from .packer import SequencePacker, best_fit_decreasing
from .padded_collator import PaddedCollator
from .prepare import PreparedData, prepare_dataset
from .sequences import FitStats, fit_sequences

__all__ = [
    "FORMATS",
    "FitStats",
    "LoadedRows",
    "PackedCollator",
    "PaddedCollator",
    "PreparedData",
    "SequencePacker",
    "alpaca_prompt",
    "best_fit_decreasing",
    "default_dataset",
    "default_texts",
    "default_tokenizer",
    "detect_format",
    "fit_sequences",
    "load_rows",
    "prepare_dataset",
    "tokenize_rows",
]
