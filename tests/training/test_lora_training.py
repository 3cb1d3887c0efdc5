"""LoRA through the trainer: adapter placements and optimizer settings beyond the default projections."""

import json

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


def test_lora_plus_logs_the_configured_learning_rate_and_runs_b_at_the_ratio(tmp_path):
    # The logged lr was the first parameter group's, LoRA+'s B matrices at lora_plus_ratio x learning_rate.
    cfg = config(tmp_path, use_lora=True, use_lora_plus=True, lora_plus_ratio=8.0, lora_rank=4, learning_rate=1e-3,
                 warmup_steps=2, lr_schedule="constant", max_steps=3)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), cfg)
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append({g["name"]: g["lr"] for g in opt.param_groups}))
    trainer.train(rows(8))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3])
    assert [s["default"] for s in seen] == pytest.approx(logged)
    assert [s["lora_B"] for s in seen] == pytest.approx([8 * lr for lr in logged])


def test_dora_and_rslora_from_the_config_train_and_export_for_peft(tmp_path):
    # use_dora / use_rslora were LoRAConfig fields the trainer could not reach; the exported adapter must carry them,
    # so PEFT rebuilds the same model (a DoRA magnitude, the rsLoRA scale) from the directory alone.
    import torch
    from peft import PeftModel

    cfg = config(tmp_path, use_lora=True, use_dora=True, use_rslora=True, lora_rank=4, lora_alpha=8.0, max_steps=3,
                 save_final_model=True)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), cfg)
    result = trainer.train(rows(8))
    assert len(result.losses) == 3
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["use_rslora"] is True
    magnitudes = [n for n, p in trainer.model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert magnitudes
    loaded = PeftModel.from_pretrained(tiny_model(), result.final_model).eval()
    ids = torch.tensor([[3, 7, 11, 19, 23]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


@pytest.mark.parametrize("field", ["use_dora", "use_rslora"])
def test_dora_and_rslora_without_lora_are_config_errors(tmp_path, field):
    from chronicals.config import ConfigError

    with pytest.raises(ConfigError, match=f"'{field}' is true but 'use_lora' is false"):
        config(tmp_path, **{field: True})
