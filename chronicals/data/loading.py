"""Where rows come from: JSONL and Parquet files, Hugging Face `datasets` objects (or a saved dataset directory, or
a hub name where the machine can reach the hub), and plain lists of dicts. Each source also gets a fingerprint that
changes when its content does, the data half of the tokenization cache key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .default_text import default_dataset

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class LoadedRows:
    rows: Sequence[Mapping[str, Any]]  # a list of dicts or a datasets.Dataset: both index and iterate as dicts
    columns: list[str]
    fingerprint: str
    description: str
    lines: list[int] | None = None  # each row's line in its JSONL file, so that errors point at the line


def row_label(index: int, lines: Sequence[int] | None) -> str:
    """How errors name row `index`: with its line in the file when the rows came from JSONL (`lines`)."""
    return f"row {index}" if lines is None else f"row {index} (line {lines[index]})"


def load_rows(source: Any, split: str = "train") -> LoadedRows:
    """Rows from a path (.jsonl/.json/.ndjson, .parquet, a `save_to_disk` directory), a hub dataset name, a
    `datasets.Dataset` / `DatasetDict` (`split` picks from a dict), a list of dicts (or of strings, each a "text"
    row), a dict of column lists, or "default" (the embedded text, `default_dataset()`, as the config's
    `dataset: default` means)."""
    if isinstance(source, str) and source == "default":
        loaded = _from_list(default_dataset())  # the fingerprint of the same rows passed as a list
        loaded.description = f"the embedded default text ({len(loaded.rows)} rows)"
        return loaded
    if isinstance(source, (str, Path)):
        return _load_path(source, split)
    datasets = _datasets_module()
    if datasets is None:  # then `source` cannot be a datasets object: only a list of dicts remains
        return _from_list(source)
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise KeyError(f"split={split!r} is not in the DatasetDict; it has {sorted(source)}")
        source = source[split]
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError(
            "a streaming datasets.IterableDataset cannot be tokenized ahead of training and cached; "
            "load it without streaming=True"
        )
    if isinstance(source, datasets.Dataset):
        return LoadedRows(source, list(source.column_names), f"hf:{source._fingerprint}", "datasets.Dataset")
    return _from_list(source)


def _datasets_module():
    """The `datasets` package, or None where it is not installed (lists and JSONL/Parquet files do without it)."""
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _from_list(source: Any) -> LoadedRows:
    if isinstance(source, Mapping):
        source = _columns_to_rows(source)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if source and all(isinstance(row, str) for row in source):
            source = [{"text": row} for row in source]  # plain strings are text rows, as TRL takes them
        for index, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise TypeError(f"row {index} must be a dict of columns, got {type(row).__name__}")
        columns = list(source[0]) if source else []
        digest = hashlib.sha256(json.dumps(list(source), sort_keys=True, default=repr).encode()).hexdigest()
        return LoadedRows(list(source), columns, f"rows:{digest}", f"a list of {len(source)} rows")
    raise TypeError(
        f"dataset must be a path (.jsonl, .parquet, a saved dataset dir), a hub name, a datasets.Dataset, a list "
        f"of dicts or strings, or a dict of equal-length column lists; got {type(source).__name__}"
    )


def _columns_to_rows(columns: Mapping) -> list[dict]:
    """{"text": [...], ...} (what Dataset.from_dict takes) as a list of row dicts."""
    lengths = {}
    for name, values in columns.items():
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise TypeError(f"dataset given as a dict of columns: column {name!r} must be a list, got "
                            f"{type(values).__name__}")
        lengths[name] = len(values)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"dataset given as a dict of columns: the columns differ in length {lengths}")
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _load_path(source: str | Path, split: str) -> LoadedRows:
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        lines = None
        if suffix in JSONL_SUFFIXES:
            rows, lines = _read_jsonl(path)
        elif suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise ValueError(f"dataset file {path} has suffix {suffix!r}; use .jsonl/.json/.ndjson or .parquet")
        columns = list(rows[0]) if rows else []
        return LoadedRows(rows, columns, f"file:{_file_digest(path)}", str(path), lines)
    hub_name = isinstance(source, str) and not path.suffix and not source.startswith((".", "/", "~"))
    if not path.is_dir() and not hub_name:
        raise FileNotFoundError(f"dataset path {path} does not exist")
    if path.is_dir():
        _check_saved_dataset_dir(path)
    datasets = _datasets_module()
    if datasets is None:
        raise ImportError(f"dataset {source!r} is a saved-dataset directory or a hub name, which needs the `datasets` "
                          "package: pip install datasets (or pass a .jsonl/.parquet file or a list of dicts)")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(source, split=split)
        except Exception as e:  # the hub is unreachable, or the name is wrong: say which source failed
            raise FileNotFoundError(
                f"dataset {source!r} is not a local file or directory, and loading it as a hub dataset failed: {e}"
            ) from e
    return load_rows(loaded, split)


def _check_saved_dataset_dir(path: Path) -> None:
    # A directory of data files (shards) is what a directory most often holds; datasets' own refusal of it ("neither a
    # `Dataset` directory nor a `DatasetDict` directory") does not say what to pass instead.
    if any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        return
    message = (f"dataset directory {path} is not a saved dataset (datasets' save_to_disk writes a state.json or "
               "dataset_dict.json there)")
    for kind, suffixes in (("json", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
        if files:
            raise FileNotFoundError(
                f"{message}; it holds {len(files)} {files[0].suffix} file(s): pass one file, or load them all with "
                f"datasets.load_dataset({kind!r}, data_files={str(path / ('*' + files[0].suffix))!r}, split='train') "
                "and pass that dataset")
    raise FileNotFoundError(f"{message}; pass a .jsonl or .parquet file, or a directory written by save_to_disk")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The rows, and each one's line number (None for a .json array); blank lines are skipped, so a row's index
    and its line differ."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors write one) is dropped
    lines = None
    if text.lstrip().startswith("["):  # a .json file holding one array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:  # a trailing comma, say: name the file and where
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); a .json file must hold one "
                             "array of row objects, with no comma after the last") from e
    else:
        rows, lines = [], []
        # Split on "\n" only: str.splitlines also breaks at U+2028, form feeds and the like, which JSON strings may
        # hold unescaped (json.dumps(..., ensure_ascii=False) writes them so); a "\r" before "\n" is JSON whitespace.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            lines.append(number)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"{path}: {row_label(index, lines)} is a {type(row).__name__}, expected a JSON object of "
                            "columns")
    return rows, lines


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
