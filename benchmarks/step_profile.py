"""Where one training step's GPU time goes, and what the speed levers buy: one model shape, several variants of
the Chronicals step, each timed and (optionally) profiled by kernel.

    python3 benchmarks/step_profile.py --out DIR [--variants a,b,...] [--profile a,b,...] [--steps N]

The step is the harness loop's (harness/loop.py): forward with labels, backward, gradient clipping, fused AdamW,
zero_grad(set_to_none), on random token ids (batch x seq_len, every token a label). Each variant builds a fresh
model from the preset (same seed), times `--steps` steps with CUDA events after 3 warm-up steps (compiled variants
get more warm-up) and reports the median and p20/p80 step time, the same steps' time back to back (one sync at the
end), tokens/s, the peak allocated memory and the first loss (variants must agree: they compute the same
function). A profiled variant also gets torch.profiler's per-kernel GPU time over 2 steps, grouped into matmul /
attention / our Triton kernels / Inductor kernels / optimizer / other, and the GPU's idle time between kernels with
the largest gaps and the kernels around them (idle time is host launch overhead or synchronisation), and the host
operators with the most self time per step (the profiler's own overhead inflates these; compare them with each
other, not with the GPU times). `--skip-hf-mask-sync` removes transformers' per-forward host sync (see main).

Variants (names for --variants): see VARIANTS below. Writes DIR/step_profile.json after every variant (a crash
loses nothing measured) and prints a summary table last. `--phases` adds each phase's GPU time against the host's
enqueue time (`phase_split`): where a phase's host time exceeds its GPU time, a step timed on its own waits on
launches (on an H100 host, Qwen2.5-0.5B full at commit adf8f9f, GPU times then taken with each step timed on its
own: forward 56.8 ms GPU against 30.1 ms host, backward 63.3 against 31.3, update 4.7 against 3.7).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import chronicals  # noqa: E402
from benchmarks._timing import time_calls_ms  # noqa: E402
from chronicals.kernels import linear_cross_entropy as lce  # noqa: E402
from chronicals.kernels import lora as lora_ops  # noqa: E402
from chronicals.models.presets import build_model  # noqa: E402
from harness.loop import graph_pool_bytes  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL = dict(rms_norm=True, swiglu=True, rope=True, linear_cross_entropy=True, packed_attention=True)
LCE_ONLY = dict(ALL, rms_norm=False, swiglu=False, rope=False)

# name -> (mode, apply flags, options). Options: compile_layers (torch.compile each decoder layer in place),
# row_chunk (the fused cross-entropy's row block), fused_lora, lora_kconcat (LoRAConfig.fused_kconcat: the low-rank
# term folded into the base matmul along K), low_rank_first (the fused LoRA ops' order of sums) and low_rank_in_swiglu
# (the LoRA MLP's low-rank terms inside its SwiGLU pass), both in chronicals/kernels/lora.py.
VARIANTS = {
    "full": ("full", ALL, {}),
    "full_chunk1024": ("full", ALL, {"row_chunk": 1024}),
    "full_chunk2048": ("full", ALL, {"row_chunk": 2048}),
    "full_compile_layers": ("full", ALL, {"compile_layers": True}),
    "full_hf_layers_compiled_lce": ("full", LCE_ONLY, {"compile_layers": True}),
    "full_unpatched": ("full", {k: False for k in ALL}, {}),
    "full_cuda_graphs": ("full", dict(ALL, cuda_graphs=True), {}),
    "lora_cuda_graphs": ("lora", dict(ALL, cuda_graphs=True), {}),
    "lora": ("lora", ALL, {}),
    "lora_compile_layers": ("lora", ALL, {"compile_layers": True}),
    "lora_unfused": ("lora", ALL, {"fused_lora": False}),
    "lora_kconcat": ("lora", ALL, {"lora_kconcat": True}),
    "lora_low_rank_after": ("lora", ALL, {"low_rank_first": False}),
    "lora_low_rank_in_swiglu": ("lora", ALL, {"low_rank_in_swiglu": True}),
}


def build(preset: str, mode: str, flags: dict, options: dict, seed: int):
    torch.manual_seed(seed)
    model = build_model(preset, dtype=torch.bfloat16, seed=seed).to("cuda").train()
    model.config.use_cache = False
    model = chronicals.apply(model, **flags)
    if mode == "lora":
        from chronicals.lora import LoRAConfig, apply_lora

        torch.manual_seed(seed)
        model = apply_lora(model, LoRAConfig(rank=16, alpha=16.0, target_modules=LORA_TARGETS,
                                             fused=options.get("fused_lora", True),
                                             fused_kconcat=options.get("lora_kconcat", False)))
    if options.get("compile_layers"):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
        for layer in causal_lm.model.layers:
            layer.compile()
    return model


def make_phases(model, params, batch):
    """The step's three phases as functions: forward() -> loss, backward(loss), update()."""
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)

    def update():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return (lambda: model(**batch).loss), (lambda loss: loss.backward()), update


def make_step(forward, backward, update):
    def step():
        loss = forward()
        backward(loss)
        update()
        return loss

    return step


PHASES = ("forward", "backward", "update")


def phase_split(forward, backward, update, steps: int, sleep_cycles: int = 1_500_000_000) -> dict:
    """Per phase, the GPU's time against the host's. GPU: CUDA events around each phase, each step queued behind a
    sleep kernel so that the host's launches are ahead of the GPU and no launch latency is counted (a phase that
    syncs still counts the host's time after its sync). Host: the time to enqueue the phase while a sleep kernel
    keeps the GPU busy, so the host never waits on it. A phase whose host time exceeds its GPU time starves the GPU
    wherever the host cannot run ahead, as at the start of a step timed on its own. An enqueue that takes about the
    sleep's length hit a host sync, or filled CUDA's launch queue (about a thousand kernels); `queue_or_sync` names
    such phases (their host figure is then only a bound)."""
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(steps)]
    for ev in events:
        torch.cuda._sleep(sleep_cycles)
        ev[0].record()
        loss = forward()
        ev[1].record()
        backward(loss)
        ev[2].record()
        update()
        ev[3].record()
    torch.cuda.synchronize()
    gpu = {name: statistics.median(ev[i].elapsed_time(ev[i + 1]) for ev in events) for i, name in enumerate(PHASES)}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(sleep_cycles)
    end.record()
    end.synchronize()
    sleep_ms = start.elapsed_time(end)
    host = {name: [] for name in PHASES}

    def enqueue(name, run, *args):
        torch.cuda._sleep(sleep_cycles)
        t0 = time.perf_counter()
        result = run(*args)
        host[name].append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        return result

    for _ in range(steps):
        loss = enqueue("forward", forward)
        enqueue("backward", backward, loss)
        enqueue("update", update)
    host_ms = {name: statistics.median(times) for name, times in host.items()}
    return {"gpu_ms": gpu, "host_enqueue_ms": host_ms, "sleep_ms": sleep_ms,
            "queue_or_sync": [name for name, ms in host_ms.items() if ms > 0.8 * sleep_ms]}


CATEGORIES = [
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm90_|sm100_", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("inductor", re.compile(r"^triton_")),
    ("triton_ours", re.compile(r"^_")),
]


def categorise(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def profile(step, steps: int = 2) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels: dict[str, dict] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = getattr(event, "self_cuda_time_total", 0)
        cuda = event.device_type == torch.autograd.DeviceType.CUDA
        if us <= 0 or not cuda or getattr(event, "is_user_annotation", False):
            continue
        entry = kernels.setdefault(event.key, {"ms": 0.0, "calls": 0})
        entry["ms"] += us / 1e3 / steps
        entry["calls"] += event.count // steps
    kernel_spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
                          and not getattr(e, "is_user_annotation", False))
    gaps = [(nxt[0] - prev[1], prev[2], nxt[2]) for prev, nxt in zip(kernel_spans, kernel_spans[1:])
            if nxt[0] > prev[1]]
    by_category: dict[str, float] = {}
    for name, entry in kernels.items():
        by_category[categorise(name)] = by_category.get(categorise(name), 0.0) + entry["ms"]
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:40]
    busy = sum(e["ms"] for e in kernels.values())
    # The host side: which operators' own Python/C++ time (not their children's) fills a step. When the GPU idles
    # between kernels, this is where the step waits.
    cpu_ops = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0]
    cpu_ops.sort(key=lambda op: -op[1])
    return {"wall_ms_per_step": wall_ms, "gpu_busy_ms_per_step": busy,
            "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": name[:160], "category": categorise(name), **entry} for name, entry in top],
            # GPU idle between consecutive kernels (host launch overhead, synchronisation), the largest first
            "idle_ms_per_step": sum(g for g, _, _ in gaps) / 1e3 / steps,
            "host_self_ms_per_step": sum(ms for _, ms, _ in cpu_ops),
            "top_host_ops": [{"name": name[:100], "self_ms": ms, "calls": calls} for name, ms, calls in cpu_ops[:30]],
            "largest_gaps": [{"us": g, "after": a[:100], "before": b[:100]} for g, a, b in sorted(gaps)[::-1][:25]]}


def attention_backends(batch: int, seq_len: int, q_heads: int = 14, kv_heads: int = 2, head_dim: int = 64) -> list:
    """Causal SDPA forward + backward at the full-fine-tuning shape under each SDPA backend (GQA native, and K/V
    repeated as HF does where the backend has no GQA): which attention the patched model should ask for."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks._timing import bench_ms

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, q_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    grad = torch.randn_like(q)
    rows = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def step(leaves=leaves, gqa=gqa, backend=backend):
                qq, kk, vv = leaves
                if not gqa:
                    kk, vv = (t.repeat_interleave(q_heads // kv_heads, dim=1) for t in (kk, vv))
                with sdpa_kernel(backend):
                    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                                           enable_gqa=gqa)
                torch.autograd.grad(out, leaves, grad)

            try:
                rows.append({"backend": backend.name, "gqa_native": gqa, **bench_ms(step)})
            except RuntimeError as exc:
                rows.append({"backend": backend.name, "gqa_native": gqa, "error": str(exc)[:200]})
    return rows


def run_variant(name: str, args) -> dict:
    mode, flags, options = VARIANTS[name]
    # The row block and the LoRA order are read at call time; patched for this variant only, restored even when it
    # crashes.
    with mock.patch.object(lce, "DEFAULT_ROW_CHUNK", options.get("row_chunk", lce.DEFAULT_ROW_CHUNK)), \
            mock.patch.object(lora_ops, "_LOW_RANK_FIRST", options.get("low_rank_first", lora_ops._LOW_RANK_FIRST)), \
            mock.patch.object(lora_ops, "_LOW_RANK_IN_SWIGLU",
                              options.get("low_rank_in_swiglu", lora_ops._LOW_RANK_IN_SWIGLU)):
        return _timed_variant(name, mode, flags, options, args)


def _timed_variant(name: str, mode: str, flags: dict, options: dict, args) -> dict:
    preset = args.lora_model if mode == "lora" else args.full_model
    row = {"variant": name, "mode": mode, "model": preset, "flags": flags, "options": options,
           "batch": args.batch, "seq_len": args.seq_len}
    t_build = time.perf_counter()
    model = build(preset, mode, flags, options, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=g).cuda()
    phases = make_phases(model, params, {"input_ids": ids, "labels": ids})
    step = make_step(*phases)
    warmup = 8 if options.get("compile_layers") else 3
    first_loss = float(step().detach())
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    row["build_and_warmup_s"] = time.perf_counter() - t_build
    torch.cuda.reset_peak_memory_stats()
    times, _ = time_calls_ms(step, args.steps)
    q = statistics.quantiles(times, n=10)
    median = statistics.median(times)
    # The same steps back to back, one sync at the end: a step timed on its own starts with the GPU idle, waiting
    # for the host's first launches (the harness's way); back to back the host runs ahead where it can. The gap
    # is what the host costs per step (on an H100, Qwen2.5-0.5B full: 137.9 against 127.8 ms, with HF's mask sync
    # skipped; 142.6 against 141.0 with it).
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    row.update(first_loss=first_loss, step_ms=median, p20_ms=q[1], p80_ms=q[7], step_times_ms=times,
               back_to_back_ms=(time.perf_counter() - t0) * 1e3 / args.steps,
               tokens_per_s=args.batch * args.seq_len / median * 1e3,
               peak_alloc_gib=(torch.cuda.max_memory_allocated() + graph_pool_bytes()) / 2**30)
    if args.phases:
        row["phases"] = phase_split(*phases, steps=min(args.steps, 5))
    if name in args.profile:
        row["profile"] = profile(step)
    del model, params, step, phases
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default="full,full_compile_layers,lora")
    parser.add_argument("--profile", default="full,lora")
    parser.add_argument("--full-model", default="qwen2.5-0.5b")
    parser.add_argument("--lora-model", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--phases", action="store_true",
                        help="also split each variant's step into forward, backward and update, GPU time against the "
                             "host's time to enqueue each (phase_split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", action="store_true", help="also time causal SDPA under each backend")
    parser.add_argument("--skip-hf-mask-sync", action="store_true",
                        help="skip transformers' find_packed_sequence_indices, whose .all() is a host sync in every "
                             "forward without an attention mask (these batches are never packed, so it finds none); "
                             "chronicals' packed attention skips it itself, so this changes only unpatched variants")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step_profile.py times CUDA kernels; it needs a CUDA GPU")
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    args.profile = set(args.profile.split(","))
    if args.skip_hf_mask_sync:
        import transformers.masking_utils as masking_utils

        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    args.out.mkdir(parents=True, exist_ok=True)
    if args.attention:
        attention = attention_backends(args.batch, args.seq_len)
        (args.out / "attention_backends.json").write_text(json.dumps(attention, indent=1))
        print(json.dumps(attention), flush=True)
    rows = []
    for name in names:
        try:
            row = run_variant(name, args)
        except Exception as exc:  # one failed variant is recorded; the rest still run
            row = {"variant": name, "status": "crashed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        (args.out / "step_profile.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k not in ("profile", "traceback")}), flush=True)
    print(f"\n{'variant':32} {'ms':>8} {'b2b ms':>8} {'tok/s':>10} {'GiB':>6} {'loss':>8}")
    for row in rows:
        if "step_ms" in row:
            print(f"{row['variant']:32} {row['step_ms']:8.1f} {row['back_to_back_ms']:8.1f} "
                  f"{row['tokens_per_s']:10.0f} {row['peak_alloc_gib']:6.1f} {row['first_loss']:8.4f}")
        else:
            print(f"{row['variant']:32} {row.get('status')}: {row.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
