"""PackedCollator and PaddedCollator: the batch conventions of docs/CONTRACTS.md, label counting, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronicals.data import PackedCollator, PaddedCollator, SequencePacker

IGNORE = -100


def test_packed_collator_flattening_convention():
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5], "seq_lens": [3, 2]},
        {"input_ids": [6, 7, 8], "labels": [6, 7, 8]},  # a plain example: one sequence, first label masked here
    ]
    batch = PackedCollator()(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 8]
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert type(batch["max_length_q"]) is int
    assert batch["num_label_tokens"] == 5
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long


def test_packed_collator_pads_to_multiple_as_an_ignored_segment():
    batch = PackedCollator(padding_token_id=0, pad_to_multiple_of=8)([[1, 2, 3], [4, 5]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert batch["num_label_tokens"] == 3


@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=12), max_len=st.integers(20, 40))
def test_packer_then_collator_counts_match_padded(lengths, max_len):
    examples = [[7 + p for p in range(n)] for n in lengths]
    label_tokens = sum(n - 1 for n in lengths)
    if label_tokens == 0:
        return
    packer = SequencePacker(max_seq_length=max_len, padding_token_id=0)
    rows = packer.pack([e for e in examples if len(e) > 1])
    packed = PackedCollator()(rows)
    padded = PaddedCollator(padding_token_id=0)(examples)
    # The same loss terms either way: tokens/s of padded and packed runs are comparable.
    assert packed["num_label_tokens"] == padded["num_label_tokens"] == label_tokens
    # No label predicts across a boundary: the label at every sequence start is ignored.
    starts = packed["cu_seq_lens_q"][:-1].long()
    assert (packed["labels"][0, starts] == IGNORE).all()
    assert (packed["position_ids"][0, starts] == 0).all()
    assert int(packed["cu_seq_lens_q"][-1]) == packed["input_ids"].shape[1] == packer.packed_tokens


def test_padded_collator():
    batch = PaddedCollator(padding_token_id=9)([[1, 2, 3], {"input_ids": [4, 5], "labels": [IGNORE, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, 5, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["num_label_tokens"] == 3
    fixed = PaddedCollator(padding_token_id=9, max_length=4, pad_to_multiple_of=3)([[1, 2, 3]])
    assert fixed["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9]]


@pytest.mark.parametrize("collator", [PackedCollator(), PaddedCollator(padding_token_id=0)])
def test_collators_refuse_batches_without_label_tokens(collator):
    with pytest.raises(ValueError, match="no label token"):
        collator([{"input_ids": [1, 2], "labels": [IGNORE, IGNORE]}])
    with pytest.raises(ValueError, match="empty list"):
        collator([])
    with pytest.raises(ValueError, match="zero-length"):
        collator([[]])


@pytest.mark.parametrize("as_array", [torch.tensor, np.array])
def test_collators_read_seq_lens_given_as_arrays(as_array):
    # A `datasets` row in torch or numpy format holds arrays, which input_ids and labels accept; seq_lens was
    # refused ("must be positive ints") by PackedCollator and made PaddedCollator's packed-row check raise
    # "Boolean value of Tensor ... is ambiguous".
    row = {"input_ids": as_array([1, 2, 3, 4, 5]), "labels": as_array([IGNORE, 2, 3, IGNORE, 5]),
           "seq_lens": as_array([3, 2])}
    batch = PackedCollator()([row])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="packed row of several sequences"):
        PaddedCollator(padding_token_id=0)([row])
    assert PaddedCollator(padding_token_id=0)([{**row, "seq_lens": as_array([5])}])["num_label_tokens"] == 3


def test_collator_bad_arguments():
    with pytest.raises(ValueError, match="no pad token"):
        PackedCollator(pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="seq_lens"):
        PackedCollator()([{"input_ids": [1, 2, 3], "seq_lens": [1, 1]}])
    with pytest.raises(ValueError, match="packed row of several sequences"):
        PaddedCollator(padding_token_id=0)([{"input_ids": [1, 2, 3], "seq_lens": [1, 2]}])
    with pytest.raises(ValueError, match="more than max_length=2"):
        PaddedCollator(padding_token_id=0, max_length=2)([[1, 2, 3]])
