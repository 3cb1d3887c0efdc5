"""Row formats -> tokenized examples `{"input_ids", "labels"}` (labels aligned, `ignore_index` where no loss).

- `text`: every token is a target; the tokenizer's own special tokens are added and eos is appended (a tokenizer
  without an eos token is refused for `text`, `prompt`/`completion` and `alpaca` rows).
- `prompt`/`completion`: loss on the completion (and the eos appended after it) only.
- `messages`: rendered by the chat template; loss on assistant turns only (see chat.py). `sharegpt` is the same
  from a `conversations` column, whose `{"from", "value"}` turns are mapped to roles (human -> user, gpt -> assistant).
- `prompt`/`completion` given as message lists (TRL's conversational prompt-completion): rendered by the chat
  template; loss on the completion's assistant turns only.
- `alpaca`: `instruction`, an optional `input` and `output`, in the Alpaca prompt (alpaca.py); loss on the output.
- `tokenized`: rows already hold `input_ids` (and optionally `labels`); they pass through untouched.

Every format is rendered to one string plus the character spans that carry loss, tokenized in batches with offset
mappings (a fast tokenizer's Rust side does the work in parallel), and a token is a target when it starts inside a
span. Tokenizing the whole string at once gives exactly the tokens the model sees at inference for that text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .alpaca import alpaca_input, alpaca_prompt
from .chat import check_messages, render_chat
from .loading import row_label

# The order "auto" tries them in: Alpaca before text, as Alpaca files often hold a `text` column too (prompt and
# output in one, which would train on the prompt).
FORMATS = ("tokenized", "messages", "sharegpt", "prompt_completion", "alpaca", "text")
COLUMNS = {"tokenized": ("input_ids",), "messages": ("messages",), "sharegpt": ("conversations",),
           "prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"), "text": ("text",)}
CHAT_FORMATS = ("messages", "sharegpt")
BATCH_SIZE = 1000


def detect_format(columns: Sequence[str], format: str = "auto") -> str:
    """The row format: given, or found from the columns (`input_ids`, `messages`, `conversations`,
    `prompt`+`completion`, `instruction`+`output`, `text`)."""
    if format == "auto":
        for name in FORMATS:
            if all(c in columns for c in COLUMNS[name]):
                return name
        raise KeyError(
            f"cannot tell the row format from the columns {sorted(columns)}: expected 'text', 'prompt' and "
            "'completion', 'messages', 'conversations' (ShareGPT), 'instruction' and 'output' (Alpaca), or "
            "'input_ids' (rename the columns, or name yours in the config fields text_column, prompt_column, "
            "completion_column or messages_column)"
        )
    if format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    missing = [c for c in COLUMNS[format] if c not in columns]
    if missing:
        raise KeyError(f"format={format!r} needs column(s) {missing}, but the dataset has {sorted(columns)}")
    return format


def tokenize_rows(rows: Sequence[Mapping[str, Any]], tokenizer: Any, format: str,
                  ignore_index: int = -100, lines: Sequence[int] | None = None) -> list[dict[str, list[int]]]:
    """Tokenize every row of `format`; wrong types or empty fields raise, naming the row (and its line in the file,
    given `lines`, each row's line number). Tokenized rows are returned as they are (the packer and collators
    validate their ids)."""
    if format == "tokenized":
        return rows
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; loss masking needs offset mappings, which only "
            "fast (Rust) tokenizers give: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    # Prompt/completion rows are conversational when the first one's prompt is a list of messages.
    chat = format in CHAT_FORMATS or (format == "prompt_completion" and len(rows) > 0 and isinstance(rows[0], Mapping)
                                      and isinstance(rows[0].get("prompt"), list))
    add_special = not chat  # a chat template writes its own special tokens
    eos = None if chat else tokenizer.eos_token_id
    if not chat and eos is None:
        # Without it the model would never learn where a text or completion ends, and would not stop generating.
        raise ValueError(
            f"the tokenizer has no eos token, and format {format!r} ends every row with eos so that the model learns "
            "to stop: set tokenizer.eos_token to the token that ends a text in its vocabulary (the one the model "
            "stops on), or give the rows already tokenized"
        )
    examples: list[dict[str, list[int]]] = []
    batch: list[tuple[str, list[tuple[int, int]]]] = []
    for index, row in enumerate(rows):
        batch.append(_render(row, row_label(index, lines), format, tokenizer, chat))
        if len(batch) == BATCH_SIZE:
            examples += _tokenize_batch(batch, tokenizer, add_special, eos, ignore_index, len(examples), lines)
            batch = []
    if batch:
        examples += _tokenize_batch(batch, tokenizer, add_special, eos, ignore_index, len(examples), lines)
    return examples


def _render(row: Mapping[str, Any], where: str, format: str, tokenizer: Any,
            chat: bool) -> tuple[str, list[tuple[int, int]]]:
    if not isinstance(row, Mapping):
        raise TypeError(f"{where} must be a dict of columns, got {type(row).__name__}")
    for column in COLUMNS[format]:
        if column not in row or row[column] is None:
            what = f"{where}: {column!r} is null" if column in row else f"{where} has no {column!r}"
            raise KeyError(f"{what} (format {format!r} needs {list(COLUMNS[format])})")
    if format in CHAT_FORMATS:
        column = COLUMNS[format][0]
        return render_chat(tokenizer, check_messages(row[column], where, column), where)
    if chat:  # conversational prompt/completion
        prompt = check_messages(row["prompt"], where, "prompt")
        return render_chat(tokenizer, prompt + check_messages(row["completion"], where, "completion"), where,
                           first=len(prompt))
    fields = [_text_field(row, column, where) for column in COLUMNS[format]]
    if format == "text":
        return fields[0], [(0, len(fields[0]))]
    prompt, completion = fields
    if format == "alpaca":
        prompt = alpaca_prompt(prompt, alpaca_input(row, where))
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))]


def _text_field(row: Mapping[str, Any], column: str, where: str) -> str:
    value = row[column]
    if isinstance(value, list) and column in ("prompt", "completion"):
        raise TypeError(f"{where}: {column!r} is a list, but the first row's prompt is a str: give every row's prompt "
                        "and completion as str, or every row's as a list of messages (conversational)")
    if not isinstance(value, str):
        raise TypeError(f"{where}: {column!r} must be a str, got {type(value).__name__} ({value!r:.60})")
    if not value:
        raise ValueError(f"{where}: {column!r} is empty; remove empty rows")
    return value


def _tokenize_batch(batch, tokenizer, add_special: bool, eos: int | None, ignore_index: int, first: int,
                    lines: Sequence[int] | None):
    """`batch` holds rows `first`, `first + 1`, ... (for the errors)."""
    try:
        encoded = tokenizer(
            [text for text, _ in batch], add_special_tokens=add_special, return_offsets_mapping=True,
            return_attention_mask=False,
        )
    except TypeError:
        _check_encodable(batch, first, lines)
        raise
    examples = []
    for (_, spans), ids, offsets in zip(batch, encoded["input_ids"], encoded["offset_mapping"]):
        labels = [t if any(a <= start < b for a, b in spans) else ignore_index for t, (start, _) in zip(ids, offsets)]
        # The model learns where a text or completion ends. A tokenizer that appends eos itself gives it the offsets
        # (0, 0), outside the completion's span, so its label is set here as well.
        if eos is not None and ids and ids[-1] == eos:
            labels[-1] = eos
        elif eos is not None:
            ids = [*ids, eos]
            labels = [*labels, eos]
        examples.append({"input_ids": list(ids), "labels": labels})
    return examples


def _check_encodable(batch, first: int, lines: Sequence[int] | None) -> None:
    # The Rust tokenizer refuses a str that is not valid Unicode with a TypeError that names neither the row nor the
    # cause; an unpaired surrogate (JSON's "\ud800" escape without its other half) is what makes one.
    for offset, (text, _) in enumerate(batch):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{row_label(first + offset, lines)}: an unpaired surrogate {text[e.start:e.end]!r} (character "
                f"{e.start} of the row as rendered) is not valid Unicode and cannot be tokenized; fix or remove the "
                "row (in JSON, a \\ud800-\\udfff escape must come in a pair)"
            ) from None
