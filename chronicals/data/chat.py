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
# ShareGPT turns (`{"from", "value"}`) -> roles. Its names are refused in a `role`, where a template would render them
# verbatim ("<|im_start|>gpt") and no turn would be trained.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}


def check_messages(messages: Any, where: str, column: str = "messages") -> list[dict[str, Any]]:
    """The conversation as `{"role", "content"}` dicts, or an error naming the row, turn and fix. ShareGPT turns
    (`{"from", "value"}`) are mapped to roles, and a content given as a list of `{"type": "text", "text"}` parts is
    joined into one string."""
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"{where}: {column!r} must be a non-empty list of {{'role', 'content'}} dicts, "
                        f"got {type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    return [_message(message, f"{where}: {column}[{turn}]") for turn, message in enumerate(messages)]


def _message(message: Any, where: str) -> dict[str, Any]:
    field = "content"  # the name the row gives the turn's text, for the errors
    if isinstance(message, Mapping) and message.get("role") is None and isinstance(message.get("from"), str):
        if message["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"{where}['from'] is {message['from']!r}; ShareGPT turns must be from one of "
                             f"{', '.join(map(repr, SHAREGPT_ROLES))}: rename it")
        rest = {k: v for k, v in message.items() if k not in ("from", "value")}
        message = {**rest, "role": SHAREGPT_ROLES[message["from"]], "content": message.get("value")}
        field = "value"
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise TypeError(f"{where} must be a dict with a str 'role' and a str 'content' (or ShareGPT's 'from' and "
                        "'value')")
    role, content = message["role"], message.get("content")
    if role not in ROLES_TRAINED and role.strip().lower() in ROLES_TRAINED:
        # Roles match exactly (as chat templates compare them), so 'Assistant' would train nothing, silently.
        raise ValueError(f"{where}['role'] is {role!r}; the loss is taken on turns whose role is exactly "
                         f"{ROLES_TRAINED[0]!r}: rename the role")
    if role.strip().lower() in ("human", "gpt"):  # any case: a template renders 'GPT' verbatim too
        raise ValueError(f"{where}['role'] is {role!r}, a ShareGPT name: use 'user' and 'assistant' (or give the "
                         "turns as {'from', 'value'} dicts, which are mapped)")
    if isinstance(content, list):
        content = _joined_parts(content, f"{where}[{field!r}]")
    if not isinstance(content, str):
        hint = "; tool calls are not supported, give the call as text" if message.get("tool_calls") else ""
        raise TypeError(f"{where}[{field!r}] must be a str, got {type(content).__name__}{hint}")
    return {**message, "content": content}


def _joined_parts(parts: list[Any], where: str) -> str:
    # OpenAI / TRL multimodal layout, [{"type": "text", "text": ...}, ...]: text-only models take the text, in order.
    texts = []
    for index, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise TypeError(f"{where}[{index}] is a {kind!r} part; only {{'type': 'text', 'text': str}} "
                            "parts can be trained on (a text-only model): remove the others")
        texts.append(part["text"])
    return "".join(texts)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str,
                first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns from turn `first` on (a
    conversational completion's, after its prompt), except those with `"weight": 0` (axolotl's ShareGPT mark for a
    turn not to train on)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat_template, so chat rows ('messages', ShareGPT 'conversations', or 'prompt' and "
            "'completion' as lists of messages) cannot be rendered; set tokenizer.chat_template or give rows as "
            "'text' or as 'prompt'/'completion' strings"
        )
    full = _render(tokenizer, messages, False, where)
    spans = []
    for turn, message in enumerate(messages):
        if turn < first or message["role"] not in ROLES_TRAINED or message.get("weight") == 0:
            continue
        if turn:
            context = _render(tokenizer, messages[:turn], True, where)
        else:
            context = _opening(tokenizer, message, where)
        through = _render(tokenizer, messages[: turn + 1], False, where)
        if not (through.startswith(context) and full.startswith(through)):
            raise ValueError(
                f"{where}: the chat template is not prefix-stable (rendering the first {turn + 1} messages is not "
                "a prefix of rendering them all), so the assistant tokens cannot be located; use a template that "
                "renders earlier turns unchanged, or pre-render the rows as 'prompt'/'completion'"
            )
        spans.append((len(context), len(through)))
    return full, spans


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        # A template's own raise_exception (Gemma's and Mistral's refuse a system turn; others turns that do not
        # alternate user/assistant) is a jinja2 error, outside ValueError: name the row and the way out.
        if not type(e).__module__.startswith("jinja2"):
            raise
        if type(e).__name__ == "TemplateSyntaxError":  # the template itself is broken, whatever the row
            raise ValueError(f"{where}: the tokenizer's chat template does not parse ({e}); fix "
                             "tokenizer.chat_template or use a tokenizer with a working one") from e
        raise ValueError(f"{where}: the tokenizer's chat template refused this conversation ({e}); change the row "
                         "(merge a system turn into the first user turn, make user and assistant turns alternate) "
                         "or use a tokenizer whose template accepts it") from e


def _opening(tokenizer: Any, message: dict[str, str], where: str) -> str:
    # What the template writes before a reply that opens the conversation (a default system prompt, the assistant
    # header), which must not count as the reply. Transformers refuses to render an empty conversation, so the
    # reply is rendered with a marker for its content and the text before the marker is taken.
    marker = "\x00chronicals-reply\x00"
    rendered = _render(tokenizer, [{**message, "content": marker}], False, where)
    if marker not in rendered:
        raise ValueError(f"{where}: the chat template does not render an assistant message's content verbatim, "
                         "so the opening reply's tokens cannot be located")
    return rendered[: rendered.index(marker)]
