"""Small shared pieces for the data tests."""

IGNORE = -100


def trained_text(tok, example):
    """The text of the tokens an example trains on (labels that are not ignored)."""
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])
