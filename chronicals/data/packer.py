"""SequencePacker: best-fit-decreasing packing of tokenized sequences into rows of at most `max_seq_length` tokens.

Padding-free training wastes no compute on pad tokens, but a row still has a length budget; the fewer rows the
sequences need, the fewer steps an epoch takes. Best-fit decreasing places the longest sequences first, each into
the row whose free space it fills most tightly, which on real length distributions leaves a few percent of slots
empty at most. Every choice is broken by position, so the same input always gives the same rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from ._checks import check_choice, check_int, check_padding_token_id
from .sequences import OVERFLOW_MODES, FitStats, fit_sequences


class SequencePacker:
    """Pack tokenized examples into rows `{"input_ids", "labels", "seq_lens"}` of at most `max_seq_length` tokens.

    An example is a list of token ids or a mapping with `input_ids` (and optionally `labels`). Each sequence's first
    label becomes `ignore_index`, so no token predicts across a boundary; `seq_lens` lists the lengths of the
    sequences in the row, in order, which is what `PackedCollator` turns into `cu_seq_lens` and `position_ids`.
    Sequences over the limit are truncated or split (`overflow`), counted and warned about.

    With `pad_rows=True` every row is filled up to `max_seq_length` with `padding_token_id`, as one extra segment
    whose labels are all `ignore_index` (for fixed shapes); its length is the last entry of `seq_lens` and is not
    counted in `packed_tokens`.
    """

    def __init__(
        self,
        max_seq_length: int,
        padding_token_id: int,
        overflow: str = "truncate",
        ignore_index: int = -100,
        pad_rows: bool = False,
    ):
        self.max_seq_length = check_int("max_seq_length", max_seq_length, minimum=2)
        self.padding_token_id = check_padding_token_id(padding_token_id)
        self.overflow = check_choice("overflow", overflow, OVERFLOW_MODES)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if not isinstance(pad_rows, bool):
            raise TypeError(f"pad_rows must be a bool, got {type(pad_rows).__name__}")
        self.pad_rows = pad_rows
        self.stats = FitStats()
        self.num_rows = 0
        self.packed_tokens = 0

    @property
    def original_tokens(self) -> int:
        """Tokens in the input, before any truncation or dropping."""
        return self.stats.original_tokens

    @property
    def slots(self) -> int:
        """Token slots the rows offer: rows times `max_seq_length`."""
        return self.num_rows * self.max_seq_length

    @property
    def efficiency(self) -> float:
        """Real tokens over slots, in [0, 1]; 0.0 before anything was packed."""
        return self.packed_tokens / self.slots if self.slots else 0.0

    def pack(self, dataset: Iterable[Any]) -> list[dict[str, list[int]]]:
        sequences, self.stats = fit_sequences(dataset, self.max_seq_length, self.overflow, self.ignore_index)
        row_members = best_fit_decreasing([len(ids) for ids, _ in sequences], self.max_seq_length)
        rows = []
        for members in row_members:
            input_ids: list[int] = []
            labels: list[int] = []
            seq_lens: list[int] = []
            for i in members:
                ids, labs = sequences[i]
                input_ids += ids
                labels += labs
                seq_lens.append(len(ids))
            free = self.max_seq_length - len(input_ids)
            if self.pad_rows and free:
                input_ids += [self.padding_token_id] * free
                labels += [self.ignore_index] * free
                seq_lens.append(free)
            rows.append({"input_ids": input_ids, "labels": labels, "seq_lens": seq_lens})
        self.num_rows = len(rows)
        self.packed_tokens = sum(len(ids) for ids, _ in sequences)
        return rows

    def summary(self) -> dict[str, float]:
        """The statistics of the last `pack`, for logs and result rows."""
        return {
            "num_sequences": self.stats.num_sequences,
            "num_rows": self.num_rows,
            "original_tokens": self.original_tokens,
            "packed_tokens": self.packed_tokens,
            "slots": self.slots,
            "efficiency": self.efficiency,
            "truncated_sequences": self.stats.truncated_sequences,
            "truncated_tokens": self.stats.truncated_tokens,
            "split_sequences": self.stats.split_sequences,
            "dropped_sequences": self.stats.dropped_sequences,
            "dropped_tokens": self.stats.dropped_tokens,
            "padding_tokens": self.stats.padding_tokens,
        }


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, by best-fit decreasing. Ties (equal lengths,
    equal free space) go to the lower index, so the result is a pure function of the input."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (free space, bin index), sorted: the first that fits is the best fit
    for i in order:
        length = lengths[i]
        if length > capacity:
            raise ValueError(f"length {length} at index {i} exceeds capacity {capacity}")
        at = bisect.bisect_left(open_bins, (length, -1))
        if at < len(open_bins):
            free, b = open_bins.pop(at)
            bins[b].append(i)
        else:
            free, b = capacity, len(bins)
            bins.append([i])
        if free - length > 0:
            bisect.insort(open_bins, (free - length, b))
    return bins
