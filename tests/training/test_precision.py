"""Weight precision: param_dtype: auto trains on fp32 master weights whatever dtype the model arrives in."""

import torch

from chronicals.training import ChronicalsTrainer

from .helpers import config, rows, tiny_model, tokenizer


def test_a_model_loaded_in_bf16_trains_on_fp32_master_weights(tmp_path):
    # from_pretrained(..., dtype=torch.bfloat16) is the usual way to load a model; its trainable weights stayed bf16,
    # so every AdamW update was rounded to bf16 (what only param_dtype: bfloat16 is documented to do).
    trainer = ChronicalsTrainer(tiny_model().to(torch.bfloat16), tokenizer(), config(tmp_path, max_steps=2))
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    result = trainer.train(rows(8))
    assert all(torch.isfinite(torch.tensor(result.losses)))
