"""SequencePacker: property tests (no token lost or duplicated, rows within the limit, efficiency, no label across a
boundary, determinism) and its bad inputs."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chronicals.data import PaddedCollator, SequencePacker, best_fit_decreasing

IGNORE = -100

lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=30)


def make_examples(lengths):
    # Token ids encode (example, position) so every token is unique and traceable to where it came from.
    return [{"input_ids": [1000 * i + p for p in range(n)]} for i, n in enumerate(lengths)]


def packed_sequences(rows):
    for row in rows:
        start = 0
        for n in row["seq_lens"]:
            yield row["input_ids"][start : start + n], row["labels"][start : start + n]
            start += n


@given(lengths=lengths_st, max_len=st.integers(2, 48), overflow=st.sampled_from(["truncate", "split"]))
def test_pack_properties(lengths, max_len, overflow):
    examples = make_examples(lengths)
    packer = SequencePacker(max_seq_length=max_len, padding_token_id=0, overflow=overflow)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = packer.pack(examples)
    except ValueError as e:  # only when nothing at all is usable
        assert "every one" in str(e) or "none of the" in str(e)
        return
    # Every row within the limit, seq_lens describing it exactly.
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lens"]) <= max_len
    # No token duplicated; none lost except what truncation (or dropping label-less sequences) accounts for.
    tokens = [t for row in rows for t in row["input_ids"]]
    assert len(tokens) == len(set(tokens)) == packer.packed_tokens
    if overflow == "split":
        expected = {t for ex in examples for t in ex["input_ids"]}
        dropped = expected - set(tokens)
        assert len(dropped) == packer.stats.dropped_tokens
        # A dropped piece is a lone token: a one-token piece has no label once its first label is masked.
        assert packer.stats.dropped_sequences == len(dropped)
    else:
        expected = {t for ex in examples for t in ex["input_ids"][:max_len]}
        assert set(tokens) <= expected
        assert len(expected) - len(tokens) == packer.stats.dropped_tokens
        assert packer.stats.truncated_tokens == sum(max(0, n - max_len) for n in lengths)
    assert packer.original_tokens == sum(lengths)
    # Efficiency is real tokens over slots.
    assert packer.efficiency == pytest.approx(len(tokens) / (len(rows) * max_len))
    assert 0 < packer.efficiency <= 1
    # Within each sequence the tokens are contiguous and in order; its first label is masked, the rest are targets.
    for ids, labels in packed_sequences(rows):
        assert [t // 1000 for t in ids] == [ids[0] // 1000] * len(ids)
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert labels[0] == IGNORE
        assert labels[1:] == ids[1:]
    # Deterministic.
    again = SequencePacker(max_seq_length=max_len, padding_token_id=0, overflow=overflow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert again.pack(examples) == rows


@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60), capacity=st.integers(64, 128))
def test_best_fit_decreasing_is_a_partition_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two bins that could have been one.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_best_fit_picks_the_tightest_row():
    # 6 opens row 0 (free 4), 5 opens row 1 (free 5), 4 must go to row 0 (tightest), 3 then to row 1.
    assert best_fit_decreasing([6, 5, 4, 3], 10) == [[0, 2], [1, 3]]


def test_seed_documented_use_and_pad_rows():
    examples = [{"input_ids": list(range(1, n + 1))} for n in (5, 3, 7, 2)]
    packer = SequencePacker(max_seq_length=8, padding_token_id=0, pad_rows=True)
    rows = packer.pack(examples)
    assert packer.original_tokens == packer.packed_tokens == 17
    assert packer.efficiency == pytest.approx(17 / (len(rows) * 8))
    for row in rows:
        assert len(row["input_ids"]) == 8
        real = sum(row["seq_lens"][:-1]) if row["input_ids"][-1] == 0 else 8
        assert row["labels"][real:] == [IGNORE] * (8 - real)
    assert packer.summary()["num_rows"] == len(rows)


def test_labels_given_are_kept_and_plain_lists_accepted():
    packer = SequencePacker(max_seq_length=16, padding_token_id=0)
    rows = packer.pack([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]}, [9, 10, 11]])
    row = rows[0]
    assert row["input_ids"] == [5, 6, 7, 8, 9, 10, 11]
    assert row["labels"] == [IGNORE, IGNORE, 7, 8, IGNORE, 10, 11]


def test_overflow_is_counted_and_warned():
    packer = SequencePacker(max_seq_length=4, padding_token_id=0)
    with pytest.warns(UserWarning, match="1 sequence.*truncated.*3 tokens"):
        rows = packer.pack([list(range(1, 8)), [1, 2, 3]])
    assert packer.stats.truncated_sequences == 1 and packer.stats.truncated_tokens == 3
    assert sorted(len(r["input_ids"]) for r in rows) == [3, 4]
    splitter = SequencePacker(max_seq_length=4, padding_token_id=0, overflow="split")
    with pytest.warns(UserWarning, match="split"):
        rows = splitter.pack([list(range(1, 8)), [1, 2, 3]])
    assert splitter.packed_tokens == splitter.original_tokens == 10


@pytest.mark.parametrize(
    "dataset, error, match",
    [
        ([[1, 2], []], ValueError, "example 1 is a zero-length sequence"),
        ([{"input_ids": []}], ValueError, "zero-length"),
        ([], ValueError, "dataset is empty"),
        ([list(range(1, 20)), list(range(1, 30))], ValueError, "every one of the 2 sequences is longer"),
        ([[1], [2]], ValueError, "none of the 2 sequences has a label token"),
        ([{"text": "hi"}], KeyError, "no 'input_ids'"),
        (["hello"], TypeError, "list of int token ids"),
        ([[1, 2.0]], TypeError, "non-negative int"),
        ([[1, -3]], TypeError, "non-negative int"),
        ([{"input_ids": [1, 2], "labels": [1]}], ValueError, "aligned"),
        ([{"input_ids": [1, 2], "labels": [-100, -5]}], TypeError, "or ignore_index=-100, found -5"),
        ([[1, 2**70]], TypeError, "found 1180591620717411303424"),
        # bool is an int subclass: a mask passed as token ids must not be packed as ids 0 and 1.
        ([[1, True, 3]], TypeError, r"example 0 must hold non-negative int token ids, found True \(bool\)"),
        ([[True, False, True]], TypeError, r"found True \(bool\)"),
        ([{"input_ids": [1, 2, 3], "labels": [-100, True, 3]}], TypeError, r"example 0 labels .* found True \(bool\)"),
    ],
)
def test_bad_input_gives_clear_errors(dataset, error, match):
    with pytest.raises(error, match=match):
        SequencePacker(max_seq_length=8, padding_token_id=0).pack(dataset)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_seq_length=1, padding_token_id=0), "max_seq_length must be >= 2"),
        (dict(max_seq_length="2048", padding_token_id=0), "max_seq_length must be an int"),
        (dict(max_seq_length=8, padding_token_id=None), "tokenizer has no pad token"),
        (dict(max_seq_length=8, padding_token_id=0, overflow="drop"), "overflow must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SequencePacker(**kwargs)


def test_bool_tensors_and_arrays_are_refused_by_packer_and_collators():
    import numpy as np
    import torch

    from chronicals.data import PackedCollator, PaddedCollator

    for ids in (torch.tensor([True, False, True]), np.array([True, False, True])):
        with pytest.raises(TypeError, match=r"found True \(bool\)"):
            SequencePacker(max_seq_length=8, padding_token_id=0).pack([ids])
    with pytest.raises(TypeError, match=r"input_ids must hold non-negative int token ids, found True \(bool\)"):
        PackedCollator()([{"input_ids": [1, True, 3]}])
    with pytest.raises(TypeError, match=r"input_ids must hold non-negative int token ids, found True \(bool\)"):
        PaddedCollator(0)([{"input_ids": [1, True, 3]}])
    # numpy integers stay accepted.
    rows = SequencePacker(max_seq_length=8, padding_token_id=0).pack([np.array([1, 2, 3])])
    assert rows[0]["input_ids"] == [1, 2, 3]


def test_attention_mask_padding_is_removed_not_trained():
    # Rows tokenized with padding="max_length" and labels copied from input_ids: the pad positions are no tokens.
    padded = [{"input_ids": [5, 6, 7, 1, 1], "labels": [5, 6, 7, 1, 1], "attention_mask": [1, 1, 1, 0, 0]},
              {"input_ids": np.array([1, 8, 9]), "labels": np.array([1, 8, 9]), "attention_mask": np.array([0, 1, 1])}]
    packer = SequencePacker(max_seq_length=16, padding_token_id=0)
    with pytest.warns(UserWarning, match="3 padding token"):
        (row,) = packer.pack(padded)
    assert row["input_ids"] == [5, 6, 7, 8, 9] and row["labels"] == [IGNORE, 6, 7, IGNORE, 9]
    assert packer.summary()["padding_tokens"] == 3 and packer.summary()["packed_tokens"] == 5
    batch = PaddedCollator(padding_token_id=0)(padded)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and batch["num_label_tokens"] == 3
    with pytest.raises(ValueError, match="example 0: attention_mask must be a list of 0/1 as long as input_ids"):
        packer.pack([{"input_ids": [5, 6, 7], "attention_mask": [1, 1]}])
    with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1, found \[2\]"):
        packer.pack([{"input_ids": [5, 6, 7], "attention_mask": [1, 2, 1]}])
