"""What each process runs in the multi-process tests: small trainer runs whose losses, gradient norms and
observations are returned as plain data.

`spawn(world_size, tmp_path)` starts `world_size` gloo processes on this machine that each run `all_runs` and write
their results to JSON; the test compares rank 0's with a one-process run (spawned the same way) of the same
global batch.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

VOCAB = 96


def tokenizer():
    return SimpleNamespace(pad_token_id=0, eos_token_id=1)


def rows(n: int = 32, seed: int = 0):
    """Tokenized rows of varied lengths with a masked prefix, so ranks hold different numbers of label tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(6, 24)
        ids = [rng.randrange(2, VOCAB) for _ in range(length)]
        cut = rng.randint(1, length - 3)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def model(name: str = "tiny-qwen2", seed: int = 0):
    from chronicals.models import build_model

    # tiny-qwen2 ties the embedding and the lm_head, the case where both must sit in FSDP2's root unit.
    return build_model(name, seed=seed, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, dtype=torch.float32)


def config(output_dir: Path, **changes):
    from chronicals.config import ChronicalsConfig

    values = dict(model="tiny-qwen2", output_dir=str(output_dir), learning_rate=1e-2, global_batch_size=8,
                  max_steps=3, max_seq_length=32, use_fused_kernels=True, use_sequence_packing=False,
                  progress_bar=False, logging_steps=1000, mixed_precision="no", device="cpu", seed=0,
                  save_final_model=False)
    values.update(changes)
    return ChronicalsConfig(**values)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def full_fine_tune(out: Path, name: str = "tiny-qwen2") -> dict:
    """FSDP2 (on several processes) full fine-tune with the fused loss; checkpoint at step 2, export at the end.
    Records the type and shape of the lm_head weight that the fused loss is handed, and whether any module
    met a sharded (DTensor) parameter in its own forward."""
    import chronicals.models.causal_lm as causal_lm
    from chronicals.training import ChronicalsTrainer

    seen, sharded_in_forward = [], []
    original = causal_lm.linear_cross_entropy_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append([type(weight).__name__, list(weight.shape)])
        return original(hidden, weight, *args, **kwargs)

    trainer = ChronicalsTrainer(model(name), tokenizer(), config(out, save_steps=2, save_final_model=True))

    def check(module, args):
        sharded_in_forward.extend(type(module).__name__ for p in module.parameters(recurse=False)
                                  if type(p).__name__ == "DTensor")

    # Not on the lm_head: a hooked lm_head is called as a module (its hook must run), which leaves the fused loss
    # whose weight the spy checks instead.
    head = trainer.model.get_output_embeddings()
    hooks = [m.register_forward_pre_hook(check) for m in trainer.model.modules() if m is not head]
    causal_lm.linear_cross_entropy_loss = spy
    try:
        result = trainer.train(rows())
    finally:
        causal_lm.linear_cross_entropy_loss = original
        for h in hooks:
            h.remove()
    rows_ = metrics(out)
    return {"strategy": trainer.strategy, "losses": result.losses, "grad_norms": [r["grad_norm"] for r in rows_],
            "label_tokens": [r["label_tokens"] for r in rows_], "lm_head_seen": seen,
            "sharded_in_forward": sorted(set(sharded_in_forward)), "final_model": result.final_model}


def resume(out: Path) -> dict:
    """Continue the run above from its step-2 checkpoint, with the same number of processes."""
    from chronicals.training import ChronicalsTrainer

    trainer = ChronicalsTrainer(model(), tokenizer(),
                                config(out, resume_from_checkpoint=str(out / "checkpoint-2")))
    return {"losses": trainer.train(rows()).losses}


def lora(out: Path, strategy: str = "auto") -> dict:
    """LoRA ("auto" picks DDP on several processes) with two micro-batches per step (DDP's no_sync path), or
    with FSDP2 and the adapter gathered and exported at the end."""
    import chronicals.lora.apply as lora_apply
    from chronicals.training import ChronicalsTrainer

    # PEFT's own LoRA layers: what is checked here is the data parallelism around them; the fused LoRA ops are
    # compared with PEFT in tests/lora (their CPU fallback without the Triton interpreter is not, see the report).
    install_fused = lora_apply.install_fused
    lora_apply.install_fused = lambda model, **options: 0
    try:
        trainer = ChronicalsTrainer(model(), tokenizer(),
                                    config(out, use_lora=True, lora_rank=4, learning_rate=1e-2,
                                           gradient_accumulation_steps=2, distributed_strategy=strategy,
                                           save_final_model=strategy == "fsdp2"))
    finally:
        lora_apply.install_fused = install_fused
    result = trainer.train(rows())
    return {"strategy": trainer.strategy, "losses": result.losses,
            "grad_norms": [r["grad_norm"] for r in metrics(out)], "final_model": result.final_model}


def epoch_with_a_short_last_batch(out: Path, n_rows: int = 20) -> dict:
    """One epoch of 20 rows with a global batch of 8: steps of 8, 8 and 4 rows; the ranks split the last one. With
    17 rows the last step has 1 row: on two ranks, one of them runs a stand-in row that carries no label."""
    from chronicals.training import ChronicalsTrainer

    trainer = ChronicalsTrainer(model(), tokenizer(), config(out, max_steps=-1, epochs=1))
    result = trainer.train(rows(n_rows))
    return {"losses": result.losses, "grad_norms": [r["grad_norm"] for r in metrics(out)],
            "label_tokens": [r["label_tokens"] for r in metrics(out)]}


def dropout_resume(out: Path, strategy: str) -> dict:
    """LoRA with dropout, 3 steps with a checkpoint at step 2, then resumed from it: each rank's random generators
    have moved on differently (dropout masks of its own batches' shapes), so each must get its own back."""
    from chronicals.training import ChronicalsTrainer

    def run(**changes):
        trainer = ChronicalsTrainer(model(), tokenizer(), config(out, use_lora=True, lora_rank=4, lora_dropout=0.5,
                                                                 distributed_strategy=strategy, **changes))
        return trainer.train(rows()).losses

    return {"losses": run(save_steps=2), "resumed": run(resume_from_checkpoint=str(out / "checkpoint-2"))}


def bf16_export(out: Path) -> dict:
    """One step with every weight held in bf16 (param_dtype: bfloat16), then the gathered export."""
    from chronicals.training import ChronicalsTrainer

    trainer = ChronicalsTrainer(model(), tokenizer(), config(out, max_steps=1, mixed_precision="bf16",
                                                             param_dtype="bfloat16", save_final_model=True))
    return {"final_model": trainer.train(rows()).final_model}


def offloaded_checkpointing(out: Path) -> dict:
    """Gradient checkpointing with activation offloading, under FSDP2 on several processes (its parameters are
    DTensor shards while the forward uses weights gathered just for it)."""
    from chronicals.training import ChronicalsTrainer

    trainer = ChronicalsTrainer(model(), tokenizer(), config(out, max_steps=2, use_gradient_checkpointing=True,
                                                             activation_offload=True))
    return {"strategy": trainer.strategy, "losses": trainer.train(rows()).losses,
            "grad_norms": [r["grad_norm"] for r in metrics(out)]}


def models_that_differ_per_rank(out: Path, strategy: str) -> dict:
    """Each rank builds its model with a seed of its own (seed = rank, as a script seeding torch with its rank
    would): the ranks must train rank 0's model, as one process given it does."""
    from chronicals.training import ChronicalsTrainer

    rank = int(os.environ.get("RANK", "0"))
    trainer = ChronicalsTrainer(model(seed=rank), tokenizer(), config(out, max_steps=2, distributed_strategy=strategy))
    return {"strategy": trainer.strategy, "losses": trainer.train(rows()).losses,
            "grad_norms": [r["grad_norm"] for r in metrics(out)]}


def settings_that_differ_per_rank(out: Path) -> dict:
    """The error each rank meets when the ranks run other configs (a seed of their own) or other data (rank r drops
    r rows); None where there is none."""
    from chronicals.training import ChronicalsTrainer, SetupError

    rank = int(os.environ.get("RANK", "0"))
    errors = {}
    for name, changes, n_rows in (("config", {"seed": rank, "learning_rate": 1e-2}, 32),
                                  ("data", {}, 32 - rank)):
        try:
            ChronicalsTrainer(model(), tokenizer(), config(out / name, max_steps=1, **changes)).train(rows(n_rows))
            errors[name] = None
        except SetupError as e:
            errors[name] = str(e)
    try:  # evaluation data: rank r drops r rows
        ChronicalsTrainer(model(), tokenizer(), config(out / "eval", max_steps=1)).evaluate(rows(8 - rank))
        errors["eval"] = None
    except SetupError as e:
        errors["eval"] = str(e)
    return errors


def data_warnings(out: Path) -> list[str]:
    """The warnings this rank emits while training on rows that max_seq_length truncates."""
    import warnings

    from chronicals.training import ChronicalsTrainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ChronicalsTrainer(model(), tokenizer(), config(out, max_steps=1, max_seq_length=16)).train(rows())
    return [str(w.message) for w in caught if "max_seq_length" in str(w.message)]


def stop_on_one_rank(out: Path) -> dict:
    """Ctrl-C seen by the last rank only, during step 1: every rank must stop after step 1 and save together
    (a rank that went on alone would wait forever in the next step's collectives)."""
    import torch.distributed as dist

    from chronicals.training import ChronicalsTrainer

    trainer = ChronicalsTrainer(model(), tokenizer(), config(out, max_steps=3))
    step = trainer._launch_step
    last = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1

    def step_then_stop(micro_batches, index, epoch):
        launched = step(micro_batches, index, epoch)
        trainer._stop_requested = trainer._stop_requested or (last and index == 1)
        return launched

    trainer._launch_step = step_then_stop
    result = trainer.train(rows())
    return {"steps": result.steps, "interrupted": result.interrupted, "checkpoint": result.checkpoint}


def evaluation(out: Path, strategy: str) -> dict:
    """Evaluation every 2 steps and at the end, on 13 rows (micro-batches of 8 and 5 over the ranks) and on 1 row (a
    rank without a row runs a stand-in: FSDP2's forward is a collective every rank joins)."""
    from chronicals.training import ChronicalsTrainer

    lora = dict(use_lora=True, lora_rank=4) if strategy == "ddp" else {}
    trainer = ChronicalsTrainer(model(), tokenizer(), config(out, eval_steps=2, distributed_strategy=strategy, **lora))
    result = trainer.train(rows(), eval_dataset=rows(13, seed=1))
    return {"strategy": trainer.strategy, "losses": result.losses,
            "evals": [[r["step"], r["eval_loss"], r["eval_tokens"]] for r in metrics(out) if "eval_loss" in r],
            "one_row": trainer.evaluate(rows(1, seed=2))["eval_loss"]}


def all_runs(root: Path) -> dict:
    # tiny-llama has an untied lm_head (as Llama-3.1-8B): its embedding is a unit of its own, the head stays in
    # the root.
    return {"full": full_fine_tune(root / "full"), "resume": resume(root / "full"),
            "untied": full_fine_tune(root / "untied", "tiny-llama"), "lora": lora(root / "lora"),
            "lora_fsdp2": lora(root / "lora_fsdp2", "fsdp2"), "stop": stop_on_one_rank(root / "stop"),
            "short_last_batch": epoch_with_a_short_last_batch(root / "short_last_batch"),
            "one_row_last_batch": epoch_with_a_short_last_batch(root / "one_row_last_batch", n_rows=17),
            "dropout_ddp": dropout_resume(root / "dropout_ddp", "ddp"),
            "dropout_fsdp2": dropout_resume(root / "dropout_fsdp2", "fsdp2"), "bf16_export": bf16_export(root / "bf16"),
            "offload": offloaded_checkpointing(root / "offload"),
            "rank_models_fsdp2": models_that_differ_per_rank(root / "rank_models_fsdp2", "fsdp2"),
            "rank_models_ddp": models_that_differ_per_rank(root / "rank_models_ddp", "ddp"),
            "rank_settings": settings_that_differ_per_rank(root / "rank_settings"),
            "data_warnings": data_warnings(root / "data_warnings"),
            "eval_fsdp2": evaluation(root / "eval_fsdp2", "fsdp2"), "eval_ddp": evaluation(root / "eval_ddp", "ddp")}


def _worker(rank: int, world_size: int, root: str) -> None:
    # Without Triton's interpreter the patched model computes the kernels' math in PyTorch (fast on CPU); the
    # fused loss is still handed the lm_head weight exactly as on a GPU, which is what is checked here.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    import torch.distributed as dist

    if world_size > 1:  # a file rendezvous: no port that another test could take between choosing and binding
        # A collective that one rank never joins fails after a minute instead of hanging the test run.
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
    try:
        results = all_runs(Path(root) / "runs")
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _exit_skipping_teardown()


def _exit_skipping_teardown() -> None:
    # fully_shard keeps the gloo process group alive past destroy_process_group (its threads still run; torch 2.13,
    # also in a bare fully_shard of one Linear), and the group destroyed at interpreter exit aborted a rank ("terminate
    # called without an active exception", SIGABRT) in 1 of 2 to 5 runs, after its results were written. The test
    # checks those results, not torch's exit, so the process ends here without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _own_group_worker(rank: int, world_size: int, root: str) -> None:
    """A process group started by the caller, without torchrun's variables (the torch.multiprocessing way)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from chronicals.training import ChronicalsTrainer

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        trainer = ChronicalsTrainer(model(), tokenizer(), config(Path(root) / "run", max_steps=1))
        result = {"env": [trainer.env.rank, trainer.env.world_size], "strategy": trainer.strategy,
                  "losses": trainer.train(rows()).losses}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    _exit_skipping_teardown()


def spawn_own_group(world_size: int, root: Path) -> list[dict]:
    import torch.multiprocessing as mp

    root.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_own_group_worker, args=(world_size, str(root)), nprocs=world_size, start_method="spawn")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world_size)]


def spawn(world_size: int, root: Path) -> list[dict]:
    """Run `all_runs` on `world_size` gloo processes; returns each rank's results."""
    import torch.multiprocessing as mp

    root.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world_size, str(root)), nprocs=world_size, start_method="spawn")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world_size)]

