"""The tokenization cache: whatever changes the tokenized examples must change the key, so no stale file is read."""

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
