"""Checkpoints: resuming continues with the losses of an uninterrupted run; a crash mid-write never leaves a
checkpoint that looks complete; Ctrl-C saves one before stopping."""

import dataclasses
import json
import signal

import pytest
import torch

from chronicals.training import ChronicalsTrainer, SetupError, checkpoint
from chronicals.training import trainer as trainer_module

from .helpers import config, rows, tiny_model, tokenizer


def _train(tmp_path, data, **changes):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, **changes))
    return trainer, trainer.train(data)


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    # 6 steps over 2 epochs (3 steps each), so resuming must also restore the data position within the order.
    data = rows(24)
    _, full = _train(tmp_path / "full", data, max_steps=6, batch_size=8, save_steps=0, lr_schedule="cosine",
                     warmup_steps=2)
    _, first = _train(tmp_path / "split", data, max_steps=6, batch_size=8, save_steps=2, save_total_limit=2,
                      warmup_steps=2)
    assert first.losses == full.losses  # same seed, same run
    saved = [p.name for p in checkpoint.list_checkpoints(tmp_path / "split" / "run")]
    assert saved == ["checkpoint-4", "checkpoint-6"]  # save_total_limit keeps the newest two
    _, resumed = _train(tmp_path / "split", data, max_steps=6, batch_size=8, warmup_steps=2,
                        resume_from_checkpoint=str(tmp_path / "split" / "run" / "checkpoint-4"))
    assert resumed.losses == full.losses[4:]
    metrics = [json.loads(line) for line in (tmp_path / "split" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]


def test_save_total_limit_keeps_the_run_s_own_checkpoints_beside_an_earlier_run_s(tmp_path):
    # A fresh run in an output_dir holding an earlier run's checkpoint-6: ranked by step with it, each checkpoint
    # just written was deleted at once and TrainResult.checkpoint named a directory that no longer existed.
    data = rows(16)
    _train(tmp_path, data, max_steps=6, batch_size=2, save_steps=6)
    _, second = _train(tmp_path, data, max_steps=3, batch_size=2, save_steps=1, save_total_limit=2)
    saved = [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")]
    assert saved == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]
    assert second.checkpoint == str(tmp_path / "run" / "checkpoint-3")


def test_a_fresh_run_warns_of_an_earlier_run_s_checkpoints(tmp_path, capsys):
    # resume_from_checkpoint=latest ranks checkpoints by step: an earlier run's higher step would win over this run's.
    data = rows(8)
    _train(tmp_path, data, max_steps=2, batch_size=2, save_steps=2)
    assert "already holds" not in capsys.readouterr().out
    _train(tmp_path, data, max_steps=1, batch_size=2)
    assert "already holds checkpoint-2 from an earlier run" in capsys.readouterr().out
    _train(tmp_path, data, max_steps=3, batch_size=2, resume_from_checkpoint="latest")
    assert "already holds" not in capsys.readouterr().out


def test_resuming_on_other_data_warns_that_the_batches_differ(tmp_path, capsys):
    # A checkpoint keeps its position in the epoch's batch order; resumed on other rows (another dataset, or the
    # same file read differently by a newer version), that position points into other batches, without a word.
    _train(tmp_path, rows(16), max_steps=4, batch_size=4, save_steps=2)
    checkpoint_2 = str(tmp_path / "run" / "checkpoint-2")
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["data"]
    assert saved["rows"] == 16 and saved["steps_per_epoch"] == 4 and 0 < saved["label_tokens"] < saved["tokens"]
    capsys.readouterr()
    _train(tmp_path, rows(16), max_steps=4, batch_size=4, resume_from_checkpoint=checkpoint_2)
    assert "other training data" not in capsys.readouterr().out
    _train(tmp_path, rows(16, seed=1), max_steps=4, batch_size=4, resume_from_checkpoint=checkpoint_2)
    out = capsys.readouterr().out
    assert "checkpoint-2 was saved with other training data or batch settings (tokens:" in out
    shuffled = rows(16)[::-1]  # the same rows in another order: every count agrees, the batches do not
    _train(tmp_path, shuffled, max_steps=4, batch_size=4, resume_from_checkpoint=checkpoint_2)
    out = capsys.readouterr().out
    assert "checkpoint-2 was saved with other training data or batch settings (digest:" in out


def test_resume_latest_and_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        checkpoint.resolve("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint directory"):
        checkpoint.resolve(str(tmp_path / "nope"), tmp_path)


def test_crash_mid_write_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    trainer, _ = _train(tmp_path, rows(8), max_steps=2, batch_size=4, save_steps=1)
    out = tmp_path / "run"
    assert checkpoint.find_latest(out).name == "checkpoint-2"
    real_save = torch.save

    def crash(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer._save({"step": 3, "epoch": 0, "step_in_epoch": 3})
    assert not (out / "checkpoint-3").exists()
    assert (out / ".checkpoint-3.tmp").exists()
    assert checkpoint.find_latest(out).name == "checkpoint-2"
    monkeypatch.setattr(torch, "save", real_save)
    trainer._save({"step": 3, "epoch": 0, "step_in_epoch": 3})  # the next save cleans the debris up
    assert checkpoint.find_latest(out).name == "checkpoint-3" and not (out / ".checkpoint-3.tmp").exists()


def test_checkpoint_holds_model_optimizer_scheduler_rng_and_position(tmp_path):
    _, result = _train(tmp_path, rows(8), max_steps=2, batch_size=4)
    path = tmp_path / "run" / "checkpoint-2"
    assert result.checkpoint == str(path)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pt",
            "trainer_state.json"} <= names
    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 1, 0)  # epoch 0 done: next is 1, 0
    # The full fine-tune's checkpoint loads with transformers as it is.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path)


def test_ctrl_c_finishes_the_step_saves_and_stops(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=6, batch_size=2))
    step = trainer._launch_step

    def interrupted_at_two(micro_batches, n, epoch):
        out = step(micro_batches, n, epoch)
        if n == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    trainer._launch_step = interrupted_at_two
    result = trainer.train(rows(16))
    assert result.interrupted and result.steps == 2
    assert checkpoint.find_latest(tmp_path / "run").name == "checkpoint-2"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_lora_checkpoint_is_a_peft_adapter_and_resumes_exactly(tmp_path):
    data = rows(16)
    lora = dict(use_lora=True, lora_rank=4, lora_alpha=8.0, learning_rate=5e-3, max_steps=4, batch_size=4)
    _, full = _train(tmp_path / "full", data, **lora)
    _, first = _train(tmp_path / "split", data, save_steps=2, **lora)
    ckpt = tmp_path / "split" / "run" / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json", "trainable.safetensors"} <= {
        p.name for p in ckpt.iterdir()}
    _, resumed = _train(tmp_path / "split", data, resume_from_checkpoint="latest", **lora)
    assert first.losses == full.losses
    # "latest" is checkpoint-4 (the end of the first run): nothing is left to train.
    assert resumed.losses == [] and resumed.steps == 4
    _, again = _train(tmp_path / "split", data, resume_from_checkpoint=str(ckpt), **lora)
    assert again.losses == full.losses[2:]


def test_resume_with_other_lora_settings_is_refused(tmp_path):
    data = rows(8)
    _train(tmp_path, data, max_steps=1, batch_size=4)
    with pytest.raises(ValueError, match="saved with different LoRA settings"):
        _train(tmp_path, data, max_steps=2, batch_size=4, use_lora=True, lora_rank=4, resume_from_checkpoint="latest")


def test_resume_with_other_batch_settings_is_refused_not_an_endless_loop(tmp_path):
    # The checkpoint's position (step 5 of an 8-step epoch) lies past the end of an epoch of batch_size=8 (2 steps):
    # the loop then found no step to run and went round forever, at full CPU, without a word.
    data = rows(16)
    _train(tmp_path, data, max_steps=5, batch_size=2)

    def endless(signum, frame):
        raise TimeoutError("the resumed run went round without training a step")

    previous = signal.signal(signal.SIGALRM, endless)
    signal.alarm(60)
    try:
        with pytest.raises(SetupError, match="batch_size: 2 -> 8"):
            _train(tmp_path, data, max_steps=8, batch_size=8, resume_from_checkpoint="latest")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("saved, resumed", [(dict(lora_rank=4), dict(lora_rank=8)), ({}, dict(lora_rank=4))],
                         ids=["other-rank", "full-then-lora"])
def test_resume_with_other_lora_shapes_is_a_setup_error(tmp_path, saved, resumed):
    # A checkpoint whose weights have other shapes (lora_rank 4 -> 8) failed in copy_ with a bare RuntimeError, and
    # the ValueErrors that name the cause escaped the CLI (which reports SetupError) as tracebacks.
    data = rows(8)
    _train(tmp_path, data, max_steps=1, batch_size=4, **{"use_lora": bool(saved), **saved})
    with pytest.raises(SetupError, match="resume with the same model and LoRA settings|different LoRA settings"):
        _train(tmp_path, data, max_steps=2, batch_size=4, use_lora=True, resume_from_checkpoint="latest", **resumed)


@pytest.mark.parametrize("resumed", [dict(lora_alpha=64.0), dict(use_rslora=True)], ids=["alpha", "rslora"])
def test_resume_with_another_lora_scale_is_a_setup_error(tmp_path, resumed):
    # lora_alpha and use_rslora change no weight's name or shape, so the adapters loaded and trained on at another
    # scale: the resumed model was not the saved one, silently.
    data = rows(8)
    _train(tmp_path, data, max_steps=1, batch_size=4, use_lora=True, lora_alpha=8.0)
    name = next(iter(resumed))
    with pytest.raises(SetupError, match=f"{name} .* \\(this config: .*resume with the values it was saved with"):
        _train(tmp_path, data, max_steps=2, batch_size=4, use_lora=True, resume_from_checkpoint="latest",
               **{"lora_alpha": 8.0, **resumed})
    _train(tmp_path, data, max_steps=2, batch_size=4, use_lora=True, lora_alpha=8.0, lora_dropout=0.1,
           resume_from_checkpoint="latest")  # dropout changes no weight's meaning: resumes


@pytest.mark.parametrize("saved", [True, False], ids=["8bit-then-plain", "plain-then-8bit"])
def test_resume_with_another_use_8bit_optimizer_is_a_setup_error(tmp_path, monkeypatch, saved):
    # 8-bit Adam's state (bitsandbytes' state1/state2) is not AdamW's (exp_avg/exp_avg_sq): a plain checkpoint
    # resumed with 8-bit Adam failed deep inside bitsandbytes at the first step, and an 8-bit one resumed without it
    # failed on the state's keys, neither naming the setting. bitsandbytes is CUDA-only, so on this CPU the
    # checkpoint's recorded config says what it was saved with and a fused AdamW stands in for 8-bit Adam.
    data = rows(8)
    _train(tmp_path, data, max_steps=1, batch_size=4)
    state_file = tmp_path / "run" / "checkpoint-1" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"]["use_8bit_optimizer"] = saved
    state_file.write_text(json.dumps(state))
    build = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer",
                        lambda model, cfg: build(model, dataclasses.replace(cfg, use_8bit_optimizer=False)))
    with pytest.raises(SetupError, match=f"checkpoint-1' was saved with use_8bit_optimizer {saved} \\(this config: "
                                         f"{not saved}\\).*resume with the value it was saved with"):
        _train(tmp_path, data, max_steps=2, batch_size=4, use_8bit_optimizer=not saved,
               resume_from_checkpoint="latest")
    _, resumed = _train(tmp_path, data, max_steps=2, batch_size=4, use_8bit_optimizer=saved,
                        resume_from_checkpoint="latest")  # the value it was saved with: resumes
    assert resumed.steps == 2


def test_resume_with_another_learning_rate_says_the_checkpoint_s_is_kept_and_logs_it(tmp_path, capsys):
    # The optimizer and scheduler state restore the saved lr and weight_decay (as in HF Trainer), but nothing said so
    # and metrics.jsonl logged the new learning_rate's schedule while the old one trained.
    data = rows(16)
    _train(tmp_path, data, max_steps=2, batch_size=4, lr_schedule="constant", learning_rate=1e-2)
    capsys.readouterr()
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(
        tmp_path, max_steps=4, batch_size=4, lr_schedule="constant", learning_rate=1e-3, weight_decay=0.5,
        resume_from_checkpoint="latest"))
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    trainer.train(data)
    out = capsys.readouterr().out
    assert "saved with learning_rate 0.01 (this config: 0.001), weight_decay 0.0 (this config: 0.5)" in out
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert applied == [0.01, 0.01] and logged == [0.01] * 4
    # Resumed again with the same new values: checkpoint-4 recorded learning_rate 0.001, what the config said, so
    # this resume kept 0.01 without a word and logged 0.001.
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(
        tmp_path, max_steps=5, batch_size=4, lr_schedule="constant", learning_rate=1e-3, weight_decay=0.5,
        resume_from_checkpoint="latest"))
    trainer.train(data)
    assert "saved with learning_rate 0.01 (this config: 0.001)" in capsys.readouterr().out
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0.01] * 5


def test_a_full_fine_tune_with_frozen_weights_saves_checkpoints_that_load_with_from_pretrained(tmp_path):
    # Freezing the embeddings of a full fine-tune made the checkpoint keep only the trainable weights
    # (trainable.safetensors, for resuming) beside config.json: from_pretrained found no model.safetensors in it.
    from transformers import AutoModelForCausalLM

    def frozen():
        model = tiny_model()
        model.model.embed_tokens.weight.requires_grad_(False)
        return model

    data = rows(16)
    full = ChronicalsTrainer(frozen(), tokenizer(), config(tmp_path / "full", max_steps=4, lr_schedule="constant"))
    full = full.train(data)
    trainer = ChronicalsTrainer(frozen(), tokenizer(), config(tmp_path, max_steps=2, lr_schedule="constant"))
    path = trainer.train(data).checkpoint
    x = torch.tensor([[5, 6, 7, 8]])
    trainer.model.eval()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, trainer.model(input_ids=x).logits)
    resumed = ChronicalsTrainer(frozen(), tokenizer(), config(tmp_path, max_steps=4, lr_schedule="constant",
                                                              resume_from_checkpoint=path))
    assert resumed.train(data).losses == full.losses[2:]


def test_final_replaces_an_earlier_run_s_final_not_mixes_with_it(tmp_path):
    # A full fine-tune saved into the final/ of an earlier LoRA run in the same output_dir kept that run's
    # adapter_config.json beside its model.safetensors, and from_pretrained(final) applied the stale adapter.
    from transformers import AutoModelForCausalLM

    _train(tmp_path, rows(8), max_steps=1, use_lora=True, lora_rank=4, lora_target_modules=["q_proj"],
           save_final_model=True)
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    trainer, result = _train(tmp_path, rows(8), max_steps=1, save_final_model=True)
    final = tmp_path / "run" / "final"
    assert result.final_model == str(final) and not list(final.glob("adapter*"))
    assert not (tmp_path / "run" / ".final.tmp").exists()
    x = torch.tensor([[5, 6, 7, 8]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=x).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(final)(input_ids=x).logits, expected)


def test_checkpoints_hold_the_tokenizer_and_a_resume_past_the_end_says_so(tmp_path, capsys):
    # A checkpoint held no tokenizer (HF Trainer's do), so it did not load on its own; and resuming a checkpoint at or
    # past this run's last step trained nothing and re-saved it without a word.
    from transformers import AutoTokenizer

    from chronicals.data import default_tokenizer

    tok = default_tokenizer()
    data = rows(8)
    path = ChronicalsTrainer(tiny_model(), tok, config(tmp_path, max_steps=2, batch_size=4)).train(data).checkpoint
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded("a checkpoint's tokenizer")["input_ids"] == tok("a checkpoint's tokenizer")["input_ids"]
    capsys.readouterr()
    result = ChronicalsTrainer(tiny_model(), tok, config(tmp_path, max_steps=2, batch_size=4,
                                                         resume_from_checkpoint="latest")).train(data)
    assert result.losses == [] and "is at step 2, and this run trains 2 steps" in capsys.readouterr().out
