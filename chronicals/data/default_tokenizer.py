"""The embedded default tokenizer: a 4096-token byte-level BPE trained on CPython's own prose, shipped under
assets/ (built by scripts/build_default_tokenizer.py) and loaded offline."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def default_tokenizer():
    """A `PreTrainedTokenizerFast` with eos `<|endoftext|>`, pad `<|pad|>` and a ChatML-style chat template
    (`<|im_start|>role\\n...<|im_end|>\\n`). Build a model for it with `vocab_size=len(tokenizer)`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(ASSETS), local_files_only=True)
