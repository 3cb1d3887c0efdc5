"""A NaN/inf loss stops the run naming the step and keeping the last good checkpoint, or skips the step."""

import pytest
import torch

from chronicals.training import ChronicalsTrainer, NonFiniteError, checkpoint

from .helpers import config, rows, tiny_model, tokenizer


def _poison_step(trainer, bad_step):
    """The forward pass returns a NaN loss on optimizer step `bad_step` (1-based)."""
    model = trainer.forward_model
    calls = {"n": 0}

    def forward(**batch):
        calls["n"] += 1
        out = model(**batch)
        if calls["n"] == bad_step:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward_model = forward


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=4, batch_size=4, save_steps=2))
    _poison_step(trainer, 3)
    with pytest.raises(NonFiniteError, match=r"step 3: loss nan.*checkpoint-2"):
        trainer.train(rows(16))
    out = tmp_path / "run"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]


def test_nan_skip_leaves_the_weights_unchanged_and_continues(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(),
                                config(tmp_path, max_steps=3, batch_size=4, on_nonfinite="skip"))
    _poison_step(trainer, 2)
    seen = []
    step = trainer._train_step

    def record(micro_batches, n):
        before = [p.detach().clone() for p in trainer.trainable]
        out = step(micro_batches, n)
        seen.append((out["skipped"], all(torch.equal(a, p) for a, p in zip(before, trainer.trainable))))
        return out

    trainer._train_step = record
    result = trainer.train(rows(16))
    assert result.steps == 3
    assert seen == [(False, False), (True, True), (False, False)]


def test_a_step_without_label_tokens_is_an_error(tmp_path):
    from chronicals.training import DataError

    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path))
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.full((1, 3), -100), "num_label_tokens": 0}
    with pytest.raises(DataError, match="step 7 has no label tokens"):
        trainer._train_step([batch], 7)
