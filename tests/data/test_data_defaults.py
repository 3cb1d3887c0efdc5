"""The embedded defaults load offline, are deterministic, and work with the packer."""

import warnings

from chronicals.data import SequencePacker, default_dataset, default_tokenizer


def test_default_tokenizer_loads_offline_and_round_trips():
    tok = default_tokenizer()
    assert len(tok) == 4096
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    text = "Assert statements are a convenient way to insert debugging assertions."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # trained on this prose: real merges, not bytes
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_dataset_is_real_deterministic_text():
    rows = default_dataset()
    assert rows == default_dataset()
    assert len(rows) > 200 and all(set(r) == {"text"} and 0 < len(r["text"]) <= 2000 for r in rows)
    assert sum(len(r["text"]) for r in rows) > 400_000
    assert any("assert" in r["text"] for r in rows)


def test_default_pipeline_packs_efficiently():
    tok = default_tokenizer()
    rows = default_dataset()[:60]
    examples = [tok(r["text"])["input_ids"] for r in rows]
    packer = SequencePacker(max_seq_length=2048, padding_token_id=tok.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = packer.pack(examples)
    assert packer.original_tokens == packer.packed_tokens
    assert packer.efficiency > 0.9 and len(packed) < len(examples)


def test_prepare_dataset_reads_default_as_the_embedded_text(tmp_path):
    # docs/TRAINING.md: `train` takes whatever prepare_dataset reads, "default" included; it was looked up on the hub.
    from chronicals.data import load_rows, prepare_dataset

    loaded = load_rows("default")
    assert loaded.rows == default_dataset() and loaded.columns == ["text"] and "embedded" in loaded.description
    tok = default_tokenizer()
    prepared = prepare_dataset("default", tok, max_seq_length=128, overflow="split", cache_dir=tmp_path)
    as_list = prepare_dataset(default_dataset(), tok, max_seq_length=128, overflow="split", cache_dir=tmp_path)
    assert prepared.format == "text" and prepared.rows == as_list.rows and as_list.cache_hit
