"""Chat rows: render `messages` through the tokenizer's own chat template and find where each assistant turn sits
in the rendered text, so that the loss is taken on assistant tokens only.

Any template works, with or without `{% generation %}` markers: the text of the first k messages rendered with the
generation prompt is the context an assistant reply k is conditioned on, and the text of the first k+1 messages
ends with that reply (including the template's end-of-turn marker, which the model must learn to emit). This needs
the template to be prefix-stable (rendering a conversation's beginning is a prefix of rendering all of it); a
template that rewrites earlier turns is reported, not silently mis-masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES_TRAINED = ("assistant",)


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts, "
                        f"got {type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    for turn, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TypeError(f"{where}: messages[{turn}] must be a dict with a str 'role' and a str 'content'")
        if not isinstance(message.get("content"), str):
            raise TypeError(
                f"{where}: messages[{turn}]['content'] must be a str, got {type(message.get('content')).__name__}"
            )
        role = message["role"]
        if role not in ROLES_TRAINED and role.strip().lower() in ROLES_TRAINED:
            # Roles match exactly (as chat templates compare them), so 'Assistant' would train nothing, silently.
            raise ValueError(f"{where}: messages[{turn}]['role'] is {role!r}; the loss is taken on turns whose role is "
                             f"exactly {ROLES_TRAINED[0]!r}: rename the role")
    return [dict(m) for m in messages]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat_template, so 'messages' rows cannot be rendered; set tokenizer.chat_template "
            "or give rows as 'text' or 'prompt'/'completion'"
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] not in ROLES_TRAINED:
            continue
        if turn:
            context = _render(tokenizer, messages[:turn], add_generation_prompt=True)
        else:
            context = _opening(tokenizer, message, where)
        through = _render(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if not (through.startswith(context) and full.startswith(through)):
            raise ValueError(
                f"{where}: the chat template is not prefix-stable (rendering the first {turn + 1} messages is not "
                "a prefix of rendering them all), so the assistant tokens cannot be located; use a template that "
                "renders earlier turns unchanged, or pre-render the rows as 'prompt'/'completion'"
            )
        spans.append((len(context), len(through)))
    return full, spans


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _opening(tokenizer: Any, message: dict[str, str], where: str) -> str:
    # What the template writes before a reply that opens the conversation (a default system prompt, the assistant
    # header), which must not count as the reply. Transformers refuses to render an empty conversation, so the
    # reply is rendered with a marker for its content and the text before the marker is taken.
    marker = "\x00chronicals-reply\x00"
    rendered = _render(tokenizer, [{**message, "content": marker}], add_generation_prompt=False)
    if marker not in rendered:
        raise ValueError(f"{where}: the chat template does not render an assistant message's content verbatim, "
                         "so the opening reply's tokens cannot be located")
    return rendered[: rendered.index(marker)]
