"""The tokenization cache: tokenized examples stored once per (data, tokenizer, format) and reused by every later run.

The key hashes the source's content fingerprint, the tokenizer's full definition (vocabulary, merges, normalizer,
special tokens, chat template, and `split_special_tokens`, which makes special tokens' text ordinary text), the
format and the ignore_index written into the labels, plus a layout version.
It leaves out `max_seq_length` and the overflow mode on purpose: tokenization does not depend on them, and fitting
and packing are redone on every run in a fraction of the tokenization time, so changing the length reuses the cache
instead of re-tokenizing.
Files are numpy archives (tokens as int32, one flat array per field plus lengths), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# Raised whenever the cached examples would change: the file layout, or what tokenization writes (2: the eos a
# tokenizer appends itself carries loss; 3: a chat turn with "weight": 0 carries none).
LAYOUT_VERSION = 3


def default_cache_dir() -> Path:
    base = os.environ.get("CHRONICALS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chronicals"
    )
    return Path(base)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, definition, str(getattr(tokenizer, "chat_template", None)),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(tokenizer.eos_token_id),
             # Read on each call, outside the backend's definition: it decides whether "<|im_end|>" in a text is the
             # special token or the tokens of its characters.
             str(bool(getattr(tokenizer, "split_special_tokens", False)))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(source_fingerprint: str, tokenizer: Any, format: str, ignore_index: int = -100) -> str:
    parts = [f"v{LAYOUT_VERSION}", source_fingerprint, tokenizer_fingerprint(tokenizer), format, str(ignore_index)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / "tokenized" / f"{key}.npz"


def load(path: Path) -> list[dict[str, list[int]]] | None:
    """The cached examples, or None when there is no (readable) cache file."""
    try:
        with np.load(path) as archive:
            lengths, input_ids, labels = archive["lengths"], archive["input_ids"], archive["labels"]
    # Absent or damaged: the caller tokenizes again and overwrites it.
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    ids, labs = input_ids.tolist(), labels.tolist()
    return [{"input_ids": ids[a:b], "labels": labs[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]


def save(path: Path, examples: list[dict[str, list[int]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    input_ids = np.fromiter((t for e in examples for t in e["input_ids"]), dtype=np.int32, count=int(lengths.sum()))
    labels = np.fromiter((t for e in examples for t in e["labels"]), dtype=np.int32, count=int(lengths.sum()))
    # Written beside the target then renamed, so a concurrent or interrupted run never reads half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, lengths=lengths, input_ids=input_ids, labels=labels)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
