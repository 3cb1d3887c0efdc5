"""The training data as the trainer takes it: whatever `chronicals.data.prepare_dataset` reads (a path, a hub name,
a datasets.Dataset, a list of row dicts; "default" for the embedded text), with the config's column names, or rows
that are already tokenized (`input_ids`, optionally `labels`). Every data problem surfaces here as a DataError,
before the first step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chronicals.config import ChronicalsConfig
from chronicals.data import PackedCollator, PaddedCollator, SequencePacker, fit_sequences
from chronicals.data.loading import load_rows
from chronicals.data.prepare import PreparedData, padding_id, prepare_dataset


class DataError(ValueError):
    """The training data cannot be trained on; the message says what is wrong and where."""


def prepare_training_data(dataset: Any, tokenizer, cfg: ChronicalsConfig, what: str = "training data") -> PreparedData:
    """`what` names the data in errors ("training data", "evaluation data")."""
    # "default" needs no case here: the data layer's load_rows reads it as the embedded text.
    what = f"{what} {dataset!r}" if isinstance(dataset, str) else f"{what} {type(dataset).__name__}"
    try:
        if _is_tokenized(dataset):
            return _prepare_tokenized(dataset, tokenizer, cfg)
        return prepare_dataset(_renamed(dataset, cfg), tokenizer, max_seq_length=cfg.max_seq_length,
                               format=cfg.dataset_format, packing=cfg.use_sequence_packing, overflow=cfg.overflow,
                               split=cfg.dataset_split)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise DataError(f"{what}: {message}") from e


def check_token_ids(rows, model, tokenizer) -> None:
    """Every token id, in input_ids and in labels, must index the model's embedding (its vocabulary, which the output
    head shares): one that does not would fail deep inside the first forward (an IndexError on CPU, a device-side
    assert on CUDA) or, in the fused loss, make it NaN, so say here which sizes disagree."""
    # The weight's rows, not num_embeddings: LoRA on embed_tokens wraps it in a PEFT layer that has no such attribute.
    rows_of_embedding = model.get_input_embeddings().weight.shape[0]
    top = max((max(r[key]) for r in rows for key in ("input_ids", "labels") if len(r[key])), default=-1)
    if top >= rows_of_embedding:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else top + 1
        raise DataError(
            f"the data holds token id {top} but the model's embedding has only {rows_of_embedding} rows: the "
            f"tokenizer ({size} tokens) does not match the model; use the model's own tokenizer, or build "
            f"the model with vocab_size={size} (config field model_kwargs.vocab_size for a preset)")


def _is_tokenized(source: Any) -> bool:
    columns = getattr(source, "column_names", None)
    if isinstance(columns, list):  # a datasets.Dataset
        return "input_ids" in columns
    return (isinstance(source, Sequence) and not isinstance(source, (str, bytes)) and len(source) > 0
            and isinstance(source[0], Mapping) and "input_ids" in source[0])


def _renamed(source: Any, cfg: ChronicalsConfig) -> Any:
    """The rows with the config's column names mapped to the data layer's (text, prompt, completion, messages)."""
    fields = {field: (getattr(cfg, field), field.removesuffix("_column"))
              for field in ("text_column", "prompt_column", "completion_column", "messages_column")}
    mapping = {old: new for old, new in fields.values() if old != new}
    if not mapping:
        return source
    loaded = load_rows(source, cfg.dataset_split)
    for field, (old, new) in fields.items():
        if old != new and old not in loaded.columns and new in loaded.columns:
            # Training on the data's own "text" column when the config names another would be a silent mix-up.
            raise ValueError(f"config field {field!r} is {old!r}, but the data has no column {old!r} (its columns: "
                             f"{', '.join(map(str, loaded.columns))}); set {field}: {new} to use its {new!r} column")
    if hasattr(loaded.rows, "rename_columns"):
        present = {o: n for o, n in mapping.items() if o in loaded.columns}
        return loaded.rows.remove_columns(_shadowed(loaded.columns, present)).rename_columns(present)
    renamed = []
    for row in loaded.rows:
        present = {o: n for o, n in mapping.items() if o in row}
        shadowed = _shadowed(row, present)
        renamed.append({**{k: v for k, v in row.items() if k not in present and k not in shadowed},
                        **{n: row[o] for o, n in present.items()}})
    return renamed


def _shadowed(columns, renames: dict[str, str]) -> list[str]:
    """Columns that already bear a name the renames give (a "text" column beside text_column "body"): they give way
    to the column the config names, which they would otherwise be trained on instead of."""
    return [n for n in renames.values() if n in columns and n not in renames]


def _prepare_tokenized(rows: Sequence[Any], tokenizer, cfg: ChronicalsConfig) -> PreparedData:
    pad_id = padding_id(tokenizer)
    if cfg.use_sequence_packing:
        packer = SequencePacker(cfg.max_seq_length, pad_id, cfg.overflow)
        return PreparedData(packer.pack(rows), PackedCollator(pad_id), "tokenized", packer.summary())
    fitted, stats = fit_sequences(rows, cfg.max_seq_length, cfg.overflow)
    units = [{"input_ids": ids, "labels": labels} for ids, labels in fitted]
    return PreparedData(units, PaddedCollator(pad_id), "tokenized", {**vars(stats), "num_rows": len(units)})
