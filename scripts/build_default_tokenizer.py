"""Build the embedded default tokenizer once: a byte-level BPE trained on `pydoc_data.topics` (CPython's own prose),
saved under chronicals/data/assets/ and loaded offline by `chronicals.data.default_tokenizer()`.

    python scripts/build_default_tokenizer.py [--vocab-size 4096] [--out chronicals/data/assets]

Byte-level means any text, in any script, tokenizes without unknown tokens. The chat template is ChatML-style
(<|im_start|>role ... <|im_end|>) so the chat-format path and its assistant-only loss work with the default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chronicals.data.default_text import default_texts

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(default_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "chronicals/data/assets")
    args = parser.parse_args()
    tokenizer = build(args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
