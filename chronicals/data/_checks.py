"""Argument checks shared by the data layer: each error names the argument and says what to pass instead."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    # bool is an int subclass; True as a length or token id is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_padding_token_id(value: Any) -> int:
    if value is None:
        raise ValueError(
            "padding_token_id is None: the tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` "
            "(or add a pad token) and pass `padding_token_id=tokenizer.pad_token_id`"
        )
    return check_int("padding_token_id", value, minimum=0)
