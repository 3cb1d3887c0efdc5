"""Multi-GPU scaling of full fine-tuning with the trainer's own setup (FSDP2 on several GPUs, plain on one):
per-GPU tokens/s against the 1-GPU run, peak memory per GPU, the loss per step, and the harness's verification.

    python benchmarks/multi_gpu.py --model llama-3.2-1b --out DIR            # 1, 2, 4... GPUs, as many as visible
    python benchmarks/multi_gpu.py --model llama-3.1-8b --out DIR            # 2, 4... GPUs (one cannot hold it)
    python benchmarks/multi_gpu.py --model tiny --device cpu --gpus 1,2 --out DIR   # the same code on CPU (gloo)

The driver starts one `torchrun --standalone --nproc_per_node=N` per world size (NCCL's NVLink multicast off in
every process), each process builds the model directly on its GPU from the preset's shape (random weights,
same seed on every rank), hands it to ChronicalsTrainer (patching, FSDP2 wrapping and optimizer exactly as
`chronicals train` does), then runs warm-up steps and timed steps on synthetic fixed-length tokens (a fixed
batch per GPU, different tokens on each rank). Timing: CUDA events around each optimizer step after warm-up;
the median step gives tokens/s per GPU (label tokens: batch x (seq_len - 1) per GPU, the project's counting).
Loss and gradient norm are the global ones (reduced over ranks). Scaling efficiency = per-GPU tokens/s at N GPUs
/ per-GPU tokens/s of the smallest world size of the same model (1 GPU for the 1B shape).

Verification (harness.verify.check): finite, nonzero gradient norm; finite loss; loss over exactly the label
tokens; trained weights moved; and the loss at every step within 2% of the smallest run's (same initial model,
same token distribution, so the loss of a correct run is the same to within batch noise; the gradient norm is
not compared since a larger global batch has a smaller one). Writes DIR/multi_gpu_<model>_<N>.json per run and
DIR/multi_gpu_<model>.json (summary), and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this directory would come first on sys.path, where a module could shadow a package of the same
# name that transformers probes for (benchmarks/kernels.py once shadowed `kernels`): import from the root only.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from harness.provenance import commit, now  # noqa: E402

# NCCL's NVLink multicast (NVLS) stays off on the shared H200 hosts; children inherit these.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NCCL_ENV)

# batch and seq_len are per GPU; min_world: the fewest processes that hold the model's training state.
PRESETS = {
    "llama-3.2-1b": dict(model="llama-3.2-1b", batch=8, seq_len=2048, gradient_checkpointing=False, min_world=1),
    # 8B: fp32 master weights + grads + Adam states are 128 GB, so >= 2 GPUs, and recomputation keeps the
    # activations small next to the 64 GB of sharded state per GPU at 2 GPUs.
    "llama-3.1-8b": dict(model="llama-3.1-8b", batch=4, seq_len=2048, gradient_checkpointing=True, min_world=2),
    "tiny": dict(model="tiny-llama", batch=2, seq_len=64, gradient_checkpointing=True, min_world=1),
}
LOSS_RTOL = 0.02


# ---- one process of one run (under torchrun) ---------------------------------------------------------------------
def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from chronicals.config import ChronicalsConfig
    from chronicals.models import build_model
    from chronicals.training import ChronicalsTrainer, distributed, parallel

    preset = PRESETS[args.model]
    env = distributed.detect()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu --model tiny for the CPU check")
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    cfg = ChronicalsConfig(
        model=preset["model"], device=args.device, learning_rate=args.lr, batch_size=preset["batch"],
        max_seq_length=preset["seq_len"], use_sequence_packing=False, use_fused_kernels=True,
        use_gradient_checkpointing=preset["gradient_checkpointing"], mixed_precision="auto", max_grad_norm=1.0,
        output_dir=str(Path(args.out) / "unused"), progress_bar=False, seed=0,
    )
    t0 = time.perf_counter()
    with device:  # weights are created where they train: no host copy of an 8B model per rank
        model = build_model(preset["model"], seed=0, dtype=torch.float32)
    trainer = ChronicalsTrainer(model, SimpleNamespace(pad_token_id=0), cfg)
    setup_s = time.perf_counter() - t0
    vocab = trainer.model.config.vocab_size
    batch, seq = preset["batch"], preset["seq_len"]
    label_tokens = batch * (seq - 1)  # per rank: every position but the last has a next-token target
    global_tokens = label_tokens * env.world_size
    sample = _weight_sample(trainer.trainable)

    def step(index: int):
        g = torch.Generator().manual_seed(1_000_003 * index + env.rank)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        with torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            loss = trainer.forward_model(input_ids=ids, labels=ids, num_items_in_batch=global_tokens).loss
        (loss * env.loss_scale).backward()
        norm = parallel.clip_grad_norm(trainer.trainable, cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        total = distributed.all_reduce_sum(loss.detach().float().clone(), env)
        return total, norm

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    records = []
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t = time.perf_counter()
        loss, norm = step(i)
        if cuda:
            end.record()
        loss_value, norm_value = torch.stack([loss, norm.float().to(loss.device)]).tolist()  # synchronises
        ms = start.elapsed_time(end) if cuda else (time.perf_counter() - t) * 1e3
        records.append({"step": i, "timed": timed, "loss": loss_value, "grad_norm": norm_value, "time_ms": ms,
                        "label_tokens": global_tokens, "real_tokens": global_tokens})
    moved = torch.tensor([_moved_fraction(sample)], device=device)
    distributed.all_reduce_sum(moved, env)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0], device=device)
    peaks = [torch.zeros_like(peak) for _ in range(env.world_size)]
    if env.enabled:
        dist.all_gather(peaks, peak)
    else:
        peaks = [peak]
    if env.is_main:
        median_ms = statistics.median(r["time_ms"] for r in records if r["timed"])
        result = {
            "model": args.model, "world_size": env.world_size, "strategy": trainer.strategy,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "batch_per_gpu": batch, "seq_len": seq, "gradient_checkpointing": preset["gradient_checkpointing"],
            "setup_s": setup_s, "median_step_ms": median_ms,
            "tokens_per_s_per_gpu": label_tokens / (median_ms / 1e3),
            "tokens_per_s_total": global_tokens / (median_ms / 1e3),
            "peak_mem_gib_per_gpu": [p.item() for p in peaks], "weights_changed": moved.item() / env.world_size,
            "steps": records,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"multi_gpu_{args.model}_{env.world_size}.json").write_text(json.dumps(result, indent=1))
    distributed.teardown(env)


def _weight_sample(params, per_tensor: int = 1024):
    """A fixed sample of each trainable weight's LOCAL shard (this rank's part under FSDP2), kept to see it move."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        flat = local.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        idx = torch.randint(0, flat.numel(), (min(flat.numel(), per_tensor),), generator=g).to(flat.device)
        out.append((p, flat.numel(), idx, flat[idx].clone()))
    return out


def _moved_fraction(sample) -> float:
    total = sum(n for _, n, _, _ in sample)
    moved = 0.0
    for p, n, idx, before in sample:
        local = p.to_local() if hasattr(p, "to_local") else p
        moved += n * (local.detach().reshape(-1)[idx] != before).float().mean().item()
    return moved / total if total else 0.0


# ---- the driver: one torchrun per world size, then verification and the table -----------------------------------
def drive(args) -> int:
    preset = PRESETS[args.model]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    worlds = [int(w) for w in args.gpus.split(",")] if args.gpus else _default_worlds(args.device, preset)
    if not worlds:
        print(f"{args.model} needs at least {preset['min_world']} GPUs; this host has fewer", file=sys.stderr)
        return 2
    runs = []
    for world in worlds:
        path = out / f"multi_gpu_{args.model}_{world}.json"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "benchmarks.multi_gpu", "--worker", "--model", args.model, "--device", args.device,
               "--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
        print(f"== {args.model} on {world} {'GPU' if args.device == 'cuda' else 'process'}(es): {' '.join(cmd)}",
              flush=True)
        status = _launch(cmd, args.timeout)
        if path.is_file():
            # Rank 0 writes the file once every step ran and every rank's numbers are in: the measurement is
            # complete even when the processes then fail or hang while shutting down (recorded as "exit").
            run = {**json.loads(path.read_text()), "status": "ok"}
            if status != "ok":
                run["exit"] = status
        else:
            run = {"world_size": world, "status": "no result file" if status == "ok" else status}
        runs.append(run)
    _verify_and_scale(runs)
    summary = {"model": args.model, "preset": preset, "loss_rtol": LOSS_RTOL, "nccl_env": NCCL_ENV,
               "commit": commit(), "time": now(),
               "runs": [{k: v for k, v in r.items() if k != "steps"} for r in runs]}
    (out / f"multi_gpu_{args.model}.json").write_text(json.dumps(summary, indent=1))
    _print_table(args.model, runs)
    return 0 if all(r["status"] == "ok" and not r.get("failures") for r in runs) else 1


def _launch(cmd: list[str], timeout: int) -> str:
    """Run one torchrun in its own process group, so that a timeout stops its workers too (they hold GPUs)."""
    # Autotuning results are kept on disk, so the runs after the first skip re-benchmarking the kernels' configs.
    env = {"TRITON_CACHE_AUTOTUNING": "1", **os.environ, **NCCL_ENV}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"timeout {timeout}s"
    return "ok" if code == 0 else f"exit {code}"


def _default_worlds(device: str, preset: dict) -> list[int]:
    if device == "cpu":
        return [1, 2]
    import torch

    count = torch.cuda.device_count()
    worlds, w = [], 1
    while w <= count:
        if w >= preset["min_world"]:
            worlds.append(w)
        w *= 2
    return worlds


def _verify_and_scale(runs: list[dict]) -> None:
    from harness.results import Reference
    from harness.scenario import VerifySpec
    from harness.verify import check

    done = [r for r in runs if r["status"] == "ok"]
    if not done:
        return
    base = min(done, key=lambda r: r["world_size"])
    reference = Reference({m: {i: s[m] for i, s in enumerate(base["steps"])} for m in ("loss", "grad_norm")},
                          params=None, first_batch_after=None)
    spec = VerifySpec(loss_rtol=LOSS_RTOL, grad_norm_rtol=math.inf)
    for r in done:
        r["reference_world_size"] = base["world_size"]
        r["failures"] = check(r["steps"], r["weights_changed"], len(base["steps"]), spec,
                              None if r is base else reference)
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]


def _print_table(model: str, runs: list[dict]) -> None:
    print(f"\n{model}: per-GPU tokens/s (label tokens), scaling vs the smallest run, peak memory per GPU")
    print(f"{'GPUs':>4} {'strategy':>8} {'step ms':>9} {'tok/s/GPU':>10} {'scaling':>8} {'peak GiB (max)':>14} "
          f"{'loss first->last':>18}  verification")
    for r in runs:
        if r["status"] != "ok":
            print(f"{r['world_size']:>4} {'-':>8} {'-':>9} {'-':>10} {'-':>8} {'-':>14} {'-':>18}  {r['status']}")
            continue
        steps = r["steps"]
        verdict = "verified" if not r["failures"] else "FAILED: " + "; ".join(r["failures"])
        if "exit" in r:
            verdict += f" (then, shutting down: {r['exit']})"
        print(f"{r['world_size']:>4} {r['strategy']:>8} {r['median_step_ms']:>9.1f} "
              f"{r['tokens_per_s_per_gpu']:>10.0f} {100 * r['scaling_efficiency']:>7.1f}% "
              f"{max(r['peak_mem_gib_per_gpu']):>14.2f} {steps[0]['loss']:>8.4f}->{steps[-1]['loss']:<8.4f}  "
              f"{verdict}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama-3.2-1b")
    parser.add_argument("--out", required=True, help="directory for the JSON results")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--gpus", default=None, help="world sizes to run, e.g. 1,2,4 (default: 1, 2, 4... up to "
                                                     "the visible GPUs, from the fewest that hold the model)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel compilation, autotuning)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--timeout", type=int, default=200, help="seconds allowed to each world size's run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.model != "tiny":
        parser.error("--device cpu runs only --model tiny (the CPU check of this script)")
    if args.worker:
        worker(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
