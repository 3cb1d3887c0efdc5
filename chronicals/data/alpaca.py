"""Alpaca rows (`instruction`, an optional `input`, `output`) as prompt/completion text, in Stanford Alpaca's two
prompts (with and without an input) as axolotl's `alpaca` type writes them, ending in "### Response:" and a newline;
the loss is on the output (and the eos after it) only. Prompt the trained model the same way:
`alpaca_prompt(instruction, input)`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt an Alpaca row's output follows; an empty or missing input takes the shorter, no-input wording."""
    return PROMPT.format(instruction=instruction, input=input) if input else PROMPT_NO_INPUT.format(
        instruction=instruction)


def alpaca_input(row: Mapping[str, Any], where: str) -> str | None:
    value = row.get("input")
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{where}: 'input' must be a str (or empty, or missing), got {type(value).__name__}")
    return value
