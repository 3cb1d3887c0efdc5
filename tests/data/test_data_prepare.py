"""prepare_dataset end to end: every input kind gives the same rows; bad data fails before training; the cache."""

import json
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chronicals.data import PackedCollator, PaddedCollator, default_tokenizer, load_rows, prepare_dataset

ROWS = [
    {"prompt": "Q: what does pass do?", "completion": " Nothing."},
    {"prompt": "Q: what does assert do?", "completion": " It checks a condition."},
    {"prompt": "Q: and del?", "completion": " It deletes a name."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_source_kind_gives_the_same_rows(tok, tmp_path):
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    (tmp_path / "array.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    columns = {name: [r[name] for r in ROWS] for name in ROWS[0]}  # what Dataset.from_dict takes
    sources = [ROWS, columns, write_jsonl(tmp_path / "rows.jsonl", ROWS), str(tmp_path / "array.json"), parquet, ds,
               datasets.DatasetDict({"train": ds}), tmp_path / "saved"]
    results = [prepare_dataset(s, tok, max_seq_length=64, use_cache=False) for s in sources]
    assert all(r.format == "prompt_completion" for r in results)
    assert all(r.rows == results[0].rows for r in results)
    packed = results[0]
    assert isinstance(packed.collator, PackedCollator) and len(packed.rows) == 1  # packing is on by default
    assert packed.stats["packed_tokens"] == packed.stats["original_tokens"]
    batch = packed.collator(packed.rows)
    assert batch["num_label_tokens"] == packed.stats["label_tokens"] > 0
    unpacked = prepare_dataset(ROWS, tok, max_seq_length=64, packing=False, use_cache=False)
    assert isinstance(unpacked.collator, PaddedCollator) and len(unpacked.rows) == 3
    assert unpacked.collator(unpacked.rows)["num_label_tokens"] == batch["num_label_tokens"]


def test_a_list_of_strings_is_a_list_of_text_rows(tok):
    texts = ["The first document.", "And a second, longer document."]
    as_strings = prepare_dataset(texts, tok, max_seq_length=64, use_cache=False)
    as_rows = prepare_dataset([{"text": t} for t in texts], tok, max_seq_length=64, use_cache=False)
    assert as_strings.format == "text" and as_strings.rows == as_rows.rows


def test_pretokenized_rows_pass_through(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}]
    for source in (rows, datasets.Dataset.from_list([rows[0], {**rows[1], "labels": None}])):
        prepared = prepare_dataset(source, tok, max_seq_length=8)
        assert prepared.format == "tokenized" and prepared.cache_file is None
        assert prepared.rows == [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lens": [3, 2]}]


def test_cache_is_reused_and_keyed_by_content_and_tokenizer(tok, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = prepare_dataset(data, tok, max_seq_length=64, cache_dir=tmp_path / "cache")
    second = prepare_dataset(data, tok, max_seq_length=32, cache_dir=tmp_path / "cache")
    assert not first.cache_hit and second.cache_hit and first.cache_file == second.cache_file
    assert second.rows == prepare_dataset(data, tok, max_seq_length=32, use_cache=False).rows
    write_jsonl(data, ROWS[:2])
    changed = prepare_dataset(data, tok, max_seq_length=64, cache_dir=tmp_path / "cache")
    assert not changed.cache_hit and changed.cache_file != first.cache_file
    other = default_tokenizer()
    other.chat_template = "{{ messages }}"
    assert prepare_dataset(data, other, cache_dir=tmp_path / "cache").cache_file != changed.cache_file
    changed.cache_file.write_bytes(b"damaged")
    again = prepare_dataset(data, tok, max_seq_length=64, cache_dir=tmp_path / "cache")
    assert not again.cache_hit and again.rows == changed.rows


@pytest.mark.parametrize(
    "source, kwargs, error, match",
    [
        ([], {}, ValueError, "is empty"),
        ([{"body": "x"}], {}, KeyError, "cannot tell the row format"),
        ([{"text": "ok"}], dict(format="messages"), KeyError, "needs column"),
        ([{"text": 3}], {}, TypeError, "row 0: 'text' must be a str"),
        ([{"text": "x" * 400}], dict(max_seq_length=8), ValueError, "every one of the 1 sequences is longer"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], {}, ValueError, "none of the 1 sequences has a label"),
        (["just text", {"text": "a dict"}], {}, TypeError, "row 0 must be a dict"),
        ({"text": ["a", "b"], "other": ["c"]}, {}, ValueError, r"columns differ in length \{'text': 2, 'other': 1\}"),
        ({"text": "not a list"}, {}, TypeError, "column 'text' must be a list, got str"),
        (42, {}, TypeError, "dataset must be a path"),
        ("/nonexistent/rows.jsonl", {}, FileNotFoundError, "does not exist"),
    ],
)
def test_bad_data_fails_before_training(tok, source, kwargs, error, match):
    with pytest.raises(error, match=match):
        prepare_dataset(source, tok, use_cache=False, **kwargs)


def test_bad_files(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_rows(bad)
    trailing_comma = tmp_path / "rows.json"
    trailing_comma.write_text('[{"text": "one"},\n {"text": "two"},\n]')
    with pytest.raises(ValueError, match="rows.json:3:1: not valid JSON .* no comma after the last"):
        load_rows(trailing_comma)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        prepare_dataset(empty, tok, use_cache=False)
    other = tmp_path / "rows.csv"
    other.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="suffix '.csv'"):
        load_rows(other)
    with pytest.raises(KeyError, match="split='test' is not in the DatasetDict"):
        load_rows(datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}), split="test")


@pytest.mark.parametrize(
    "line4, error, match",
    [
        ('{"txt": "oops"}', KeyError, r"row 2 \(line 4\) has no 'text'"),
        ('{"text": ""}', ValueError, r"row 2 \(line 4\): 'text' is empty"),
        ('{"text": 5}', TypeError, r"row 2 \(line 4\): 'text' must be a str"),
        ("[1, 2]", TypeError, r"row 2 \(line 4\) is a list"),
    ],
)
def test_a_bad_jsonl_row_names_its_line(tok, tmp_path, line4, error, match):
    # Blank lines are skipped, so the row index alone (2 here) points at the wrong line of the file.
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n' + line4 + "\n")
    with pytest.raises(error, match=match):
        prepare_dataset(path, tok, format="text", use_cache=False)


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    # JSON allows U+2028, form feeds etc. unescaped in strings; str.splitlines cut the line there ("not valid JSON").
    rows = [{"text": "one\u2028two"}, {"text": "form\x0cfeed \x85 \x1c"}, {"text": "crlf"}]
    path = tmp_path / "rows.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    assert load_rows(path).rows == rows


@pytest.mark.parametrize("name, body", [("rows.jsonl", '{"text": "a"}\n{"text": "b"}\n'),
                                        ("rows.json", '[{"text": "a"}, {"text": "b"}]')])
def test_a_byte_order_mark_is_read_past(tmp_path, name, body):
    # Files saved by Windows editors start with a UTF-8 BOM; it was read as part of the first row ("not valid JSON").
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_rows(path).rows == [{"text": "a"}, {"text": "b"}]


def test_truncation_is_warned_and_no_pad_token_pads_with_eos(tok):
    rows = [{"text": "x " * 300}, {"text": "short text"}]
    with pytest.warns(UserWarning, match="truncated"):
        prepared = prepare_dataset(rows, tok, max_seq_length=16, use_cache=False)
    assert prepared.stats["truncated_sequences"] == 1
    no_pad = default_tokenizer()
    no_pad.pad_token = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_dataset(rows[1:], no_pad, use_cache=False).rows  # packed
    with pytest.warns(UserWarning, match="split"):
        padded = prepare_dataset(rows, no_pad, max_seq_length=16, packing=False, use_cache=False, overflow="split")
    batch = padded.collator([padded.rows[0], padded.rows[-1]])  # a full row and the short one
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == no_pad.eos_token_id).all()
    no_pad.eos_token = None  # neither a pad nor an eos token: nothing to pad with
    with pytest.raises(ValueError, match="tokenizer has no pad token"):
        prepare_dataset(rows[1:], no_pad, packing=False, use_cache=False)


def test_lists_and_files_load_without_the_datasets_package(tmp_path, monkeypatch):
    from chronicals.data import loading

    monkeypatch.setattr(loading, "_datasets_module", lambda: None)
    assert loading.load_rows([{"text": "a"}, {"text": "b"}]).columns == ["text"]
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n')
    assert len(loading.load_rows(path).rows) == 1
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        loading.load_rows("some-org/some-dataset")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.load_rows(tmp_path / "missing.jsonl")


def test_a_directory_that_is_not_a_saved_dataset_says_what_to_pass(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(ROWS), shards / f"part-{i}.parquet")
    with pytest.raises(FileNotFoundError, match=r"not a saved dataset.*2 \.parquet file\(s\).*load_dataset\('parquet'"):
        load_rows(shards)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved dataset.*save_to_disk"):
        load_rows(empty)
