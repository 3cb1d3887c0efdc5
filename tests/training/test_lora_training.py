"""LoRA through the trainer: adapter placements and optimizer settings beyond the default projections."""

import pytest

from chronicals.training import ChronicalsTrainer, DataError

from .helpers import VOCAB, config, rows, tiny_model, tokenizer


def test_lora_on_the_embedding_trains_and_still_checks_token_ids(tmp_path):
    # PEFT wraps embed_tokens in a layer without num_embeddings; the token-id check read it and crashed.
    cfg = config(tmp_path, use_lora=True, lora_rank=4, lora_target_modules=["embed_tokens", "q_proj"], max_steps=2)
    assert len(ChronicalsTrainer(tiny_model(), tokenizer(), cfg).train(rows(8)).losses) == 2
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path / "bad", **{
        k: getattr(cfg, k) for k in ("use_lora", "lora_rank", "lora_target_modules")}))
    with pytest.raises(DataError, match=f"token id {VOCAB} but the model's embedding has only {VOCAB} rows"):
        trainer.train([{"input_ids": [3, 4, VOCAB, 5]}])
