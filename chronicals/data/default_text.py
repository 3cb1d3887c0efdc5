"""The embedded default dataset: real English prose that ships with CPython (`pydoc_data.topics`, the text of the
language reference behind `help()`), cut into paragraph-aligned chunks. No download, so the main job runs anywhere."""

from __future__ import annotations

from ._checks import check_int


def default_texts(max_chars: int = 2000) -> list[str]:
    """Chunks of at most `max_chars` characters (one over-long line may be cut mid-line), topic by topic, in the
    topics' shipped order. The same Python version always gives the same chunks."""
    check_int("max_chars", max_chars, minimum=64)
    from pydoc_data.topics import topics

    chunks: list[str] = []
    for name in topics:
        chunks += _chunk(topics[name], max_chars)
    return chunks


def default_dataset(max_chars: int = 2000) -> list[dict[str, str]]:
    """The default training rows, `{"text": ...}`: about 300 chunks (~465 KB) of the Python language reference."""
    return [{"text": text} for text in default_texts(max_chars)]


def _chunk(text: str, max_chars: int) -> list[str]:
    # Paragraphs are joined greedily up to max_chars; a paragraph too long on its own is cut at line ends, and a
    # line too long on its own at max_chars.
    pieces: list[str] = []
    for paragraph in text.strip().split("\n\n"):
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for line in paragraph.split("\n"):
            pieces += [line[s : s + max_chars] for s in range(0, max(len(line), 1), max_chars)]
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if not piece.strip():
            continue
        joined = f"{current}\n\n{piece}" if current else piece
        if len(joined) <= max_chars:
            current = joined
        else:
            chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks
