"""Choosing and checking the data-parallel setup, without starting processes: the strategy "auto" picks, the
batch split over ranks, and the clear errors for input that cannot work."""

import json

import pytest

from chronicals.config import ChronicalsConfig, ConfigError
from chronicals.training import SetupError, dist_checkpoint, parallel
from chronicals.training.batches import StepPlan
from chronicals.training.distributed import DistEnv

ONE, TWO = DistEnv(), DistEnv(rank=0, world_size=2, local_rank=0)


def cfg(**changes):
    return ChronicalsConfig(model="tiny-llama", device="cpu", **changes)


def test_auto_is_fsdp2_for_full_fine_tuning_ddp_for_lora_and_none_for_one_process():
    assert parallel.resolve_strategy(cfg(), TWO) == "fsdp2"
    assert parallel.resolve_strategy(cfg(use_lora=True), TWO) == "ddp"
    assert parallel.resolve_strategy(cfg(use_lora=True, distributed_strategy="fsdp2"), TWO) == "fsdp2"
    assert parallel.resolve_strategy(cfg(distributed_strategy="ddp"), TWO) == "ddp"
    for strategy in ("auto", "fsdp2", "ddp", "none"):  # one process runs as it always did
        assert parallel.resolve_strategy(cfg(distributed_strategy=strategy), ONE) == "none"


def test_fsdp2_on_a_torch_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(parallel, "fully_shard_api", lambda: None)
    with pytest.raises(SetupError, match=r"'distributed_strategy' asks for FSDP2.*torch >= 2.6.*'ddp'"):
        parallel.resolve_strategy(cfg(distributed_strategy="fsdp2"), TWO)
    assert parallel.resolve_strategy(cfg(distributed_strategy="ddp"), TWO) == "ddp"


def test_strategy_none_on_several_processes_and_fp16_fsdp2_are_refused():
    with pytest.raises(SetupError, match=r"'distributed_strategy' is 'none' but 2 processes"):
        parallel.resolve_strategy(cfg(distributed_strategy="none"), TWO)
    with pytest.raises(SetupError, match=r"'mixed_precision' is 'fp16'.*use 'bf16'"):
        parallel.resolve_strategy(cfg(mixed_precision="fp16"), TWO)


def test_global_batch_is_split_over_ranks_and_accumulation():
    assert parallel.micro_batch_size(cfg(batch_size=8), TWO) == 8  # batch_size is per rank when no global size
    assert parallel.micro_batch_size(cfg(global_batch_size=16, gradient_accumulation_steps=2), TWO) == 4
    assert parallel.micro_batch_size(cfg(global_batch_size=16, gradient_accumulation_steps=2), ONE) == 8
    with pytest.raises(SetupError, match=r"'global_batch_size' is 10.*2 process\(es\) x gradient_accumulation_steps="
                                         r"2 do not divide; use a multiple of 4"):
        parallel.micro_batch_size(cfg(global_batch_size=10, gradient_accumulation_steps=2), TWO)


@pytest.mark.parametrize("rows, accumulation", [(20, 1), (22, 2), (3, 1)])
def test_ranks_together_take_the_rows_one_process_takes_tail_included(rows, accumulation):
    # global batch 8: one process takes micro-batches of 8 / accumulation rows, each of two ranks half of that. A
    # last, shorter micro-batch (20 rows: 8, 8, 4) is one process's last step; the ranks must split it, not drop it
    # (which gave them fewer steps per epoch, another epoch boundary and other losses than one process).
    def plan(env):
        return StepPlan(list(range(rows)), list, batch_size=8 // accumulation // env.world_size, seed=0, env=env,
                        gradient_accumulation_steps=accumulation)

    one = plan(ONE)
    ranks = [plan(DistEnv(rank=r, world_size=2, local_rank=r)) for r in range(2)]
    assert [p.steps_per_epoch for p in ranks] == [one.steps_per_epoch] * 2
    for epoch in range(2):
        for alone, *split in zip(one.epoch_steps(epoch), *(p.epoch_steps(epoch) for p in ranks)):
            assert all(mb for r in split for mb in r)  # no rank is handed an empty micro-batch
            for m, micro_batch in enumerate(alone):
                assert split[0][m] + split[1][m] == micro_batch


def test_a_last_micro_batch_with_fewer_rows_than_ranks_is_kept():
    # 17 rows at batch 4 on two ranks: micro-batches of 8, 8 and 1 row, as one process at batch 8 has. The ranks
    # left the last one out (an epoch one step shorter than on one process). The rank without a row now runs a
    # stand-in row with every label ignored, which adds nothing to the loss or the token count.
    import torch

    def collate(rows):
        ids = torch.tensor(rows)
        return {"input_ids": ids, "labels": ids.clone(), "num_label_tokens": len(rows)}

    plans = [StepPlan(list(range(17)), collate, batch_size=4, seed=0, env=DistEnv(rank=r, world_size=2, local_rank=r),
                      gradient_accumulation_steps=1) for r in range(2)]
    one = StepPlan(list(range(17)), collate, batch_size=8, seed=0, env=ONE, gradient_accumulation_steps=1)
    assert [p.steps_per_epoch for p in plans] == [one.steps_per_epoch] * 2 == [3, 3]
    last_0, last_1 = (list(p.epoch_steps(0))[-1][0] for p in plans)  # each rank's last micro-batch
    alone = list(one.epoch_steps(0))[-1][0]
    assert last_1["input_ids"].tolist() == alone["input_ids"].tolist() and last_1["num_label_tokens"] == 1
    assert last_0["num_label_tokens"] == 0 and bool((last_0["labels"] == -100).all())


def test_config_fields_are_validated():
    with pytest.raises(ConfigError, match="'distributed_strategy'.*'fsdp2'"):
        cfg(distributed_strategy="zero3")
    with pytest.raises(ConfigError, match="'global_batch_size'.*>= 1"):
        cfg(global_batch_size=0)


def test_decoder_blocks_are_found_by_class_name():
    from chronicals.models import build_model

    model = build_model("tiny-llama", seed=0, vocab_size=64)
    assert [type(b).__name__ for b in parallel.decoder_blocks(model)] == ["LlamaDecoderLayer"] * 2
    model._no_split_modules = []
    with pytest.raises(SetupError, match="no decoder blocks.*distributed_strategy: ddp"):
        parallel.decoder_blocks(model)


def test_resume_needs_the_same_world_size_and_layout(tmp_path):
    path = tmp_path / "checkpoint-4"
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 4}))
    with pytest.raises(SetupError, match=r"saved by 4 process\(es\) but this run has 2.*nproc_per_node=4"):
        dist_checkpoint.check_resumable(path, TWO, "fsdp2")
    (path / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 2}))
    with pytest.raises(SetupError, match="holds whole weights.*'fsdp2'.*resume with the strategy it was saved with"):
        dist_checkpoint.check_resumable(path, TWO, "fsdp2")
    dist_checkpoint.check_resumable(path, TWO, "ddp")
    (path / dist_checkpoint.SHARDS).mkdir()
    with pytest.raises(SetupError, match="holds FSDP2 shards.*'ddp'"):
        dist_checkpoint.check_resumable(path, TWO, "ddp")
    dist_checkpoint.check_resumable(path, TWO, "fsdp2")
    (path / "trainer_state.json").write_text(json.dumps({"step": 4}))  # saved before multi-GPU support
    with pytest.raises(SetupError, match=r"saved by 1 process\(es\)"):
        dist_checkpoint.check_resumable(path, TWO, "fsdp2")


def test_accumulation_skips_the_all_reduce_under_torch_compile_too(tmp_path):
    # torch.compile wraps the DDP module in an OptimizedModule, which is no DistributedDataParallel: no_sync was
    # never entered and every micro-batch was all-reduced (checked with a counting comm hook on 2 processes: 4
    # reductions for 2 steps of 2 micro-batches, 2 with the fix). Compiling is lazy, so nothing compiles here.
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        for forward_model in (ddp, torch.compile(ddp)):
            with parallel.gradient_sync(forward_model, sync=False):
                assert not ddp.require_backward_grad_sync
            with parallel.gradient_sync(forward_model, sync=True):
                assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def test_a_process_group_started_by_the_caller_still_gets_each_rank_its_own_gpu(monkeypatch):
    # setup() returned at once for a group the caller had started (torch.multiprocessing + init_process_group, as in
    # test_a_process_group_started_by_the_caller_is_used), leaving every rank's current CUDA device at cuda:0, where
    # NCCL runs object collectives (the checkpoint's gather of every rank's RNG states): two ranks on one GPU.
    import torch

    from chronicals.training import distributed

    chosen = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("already initialized"))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    distributed.setup(DistEnv(rank=1, world_size=2, local_rank=1), torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)]
    distributed.setup(DistEnv(rank=1, world_size=2, local_rank=1), torch.device("cpu"))  # gloo on CPU: no GPU to set
    distributed.setup(ONE, torch.device("cuda", 0))  # one process: left as it is
    assert chosen == [torch.device("cuda", 1)]
