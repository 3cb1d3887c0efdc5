"""The evaluation loop: `eval_dataset` is scored every `eval_steps` and at the end, `evaluate()` on demand. Its loss
is the mean over every label token of the data (not a mean of batch means), the same in packed and padded batches,
and evaluating changes nothing about the training around it."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from chronicals.config import ConfigError
from chronicals.training import ChronicalsTrainer, DataError, SetupError

from .helpers import config, rows, tiny_model, tokenizer


def _reference_loss(model, eval_rows) -> tuple[float, int]:
    """Mean next-token loss over every label token, one row at a time, from the model's own logits."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in eval_rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(r["labels"][1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count, count


def tiny_model_like(trainer):
    """An unpatched copy of the trained weights: the reference runs HF's own forward."""
    model = tiny_model()
    model.load_state_dict(trainer.model.state_dict())
    return model


@pytest.mark.parametrize("packing, fused", [(False, False), (True, False), (True, True)],
                         ids=["padded", "packed", "packed-fused-kernels"])
def test_the_eval_loss_is_the_mean_over_every_label_token(tmp_path, packing, fused):
    # 11 rows in micro-batches of 4: batches of 4, 4 and 3 rows holding different numbers of label tokens, so a mean
    # of the batches' means would differ from the mean over tokens.
    eval_rows = rows(11, seed=1)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(),
                                config(tmp_path, use_sequence_packing=packing, use_fused_kernels=fused))
    trainer.train(rows())
    got = trainer.evaluate(eval_rows)
    expected, count = _reference_loss(tiny_model_like(trainer), eval_rows)
    assert got["eval_tokens"] == count
    assert got["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert trainer.model.training  # back in training mode


def test_eval_steps_log_rows_and_the_result_holds_the_last(tmp_path):
    cfg = config(tmp_path, max_steps=5, eval_steps=2)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), cfg)
    result = trainer.train(rows(), eval_dataset=rows(6, seed=2))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps, and after the last
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5]
    assert result.eval_metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]  # the model moved between them
    assert trainer.evaluate(rows(6, seed=2))["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)


def test_evaluating_does_not_change_the_training(tmp_path):
    # Dropout on: an evaluation that drew from the random generators, or left the model in eval mode, would change
    # the following steps' losses.
    with_dropout = dict(use_lora=True, lora_rank=4, lora_dropout=0.3)
    a = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path / "a", **with_dropout)).train(rows()).losses
    b = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path / "b", eval_steps=1, **with_dropout)).train(
        rows(), eval_dataset=rows(5, seed=3)).losses
    assert a == b


def test_the_config_names_eval_dataset_and_eval_steps(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, eval_steps=2))
    with pytest.raises(SetupError, match="'eval_steps' is 2 but there is no evaluation data; set eval_dataset"):
        trainer.train(rows())
    with pytest.raises(SetupError, match="evaluate\\(\\) was given no data and config field 'eval_dataset' is null"):
        trainer.evaluate()
    with pytest.raises(ConfigError, match="'eval_steps' is -1"):
        config(tmp_path, eval_steps=-1)
    with pytest.raises(ConfigError, match="'eval_dataset'"):
        config(tmp_path, eval_dataset=" ")
    with pytest.raises(ConfigError, match="'eval_strategy'.*set 'eval_dataset'"):
        type(config(tmp_path)).from_dict({"eval_strategy": "steps"})


def test_eval_data_without_labels_or_with_unknown_tokens_is_refused(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path))
    unlabelled = [{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])} for r in rows(3)]
    with pytest.raises(DataError, match="^evaluation data list: none of the 3 sequences has a label token"):
        trainer.evaluate(unlabelled)
    with pytest.raises(DataError, match="token id 500"):
        trainer.evaluate([{"input_ids": [2, 3, 500], "labels": [2, 3, 500]}])
    with pytest.raises(DataError, match="^evaluation data 'no/such/file.jsonl'"):
        trainer.evaluate("no/such/file.jsonl")


def test_the_config_eval_dataset_is_read_like_dataset(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(4, seed=4)))
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, eval_dataset=str(path)))
    result = trainer.train(rows())
    assert result.eval_metrics["eval_loss"] == pytest.approx(trainer.evaluate(rows(4, seed=4))["eval_loss"], rel=1e-6)


def test_a_failing_evaluation_loses_no_training(tmp_path, monkeypatch):
    # The checkpoint of a step is written before that step's evaluation: an evaluation that fails (out of memory, say)
    # leaves the run resumable from it.
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=4, save_steps=2, eval_steps=2))

    def out_of_memory(data):
        raise torch.OutOfMemoryError("evaluation")

    monkeypatch.setattr(trainer, "_evaluate", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train(rows(), eval_dataset=rows(3, seed=5))
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
