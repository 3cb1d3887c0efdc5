"""A NaN/inf loss stops the run naming the step and keeping the last good checkpoint, or skips the step."""

import json

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


def _trainer(tmp_path, run_ahead: bool, **changes):
    """A trainer whose loss and gradient norm are read one step late (run_ahead, the default with fused AdamW on one
    process and a CUDA device; forced here on the CPU, where every op has run when the late read comes) or at each
    step's end."""
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, **changes))
    trainer._can_run_ahead = lambda: run_ahead
    return trainer


def _weights_after_each_launch(trainer) -> list:
    """The trainable weights as they stand when each step is launched (the previous steps' updates applied)."""
    seen = []
    launch = trainer._launch_step

    def record(micro_batches, n, epoch):
        seen.append([p.detach().clone() for p in trainer.trainable])
        return launch(micro_batches, n, epoch)

    trainer._launch_step = record
    return seen


@pytest.mark.parametrize("run_ahead", [True, False])
def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, run_ahead):
    trainer = _trainer(tmp_path, run_ahead, max_steps=5, batch_size=4, save_steps=2)
    _poison_step(trainer, 3)
    seen = _weights_after_each_launch(trainer)
    with pytest.raises(NonFiniteError, match=r"step 3: loss nan.*checkpoint-2"):
        trainer.train(rows(20))
    assert trainer._run_ahead is run_ahead
    out = tmp_path / "run"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    # Stopped with the weights of step 2, the last good one: step 3's update was never applied (skipped on the
    # device under run-ahead), and neither was step 4's, launched before step 3's values were read.
    assert all(torch.equal(a, p) for a, p in zip(seen[2], trainer.trainable))
    assert all(p.grad is None for p in trainer.trainable)


@pytest.mark.parametrize("run_ahead", [True, False])
def test_nan_skip_leaves_the_weights_unchanged_and_continues(tmp_path, run_ahead):
    trainer = _trainer(tmp_path, run_ahead, max_steps=3, batch_size=4, on_nonfinite="skip")
    _poison_step(trainer, 2)
    seen = _weights_after_each_launch(trainer)
    result = trainer.train(rows(16))
    assert trainer._run_ahead is run_ahead
    assert result.steps == 3
    seen.append(list(trainer.trainable))
    moved = [not all(torch.equal(a, b) for a, b in zip(before, after)) for before, after in zip(seen, seen[1:])]
    assert moved == [True, False, True]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped"] for row in logged if "loss" in row] == [False, True, False]


@pytest.mark.parametrize("skip", [False, True])
def test_reading_the_loss_a_step_late_trains_the_same_steps(tmp_path, skip):
    # Run-ahead changes when the host reads (loss, grad norm), never what is trained: the same losses, gradient
    # norms, learning rates and final weights as reading them at each step's end, with a skipped step or without.
    runs = []
    for run_ahead in (True, False):
        trainer = _trainer(tmp_path / str(run_ahead), run_ahead, max_steps=5, batch_size=2, on_nonfinite="skip",
                           warmup_steps=2)
        if skip:
            _poison_step(trainer, 3)
        result = trainer.train(rows(16))
        logged = [json.loads(line) for line in (tmp_path / str(run_ahead) / "run" / "metrics.jsonl")
                  .read_text().splitlines()]
        runs.append((result.losses, [(r["step"], r["grad_norm"], r["lr"], r["skipped"]) for r in logged if "loss" in r],
                     [p.detach().clone() for p in trainer.trainable]))
    (losses_a, rows_a, weights_a), (losses_b, rows_b, weights_b) = runs
    assert len(losses_a) == 5
    assert str(losses_a) == str(losses_b)  # NaN included
    assert str(rows_a) == str(rows_b)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))


def test_a_step_without_label_tokens_is_an_error(tmp_path):
    from chronicals.training import DataError

    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path))
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.full((1, 3), -100), "num_label_tokens": 0}
    with pytest.raises(DataError, match="step 7 has no label tokens"):
        trainer._launch_step([batch], 7, 0)


def test_a_step_the_grad_scaler_skips_is_logged_as_skipped(tmp_path):
    # fp16's GradScaler skips an update whose gradients overflowed by itself (a finite loss, so not a non-finite
    # step of ours): the step must be logged as skipped and leave the weights. A CPU GradScaler stands in for fp16's
    # CUDA one; an inf planted in one gradient at step 2 stands in for the overflow.
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=3, batch_size=4))
    trainer.scaler = torch.amp.GradScaler("cpu")
    calls = {"n": 0}
    first = trainer.trainable[0]

    def overflow(grad):
        calls["n"] += 1
        return grad.clone().fill_(float("inf")) if calls["n"] == 2 else grad

    first.register_hook(overflow)
    seen = _weights_after_each_launch(trainer)
    trainer.train(rows(12))
    assert not trainer._run_ahead
    seen.append(list(trainer.trainable))
    moved = [not all(torch.equal(a, b) for a, b in zip(before, after)) for before, after in zip(seen, seen[1:])]
    assert moved == [True, False, True]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped"] for row in logged if "loss" in row] == [False, True, False]
