"""Small shared pieces for the trainer tests: a tiny model, a stand-in tokenizer and tokenized rows."""

from __future__ import annotations

import random
from types import SimpleNamespace

from chronicals.config import ChronicalsConfig
from chronicals.models import build_model

VOCAB = 96


def tiny_model(seed: int = 0):
    # A 2-layer Llama shape with a small vocabulary keeps a CPU step in the milliseconds.
    return build_model("tiny-llama", seed=seed, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1)


def tokenizer():
    return SimpleNamespace(pad_token_id=0, eos_token_id=1)


def rows(n: int = 16, seed: int = 0, min_len: int = 5, max_len: int = 23, prompt_masked: bool = True):
    """Tokenized rows of varied lengths; with `prompt_masked`, a varied prefix of each carries no loss, so
    micro-batches hold different numbers of label tokens (what makes per-micro-batch means differ)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(2, VOCAB) for _ in range(length)]
        cut = rng.randint(1, length - 2) if prompt_masked else 0
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def config(tmp_path, **changes) -> ChronicalsConfig:
    values = dict(model="tiny-llama", output_dir=str(tmp_path / "run"), learning_rate=1e-2, batch_size=4,
                  max_steps=4, max_seq_length=32, use_fused_kernels=False, use_sequence_packing=False,
                  progress_bar=False, logging_steps=1000, mixed_precision="no", device="cpu", seed=0,
                  save_final_model=False)
    values.update(changes)
    return ChronicalsConfig(**values)
