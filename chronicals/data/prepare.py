"""prepare_dataset: a dataset source -> rows ready for a DataLoader, and the collator that batches them.

Everything that can be wrong with the data (an empty dataset, missing columns, wrong types, a bad chat row,
every sequence over the limit, no label token anywhere) is found here, before the first training step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import token_cache
from ._checks import check_int, check_padding_token_id
from .formats import detect_format, tokenize_rows
from .loading import load_rows
from .packed_collator import PackedCollator
from .packer import SequencePacker
from .padded_collator import PaddedCollator
from .sequences import fit_sequences


@dataclass
class PreparedData:
    rows: list[dict[str, list[int]]]  # packed rows, or fitted examples when packing is off
    collator: PackedCollator | PaddedCollator
    format: str
    stats: dict[str, Any] = field(default_factory=dict)  # sequences, tokens, rows, efficiency, cut/dropped counts
    cache_file: Path | None = None
    cache_hit: bool = False


def prepare_dataset(
    source: Any,
    tokenizer: Any,
    *,
    max_seq_length: int = 2048,
    format: str = "auto",
    packing: bool = True,
    overflow: str = "truncate",
    split: str = "train",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    pad_to_multiple_of: int | None = None,
    ignore_index: int = -100,
) -> PreparedData:
    """Load `source` (see `load_rows`), tokenize it in `format` ("auto", "text", "prompt_completion", "messages",
    "sharegpt", "alpaca", or "tokenized" for rows that already hold `input_ids` and optionally `labels`), reusing
    the tokenization cache under `cache_dir` (default ~/.cache/chronicals), then fit it to `max_seq_length` and,
    with `packing` (the default), pack it with `SequencePacker`. The collator matches: `PackedCollator` for
    packed rows, `PaddedCollator` padding to the longest example otherwise."""
    check_int("max_seq_length", max_seq_length, minimum=2)
    loaded = load_rows(source, split)
    if len(loaded.rows) == 0:
        raise ValueError(f"the dataset ({loaded.description}) is empty: there are no rows to train on")
    fmt = detect_format(loaded.columns, format)
    pad_id = check_padding_token_id(padding_id(tokenizer))  # before tokenizing: a missing one fails at once
    examples, cache_file, cache_hit = _tokenized(loaded, tokenizer, fmt, cache_dir, use_cache, ignore_index)
    if packing:
        packer = SequencePacker(max_seq_length, pad_id, overflow, ignore_index)
        rows = packer.pack(examples)
        stats = packer.summary()
        collator = PackedCollator(pad_id, pad_to_multiple_of, ignore_index)
    else:
        sequences, fit = fit_sequences(examples, max_seq_length, overflow, ignore_index)
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in sequences]
        # No efficiency here: padding waste depends on how the trainer batches rows, so the collator's batches
        # (num_label_tokens over their size) are where it is measured.
        stats = {**vars(fit), "num_rows": len(rows), "packed_tokens": sum(len(ids) for ids, _ in sequences)}
        collator = PaddedCollator(pad_id, None, pad_to_multiple_of, ignore_index)
    stats["label_tokens"] = sum(len(row["labels"]) - row["labels"].count(ignore_index) for row in rows)
    return PreparedData(rows, collator, fmt, stats, cache_file, cache_hit)


def padding_id(tokenizer) -> int | None:
    """The id to pad with. It is never trained on (padding labels are ignored), so a tokenizer without a pad
    token, as many base models' are, pads with eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _tokenized(loaded, tokenizer, fmt, cache_dir, use_cache, ignore_index):
    if not use_cache or fmt == "tokenized":
        return tokenize_rows(loaded.rows, tokenizer, fmt, ignore_index, loaded.lines), None, False
    key = token_cache.cache_key(loaded.fingerprint, tokenizer, fmt, ignore_index)
    path = token_cache.cache_path(cache_dir or token_cache.default_cache_dir(), key)
    examples = token_cache.load(path)
    if examples is not None:
        return examples, path, True
    examples = tokenize_rows(loaded.rows, tokenizer, fmt, ignore_index, loaded.lines)
    try:
        token_cache.save(path, examples)
    except OSError as e:  # a read-only home, a full disk: the cache only saves time, so the run goes on without it
        warnings.warn(f"the tokenization cache could not be written to {path} ({e}); going on without it: set "
                      "cache_dir (or CHRONICALS_CACHE) to a writable directory, or pass use_cache=False", stacklevel=3)
        return examples, None, False
    return examples, path, False
