"""GPU check of padding-free packing: packed (varlen) attention against dense causal SDPA, and a training step
of a Qwen2.5-0.5B-shaped model on a variable-length batch, packed against padded to the longest sequence.

    python3 benchmarks/packing.py --out DIR [--quick]

1. Correctness first, on the GPU: every varlen attention backend (output and q/k/v gradients, bf16) against a
   float64 per-sequence reference, allowed twice the error of bf16 per-sequence attention plus the tests'
   slack; whether `varlen_attn` takes fewer K/V heads than Q heads natively (GQA, no repeat); and a 2-layer
   Qwen2.5-0.5B-shaped model patched with every flag, where each sequence's loss and gradients in a packed bf16
   batch must be as close to the fp32 model run on that sequence alone as bf16 run alone is (x2 + slack).
2. Attention only (14 q / 2 kv heads x 64, bf16, forward + backward, CUDA events, L2 flushed): 16 sequences
   of 32..2048 tokens packed, against dense causal SDPA over the same number of tokens in rows of 2048.
   Target: packed within 10% of dense.
3. Training step (forward, backward, fused AdamW step; all chronicals flags): the same kind of batch packed
   into one row vs padded to its longest sequence. Real tokens/s counts label tokens that are not padding and
   not ignore_index (identical in both), divided by the median step time.
Without CUDA it runs the correctness checks only, at tiny shapes on the CPU. Writes DIR/packing.json and
prints a table last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder would be first on sys.path, where a module could shadow a package of the same name
# that transformers imports (benchmarks/kernels.py once shadowed `kernels`): import from the repository root only.
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import chronicals  # noqa: E402
from chronicals import attention  # noqa: E402
from chronicals.attention import PackedLayout, varlen_attention  # noqa: E402
from chronicals.models import build_model  # noqa: E402
from harness.provenance import snapshot  # noqa: E402

SLACK = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}  # as tests/oracle.py
HEADS = (14, 2, 64)  # Qwen2.5-0.5B: q heads, kv heads, head dim
ROW = 2048


def rel_err(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def spread_lengths(n: int, seed: int, lo: int = 32, hi: int = ROW, multiple_of: int | None = None) -> list[int]:
    """n lengths uniform in [lo, hi] including both ends; with `multiple_of`, the last one is chosen so that
    the total is a multiple of it (re-drawn until that last length also lies in [lo, hi])."""
    rng = random.Random(seed)
    while True:
        lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 3)]
        rng.shuffle(lengths)
        last = rng.randint(lo, hi) if multiple_of is None else multiple_of - sum(lengths) % multiple_of
        if lo <= last <= hi:
            return lengths + [last]


def layout_of(lengths, device) -> PackedLayout:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return PackedLayout(cu, max(lengths))


def per_sequence_attention(q, k, v, lengths):
    """Dense causal attention sequence by sequence (SDPA math in q's dtype), the reference."""
    n_rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        qi, ki, vi = (x[sl].repeat_interleave(r, 1).transpose(0, 1) for x, r in ((q, 1), (k, n_rep), (v, n_rep)))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


def available_backends(device) -> list[str]:
    names = ["sdpa_loop"]
    if device == "cuda":
        names = [b for b in attention.BACKENDS if b not in names and attention.available(b)] + names
    return names


# ---- 1. correctness ----------------------------------------------------------------------------------------------
def check_attention(device, dtype, lengths) -> list[dict]:
    hq, hkv, d = HEADS
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    base = [torch.randn(total, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]
    grad = torch.randn(total, hq, d, generator=g, dtype=torch.float64)

    def run(fn, dt):
        leaves = [t.to(device, dt).requires_grad_() for t in base]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad.to(device, dt))]

    truth = run(lambda q, k, v: per_sequence_attention(q, k, v, lengths), torch.float64)
    native = run(lambda q, k, v: per_sequence_attention(q, k, v, lengths), dtype)
    rows = []
    default = attention.select_backend(torch.device(device), dtype, HEADS[2])
    for backend in available_backends(device):
        gate = backend == default  # the path models take gates the exit code; the others are information
        try:
            ours = run(lambda q, k, v, b=backend: varlen_attention(q, k, v, layout_of(lengths, device), backend=b),
                       dtype)
        except Exception as exc:
            rows.append({"check": f"varlen {backend}", "error": float("nan"), "bound": float("nan"), "ok": False,
                         "gate": gate, "reason": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        for name, o, n, t in zip(("out", "dq", "dk", "dv"), ours, native, truth):
            e, bound = rel_err(o, t), 2 * rel_err(n, t) + SLACK[dtype]
            rows.append({"check": f"varlen {backend} {name}", "error": e, "bound": bound, "ok": e <= bound,
                         "gate": gate})
    return rows


def check_packed_model(device, dtype, truth_dtype, lengths, layers: int) -> list[dict]:
    """Each sequence's loss and gradients in a packed batch vs that sequence alone (truth: `truth_dtype`)."""
    preset = "qwen2.5-0.5b" if device == "cuda" else "tiny-qwen2"
    overrides = {"num_hidden_layers": layers} if device == "cuda" else {}
    truth_model = chronicals.apply(build_model(preset, seed=0, dtype=truth_dtype, **overrides).to(device)).train()
    model = chronicals.apply(build_model(preset, seed=0, dtype=dtype, **overrides).to(device)).train()
    model.load_state_dict(truth_model.state_dict())
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).to(device) for n in lengths]

    def loss_and_grad(m, batch, n_targets):
        m.zero_grad(set_to_none=True)
        loss = m(**batch, num_items_in_batch=n_targets).loss
        loss.backward()
        return [loss.detach()] + [p.grad.flatten() for p in m.parameters()]

    rows = []
    for i, seq in enumerate(seqs):
        alone = {"input_ids": seq[None], "labels": seq[None]}
        labels = [torch.cat([s.new_tensor([-100]), s[1:]]) if j == i else torch.full_like(s, -100)
                  for j, s in enumerate(seqs)]
        packed = {"input_ids": torch.cat(seqs)[None], "labels": torch.cat(labels)[None],
                  "position_ids": torch.cat([torch.arange(len(s), device=device) for s in seqs])[None],
                  "cu_seq_lens_q": layout_of(lengths, device).cu_seqlens, "max_length_q": max(lengths)}
        truth = loss_and_grad(truth_model, alone, len(seq) - 1)
        native = loss_and_grad(model, alone, len(seq) - 1)
        ours = loss_and_grad(model, packed, len(seq) - 1)
        for what, pick in (("loss", lambda r: r[0]), ("grads", lambda r: torch.cat(r[1:]))):
            e, bound = rel_err(pick(ours), pick(truth)), 2 * rel_err(pick(native), pick(truth)) + SLACK[dtype]
            rows.append({"check": f"packed model seq {i} (len {len(seq)}) {what}", "error": e, "bound": bound,
                         "ok": e <= bound})
    return rows


def gqa_facts(device) -> dict:
    if device != "cuda" or not attention._installed("torch.nn.attention.varlen"):
        return {}
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    dev = torch.device(device, torch.cuda.current_device())
    return {"varlen_attn_has_enable_gqa": "enable_gqa" in inspect.signature(varlen_attn).parameters,
            "varlen_attn_gqa_native": attention._torch_varlen_gqa_native(dev),
            "varlen_attn_gqa_mode_used": attention._torch_varlen_gqa_mode(dev)}


# ---- 2. attention-only timing ------------------------------------------------------------------------------------
def time_attention(lengths, quick, dev="cuda", bench_ms=None) -> list[dict]:
    if bench_ms is None:
        from benchmarks._timing import bench_ms

    hq, hkv, d = HEADS
    total, dtype = sum(lengths), torch.bfloat16
    rows_dense = total // ROW
    rows_layout = layout_of([ROW] * rows_dense, dev)  # the dense batch's rows as sequences
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=dtype, generator=g, requires_grad=True)
               for h in (hq, hkv, hkv))
    grad = torch.randn(total, hq, d, device=dev, dtype=dtype, generator=g)
    layout = layout_of(lengths, dev)
    rep = lambda x: x.detach().repeat_interleave(hq // hkv, 1).requires_grad_()  # noqa: E731
    kr, vr = rep(k), rep(v)
    dense = lambda x: x.detach().view(rows_dense, ROW, x.shape[1], d).transpose(1, 2).requires_grad_()  # noqa: E731
    qd, kd, vd = dense(q), dense(k), dense(v)
    gd = grad.view(rows_dense, ROW, hq, d).transpose(1, 2)
    kdr, vdr = dense(kr), dense(vr)

    def fwd_bwd(fn, inputs, g_out):
        return lambda: torch.autograd.grad(fn(*inputs), inputs, g_out)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    variants = {
        "dense causal SDPA (GQA native)": fwd_bwd(lambda a, b, c: sdpa(a, b, c, is_causal=True, enable_gqa=True),
                                                  (qd, kd, vd), gd),
        "dense causal SDPA (K/V repeated)": fwd_bwd(lambda a, b, c: sdpa(a, b, c, is_causal=True), (qd, kdr, vdr), gd),
    }
    # Which SDPA kernel the dense time comes from (FlashAttention-2 vs cuDNN): the varlen paths are FA2.
    for kernel in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(torch.nn.attention.SDPBackend, kernel)
        variants[f"dense causal SDPA ({kernel.lower()} only, K/V repeated)"] = fwd_bwd(
            lambda a, b, c, be=backend: _with_sdpa_backend(be, sdpa, a, b, c), (qd, kdr, vdr), gd)
    for backend in available_backends(dev):
        if backend == "sdpa_loop" and quick:
            continue
        variants[f"packed {backend}"] = fwd_bwd(
            lambda a, b, c, n=backend: varlen_attention(a, b, c, layout, backend=n), (q, k, v), grad)
        if backend != "sdpa_loop":  # the dense batch through the same kernel: each 2048-token row one sequence
            variants[f"dense rows as sequences, {backend}"] = fwd_bwd(
                lambda a, b, c, n=backend: varlen_attention(a, b, c, rows_layout, backend=n), (q, k, v), grad)
        if backend in ("torch_varlen", "flash_attn"):
            variants[f"packed {backend} (K/V repeated)"] = fwd_bwd(
                lambda a, b, c, n=backend: varlen_attention(a, b, c, layout, backend=n), (q, kr, vr), grad)
    results = []
    for name, fn in variants.items():
        results.append(_timed(name, fn, bench_ms, quick))
    # A kernel compiled per layout (a JIT keyed on max_length, say) would stall every new batch: time the first call
    # on lengths not seen before, against the warm median.
    moved = sorted(lengths)
    moved[0], moved[-1] = moved[0] + 100, moved[-1] - 100  # same tokens, another max_length
    fresh = layout_of(moved, dev)
    for row in results:
        backend = row["variant"].removeprefix("packed ")
        if row["status"] == "ok" and backend in attention.BACKENDS and row["variant"].startswith("packed "):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.autograd.grad(varlen_attention(q, k, v, fresh, backend=backend), (q, k, v), grad)
            torch.cuda.synchronize()
            row["first_call_new_layout_ms"] = (time.perf_counter() - t0) * 1e3
    results += _flash_impls(lambda: fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, layout, backend="torch_varlen"),
                                            (q, k, v), grad), bench_ms, quick)
    dense_ms = results[0].get("ms")
    for r in results:
        if r.get("ms") and dense_ms:
            r["vs_dense"] = r["ms"] / dense_ms
    return results


def _with_sdpa_backend(backend, sdpa, q, k, v):
    with torch.nn.attention.sdpa_kernel(backend):
        return sdpa(q, k, v, is_causal=True)


def _timed(name, fn, bench_ms, quick) -> dict:
    try:
        fn()
        torch.cuda.synchronize()
        t = bench_ms(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 150)
        return {"variant": name, "status": "ok", **t}
    except Exception as exc:  # an unavailable backend is a result row, not a crash
        return {"variant": name, "status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:300]}


def _flash_impls(make_fn, bench_ms, quick) -> list[dict]:
    """torch's optional FlashAttention implementations (FA3/FA4), tried one at a time for varlen_attn."""
    try:
        from torch.nn.attention import (
            activate_flash_attention_impl,
            list_flash_attention_impls,
            restore_flash_attention_impl,
        )
    except ImportError:
        return []
    rows = []
    for impl in list_flash_attention_impls():
        name = f"packed torch_varlen with {impl}"
        try:
            activate_flash_attention_impl(impl)
        except Exception as exc:
            rows.append({"variant": name, "status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        try:
            rows.append(_timed(name, make_fn(), bench_ms, quick))
        finally:
            restore_flash_attention_impl()
    return rows


# ---- 3. training step --------------------------------------------------------------------------------------------
def batches(lengths, vocab, device):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    labels = [torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs]
    packed = {"input_ids": torch.cat(seqs)[None], "labels": torch.cat(labels)[None],
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
              "cu_seq_lens_q": layout_of(lengths, "cpu").cu_seqlens, "max_length_q": max(lengths)}
    longest = max(lengths)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    lab = torch.full((len(seqs), longest), -100)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], lab[i, :len(s)], mask[i, :len(s)] = s, s, 1
    padded = {"input_ids": ids, "labels": lab, "attention_mask": mask}
    move = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    return move(packed), move(padded), sum(lengths) - len(lengths)


def time_training(lengths, quick, preset="qwen2.5-0.5b", device="cuda") -> tuple[list[dict], list[dict]]:
    model = chronicals.apply(build_model(preset, seed=0, dtype=torch.bfloat16).to(device)).train()
    model.config.use_cache = False
    packed, padded, real_tokens = batches(lengths, model.config.vocab_size, device)
    with torch.no_grad():  # same weights, same sequences: both layouts must give the same mean loss
        loss_packed, loss_padded = model(**packed).loss.float().item(), model(**padded).loss.float().item()
    checks = [{"check": "training batch: packed loss vs padded loss", "error": abs(loss_packed - loss_padded)
               / abs(loss_padded), "bound": 1e-2, "ok": abs(loss_packed - loss_padded) / abs(loss_padded) <= 1e-2}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    rows = []
    for name, batch in (("packed (varlen)", packed), ("padded to longest", padded)):
        times = []
        torch.cuda.reset_peak_memory_stats()
        for step in range((1 if quick else 2) + (3 if quick else 8)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end.record()
            end.synchronize()
            if step >= (1 if quick else 2):
                times.append(start.elapsed_time(end))
        q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        ms = statistics.median(times)
        rows.append({"variant": name, "status": "ok", "step_ms": ms, "p20_ms": q[1], "p80_ms": q[7],
                     "tokens_in_batch": int(batch["input_ids"].numel()), "real_tokens": real_tokens,
                     "tokens_per_s": real_tokens / (ms / 1e3),
                     "peak_mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30})
    rows[0]["speedup_vs_padded"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows, checks


# ---- report ------------------------------------------------------------------------------------------------------


def print_table(res):
    facts = res.get("facts", {})
    if res.get("attention"):
        a = res["attention"]
        print(f"\nattention fwd+bwd, {a['tokens']} tokens ({a['sequences']} sequences of "
              f"{a['min_len']}..{a['max_len']}), {HEADS[0]} q / {HEADS[1]} kv heads x {HEADS[2]}, bf16; "
              f"dense = {a['tokens'] // ROW} rows x {ROW}")
        for r in a["rows"]:
            if r["status"] == "ok":
                first = f"   first call, new layout {r['first_call_new_layout_ms']:.1f} ms" \
                    if "first_call_new_layout_ms" in r else ""
                vs = r.get("vs_dense", float("nan"))
                print(f"  {r['variant']:<46} {r['ms']:8.3f} ms   x{vs:.2f} of dense{first}")
            else:
                print(f"  {r['variant']:<46} unavailable: {r['reason'][:70]}")
        vs_default = a.get("default_vs_dense") or float("nan")  # None when the default backend could not run
        print(f"  default packed path: {facts.get('default_backend')}, x{vs_default:.2f}"
              f" of dense -> target <= 1.10: {'ok' if a.get('meets_target') else 'MISS'}")
    if res.get("training"):
        t = res["training"]
        print(f"\ntraining step qwen2.5-0.5b, all flags, bf16, {t['sequences']} sequences of {t['min_len']}.."
              f"{t['max_len']} ({t['rows'][0]['real_tokens']} real tokens)")
        for r in t["rows"]:
            print(f"  {r['variant']:<20} {r['tokens_per_s']:10.0f} tok/s  {r['step_ms']:8.1f} ms  "
                  f"({r['tokens_in_batch']} tokens in batch)  peak {r['peak_mem_alloc_gib']:.1f} GiB")
        print(f"  packed / padded real tokens/s: x{t['rows'][0]['speedup_vs_padded']:.2f}")
    gated = [c for c in res["checks"] if c.get("gate", True)]
    print(f"\ncorrectness: {sum(c['ok'] for c in gated)}/{len(gated)} checks ok; GQA facts: "
          f"{ {k: v for k, v in facts.items() if k != 'default_backend'} }")
    for c in res["checks"]:
        if not c["ok"]:
            label = "FAILED" if c.get("gate", True) else "(not the default path) failed"
            detail = c.get("reason") or f"error {c['error']:.3e} > bound {c['bound']:.3e}"
            print(f"  {label} {c['check']}: {detail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for packing.json")
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions, no per-sequence loop timing")
    args = parser.parse_args(argv)
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"checks": [], "facts": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = snapshot() | {"argv": sys.argv[1:]}

    def save(partial=True):  # after each part, so a time limit keeps what was measured
        res["provenance"] = provenance | {"wall_s": round(time.time() - start, 1)}
        res["partial"] = partial
        (args.out / "packing.json").write_text(json.dumps(res, indent=1))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth model must be fp32
        res["facts"] = {"default_backend": attention.select_backend(torch.device(device), torch.bfloat16, HEADS[2]),
                        **gqa_facts(device)}
        res["checks"] += check_attention(device, torch.bfloat16, [33, 300, 1, 1000, 129, 2048])
        res["checks"] += check_packed_model(device, torch.bfloat16, torch.float32, [40, 300, 1000, 7], layers=2)
        save()
    else:
        print("no CUDA device: correctness checks only, at tiny shapes on the CPU (no timing)")
        res["facts"] = {"default_backend": attention.select_backend(torch.device(device), torch.float32)}
        res["checks"] += check_attention(device, torch.float32, [3, 17, 1, 40])
        res["checks"] += check_packed_model(device, torch.float32, torch.float64, [5, 12, 2], layers=2)
    if device == "cuda":
        att_lengths = spread_lengths(16, seed=0, multiple_of=ROW)
        rows = time_attention(att_lengths, args.quick)
        default = next((r for r in rows if r["variant"] == f"packed {res['facts']['default_backend']}"), {})
        res["attention"] = {"tokens": sum(att_lengths), "sequences": len(att_lengths), "min_len": min(att_lengths),
                            "max_len": max(att_lengths), "lengths": att_lengths, "rows": rows,
                            "default_vs_dense": default.get("vs_dense"),
                            "meets_target": (default.get("vs_dense") or 99) <= 1.10}
        save()
        train_lengths = spread_lengths(16, seed=1)
        train_rows, train_checks = time_training(train_lengths, args.quick)
        res["checks"] += train_checks
        res["training"] = {"sequences": len(train_lengths), "min_len": min(train_lengths),
                           "max_len": max(train_lengths), "lengths": train_lengths, "rows": train_rows}
    save(partial=False)
    print(f"wrote {args.out / 'packing.json'} in {res['provenance']['wall_s']} s")
    print_table(res)
    return 0 if all(c["ok"] for c in res["checks"] if c.get("gate", True)) else 1


if __name__ == "__main__":
    sys.exit(main())
