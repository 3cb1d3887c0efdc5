"""The tokenization cache: whatever changes the tokenized examples must change the key, so no stale file is read."""

import pytest

from chronicals.data import default_tokenizer, prepare_dataset

ROWS = [{"text": "one<|im_end|> two"}]  # holds a special token's text


def test_split_special_tokens_is_part_of_the_key(tmp_path):
    # With split_special_tokens, "<|im_end|>" in the text is ordinary text, not the special token: other ids.
    tok = default_tokenizer()
    first = prepare_dataset(ROWS, tok, max_seq_length=64, cache_dir=tmp_path)
    split = default_tokenizer()
    split.split_special_tokens = True
    fresh = prepare_dataset(ROWS, split, max_seq_length=64, use_cache=False)
    assert fresh.rows != first.rows
    cached = prepare_dataset(ROWS, split, max_seq_length=64, cache_dir=tmp_path)
    assert not cached.cache_hit and cached.cache_file != first.cache_file
    assert cached.rows == fresh.rows


def test_a_cache_that_cannot_be_written_warns_and_prepares_anyway(tok, tmp_path):
    # The cache only saves time: a read-only or wrong cache directory must not stop training.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not be written.*cache_dir"):
        prepared = prepare_dataset(ROWS, tok, max_seq_length=64, cache_dir=blocker / "cache")
    assert prepared.cache_file is None and not prepared.cache_hit
    assert prepared.rows == prepare_dataset(ROWS, tok, max_seq_length=64, use_cache=False).rows
