"""Tokenized sequences as the packer and collators see them, and how they are fitted to `max_seq_length`.

A sequence is a pair of equal-length int lists (input_ids, labels). Labels follow Hugging Face's convention: aligned
with input_ids, the model (or trainer) shifts them, and `ignore_index` marks tokens that carry no loss. The first
label of every sequence is set to `ignore_index` so that, once sequences sit side by side in a packed row, no token
is ever trained to predict the first token of the next sequence.
"""

from __future__ import annotations

import array
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._checks import check_choice, check_int

OVERFLOW_MODES = ("truncate", "split")

Tokens = list[int]


@dataclass
class FitStats:
    """What fitting did to the input, in sequences and tokens."""

    num_sequences: int = 0  # input sequences
    original_tokens: int = 0  # input tokens
    truncated_sequences: int = 0
    truncated_tokens: int = 0  # tokens cut off and dropped by overflow="truncate"
    split_sequences: int = 0  # input sequences cut into several by overflow="split"
    dropped_sequences: int = 0  # sequences with no label token left (nothing to learn from)
    dropped_tokens: int = 0
    padding_tokens: int = 0  # tokens an item's attention_mask marks as padding (0), removed before fitting


def as_sequence(item: Any, index: int, ignore_index: int = -100,
                stats: FitStats | None = None) -> tuple[Tokens, Tokens]:
    """One dataset item -> (input_ids, labels). An item is a list of token ids, or a mapping with `input_ids` and
    optionally `labels` (defaulting to the input_ids: every token is a target) and `attention_mask`, whose 0s mark
    padding: those tokens are removed (counted in `stats.padding_tokens`), as packing and the collators pad anew."""
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise KeyError(f"example {index} has no 'input_ids' (keys: {sorted(item)}); tokenize the dataset first")
        input_ids = _token_list(item["input_ids"], f"example {index} input_ids")
        labels = item.get("labels")
        labels = list(input_ids) if labels is None else _token_list(labels, f"example {index} labels", ignore_index)
        if len(labels) != len(input_ids):
            raise ValueError(
                f"example {index}: labels has {len(labels)} entries but input_ids has {len(input_ids)}; "
                "they must be aligned one to one"
            )
        if item.get("attention_mask") is not None:
            input_ids, labels = _unpadded(item["attention_mask"], input_ids, labels, index, stats)
    else:
        input_ids = _token_list(item, f"example {index}")
        labels = list(input_ids)
    if not input_ids:
        raise ValueError(f"example {index} is a zero-length sequence; remove empty examples before packing")
    return input_ids, labels


def _unpadded(mask: Any, input_ids: Tokens, labels: Tokens, index: int,
              stats: FitStats | None) -> tuple[Tokens, Tokens]:
    # Rows tokenized with padding (padding="max_length", labels copied from input_ids) would otherwise train on their
    # padding, and in a packed row let real tokens attend to it.
    mask = mask.tolist() if hasattr(mask, "tolist") else mask
    if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence) or len(mask) != len(input_ids):
        size = len(mask) if isinstance(mask, Sequence) else type(mask).__name__
        raise ValueError(f"example {index}: attention_mask must be a list of 0/1 as long as input_ids "
                         f"({len(input_ids)}), got {size}")
    if not set(mask) <= {0, 1}:
        raise ValueError(f"example {index}: attention_mask must hold only 0 (padding) and 1, found "
                         f"{sorted(set(mask) - {0, 1}, key=repr)[:3]}")
    if 0 not in mask:
        return input_ids, labels
    if stats is not None:
        stats.padding_tokens += mask.count(0)
    keep = [i for i, m in enumerate(mask) if m]
    return [input_ids[i] for i in keep], [labels[i] for i in keep]


def _token_list(value: Any, what: str, ignore_index: int | None = None) -> Tokens:
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a list of int token ids, got {type(value).__name__}")
    value = list(value)
    # array.array converts in C: "Q" (unsigned) rejects non-ints and negatives in one pass; labels may also hold
    # ignore_index, so they get the signed "q" and a min() over the rest. It takes bools (an int subclass) too, so
    # their type is looked for first (a bool tensor or mask passed as token ids). The slow scan only runs to name the
    # culprit.
    try:
        if bool in set(map(type, value)):
            raise TypeError
        if ignore_index is None:
            array.array("Q", value)
        elif array.array("q", value) and min(value) < 0:
            distinct = set(value)
            distinct.discard(ignore_index)
            if distinct and min(distinct) < 0:
                raise OverflowError
    except (TypeError, OverflowError):
        bad = next(t for t in value if type(t) is bool or not hasattr(t, "__index__")
                   or (t != ignore_index and not 0 <= t < 1 << 63))
        allowed = "non-negative int token ids" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise TypeError(f"{what} must hold {allowed}, found {bad!r} ({type(bad).__name__})") from None
    return value


def fit_sequences(
    dataset: Iterable[Any], max_seq_length: int, overflow: str = "truncate", ignore_index: int = -100
) -> tuple[list[tuple[Tokens, Tokens]], FitStats]:
    """Validate every item, cut sequences longer than `max_seq_length` as `overflow` says, mask each sequence's first
    label, and drop sequences left with no label token. Warns once with the counts when anything was cut or dropped."""
    check_int("max_seq_length", max_seq_length, minimum=2)
    check_choice("overflow", overflow, OVERFLOW_MODES)
    check_int("ignore_index", ignore_index)
    stats = FitStats()
    fitted: list[tuple[Tokens, Tokens]] = []
    for index, item in enumerate(dataset):
        input_ids, labels = as_sequence(item, index, ignore_index, stats)
        stats.num_sequences += 1
        stats.original_tokens += len(input_ids)
        if len(input_ids) <= max_seq_length:
            pieces = [(input_ids, labels)]
        elif overflow == "truncate":
            stats.truncated_sequences += 1
            stats.truncated_tokens += len(input_ids) - max_seq_length
            pieces = [(input_ids[:max_seq_length], labels[:max_seq_length])]
        else:
            stats.split_sequences += 1
            pieces = [
                (input_ids[s : s + max_seq_length], labels[s : s + max_seq_length])
                for s in range(0, len(input_ids), max_seq_length)
            ]
        for ids, labs in pieces:
            labs = [ignore_index, *labs[1:]]
            if labs.count(ignore_index) == len(labs):
                stats.dropped_sequences += 1
                stats.dropped_tokens += len(ids)
                continue
            fitted.append((ids, labs))
    _check_and_warn(stats, len(fitted), max_seq_length, overflow)
    return fitted, stats


def _check_and_warn(stats: FitStats, kept: int, max_seq_length: int, overflow: str) -> None:
    if stats.num_sequences == 0:
        raise ValueError("the dataset is empty: there are no examples to train on")
    if overflow == "truncate" and stats.truncated_sequences == stats.num_sequences:
        raise ValueError(
            f"every one of the {stats.num_sequences} sequences is longer than max_seq_length={max_seq_length} and "
            "would be truncated; raise max_seq_length, or pass overflow='split' to keep every token"
        )
    if kept == 0:
        raise ValueError(
            f"none of the {stats.num_sequences} sequences has a label token to train on (labels all ignore_index, "
            "e.g. chat examples without an assistant turn, or whose assistant turns all have weight 0, or one-token "
            "texts)"
        )
    notes = []
    if stats.padding_tokens:
        notes.append(f"{stats.padding_tokens} padding token(s) (attention_mask 0) were removed")
    if stats.truncated_sequences:
        notes.append(
            f"{stats.truncated_sequences} sequence(s) longer than max_seq_length={max_seq_length} were truncated "
            f"({stats.truncated_tokens} tokens dropped; overflow='split' keeps them)"
        )
    if stats.split_sequences:
        notes.append(f"{stats.split_sequences} sequence(s) longer than max_seq_length={max_seq_length} were split")
    if stats.dropped_sequences:
        notes.append(f"{stats.dropped_sequences} sequence(s) with no label token were dropped")
    if notes:
        warnings.warn("; ".join(notes), stacklevel=3)
