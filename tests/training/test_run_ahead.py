"""The trainer reads each step's (loss, grad norm) one step late where the optimizer can skip a non-finite step on
the device (PyTorch's fused AdamW, one process, no fp16 GradScaler, a CUDA device: the CPU tests force it), so the
host runs ahead of the GPU; a packed batch's layout then stays on the host, where the patched model validates it
without a device sync. What such runs train is pinned in test_nonfinite.py (the same steps, losses and weights as
reading at each step's end)."""

import json
import signal

import pytest
import torch

from chronicals.training import ChronicalsTrainer
from chronicals.training import trainer as trainer_module

from .helpers import config, rows, tiny_model, tokenizer

LAYOUT = ("cu_seq_lens_q", "cu_seq_lens_k", "position_ids")


def test_run_ahead_needs_a_cuda_device_and_an_optimizer_that_skips_on_it(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path))
    assert not trainer._can_run_ahead()  # a CPU runs every op when called: nothing to run ahead of
    trainer.device = torch.device("cuda")  # the decision reads the device's type only
    assert trainer._can_run_ahead()  # the default: FusedAdamW, fused
    trainer.optimizer.param_groups[0]["fused"] = None  # the foreach implementation has no found_inf
    assert not trainer._can_run_ahead()
    trainer.optimizer.param_groups[0]["fused"] = True
    trainer.scaler = object()  # fp16's GradScaler reads its own overflow flags
    assert not trainer._can_run_ahead()


def test_a_packed_batchs_layout_stays_on_the_host_under_run_ahead(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, use_sequence_packing=True))
    trainer.device = torch.device("meta")  # stands in for the GPU: what _to_device moves lands there
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    mb = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long),
          "position_ids": torch.tensor([[0, 1, 0, 1]]), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 2}
    trainer._run_ahead = True
    out = trainer._batch_to_device(mb)
    assert out["input_ids"].is_meta and out["labels"].is_meta and out["max_length_q"] == 2
    assert all(out[k] is mb[k] for k in LAYOUT)
    trainer._run_ahead = False  # read at each step's end: the layout goes to the device with the rest
    out = trainer._batch_to_device(mb)
    assert all(out[k].is_meta for k in LAYOUT)
    # as one tensor for q and k, as the collator gave it: two equal copies would cost the model a sync to compare
    assert out["cu_seq_lens_q"] is out["cu_seq_lens_k"]


@pytest.mark.gpu
def test_a_packed_training_step_makes_no_host_sync_under_run_ahead(tmp_path):
    # The launch (forward, backward, clipping) and the update of a step must not wait for the GPU; only
    # _finish_step reads back, one step later. The first two steps compile and autotune the kernels.
    cfg = config(tmp_path, device="cuda", mixed_precision="bf16", use_fused_kernels=True, use_sequence_packing=True,
                 max_steps=6, batch_size=4)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), cfg)
    checked = []

    def no_sync(fn):
        def run(launched_or_batches, *args):
            step = launched_or_batches.step if args == () else args[0]
            if step <= 2:
                return fn(launched_or_batches, *args)
            checked.append(step)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(launched_or_batches, *args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return run

    trainer._launch_step, trainer._update = no_sync(trainer._launch_step), no_sync(trainer._update)
    result = trainer.train(rows(48))
    assert trainer._run_ahead and result.steps == 6
    assert checked == [3, 3, 4, 4, 5, 5, 6, 6]
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_a_step_whose_update_fails_leaves_each_earlier_step_logged_once(tmp_path, monkeypatch):
    # Step 3's update fails (out of memory, a second Ctrl-C) after step 2's values were read and logged: the
    # handler that logs a step still unread logged step 2 a second time.
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=5, batch_size=4))
    trainer._can_run_ahead = lambda: True  # as on a GPU
    step, calls = type(trainer.optimizer).step, []

    def step_fails_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(type(trainer.optimizer), "step", step_fails_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train(rows(20))
    assert trainer._run_ahead
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]


def test_ctrl_c_as_an_epoch_ends_still_logs_its_last_step(tmp_path, monkeypatch):
    # A Ctrl-C after step 4's stop check, as its epoch's batches ran out: the loop ended on the flag without the
    # check that reads the step still pending, so step 4 trained and was saved but was never logged nor checked.
    class CtrlCAtTheEpochsEnd(trainer_module.StepPlan):
        def epoch_steps(self, epoch, start=0):
            yield from super().epoch_steps(epoch, start)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer_module, "StepPlan", CtrlCAtTheEpochsEnd)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=8, batch_size=4))
    trainer._can_run_ahead = lambda: True  # as on a GPU
    result = trainer.train(rows(16))  # 4 steps an epoch
    assert trainer._run_ahead
    assert result.interrupted and result.steps == 4 and len(result.losses) == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
