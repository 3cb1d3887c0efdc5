"""GPU benchmark of the RMSNorm, fused add + RMSNorm, SwiGLU and QK-RoPE kernels against PyTorch eager,
torch.compile and Liger-Kernel, at Llama-3-8B and Qwen2.5-0.5B shapes (16384 tokens, bf16).

    python3 benchmarks/kernel_ops.py --out DIR [--quick]

Per (model, op): every implementation is first checked against a float64 reference (relative
error of each output and gradient; ours must be no worse than eager PyTorch's own error plus the
tests' slack), then timed. Headline times replay CUDA graphs (GPU time, the host's launch overhead
hidden as it is in a training step), rotating input copies so that no call finds its data in L2, in
interleaved rounds that time every implementation in turn (a drift of clocks falls on all alike);
`events_ms` is the plain per-call time with launch overhead, for reference. The backward is timed
alone, replaying the backward of forwards run beforehand (retain_graph); an implementation whose
backward cannot be rerun gets (forward + backward) - forward, and its rows say so (`method`).
GB/s counts the bytes that must move, each once (see `_bytes`).
The copy bandwidth of a 2 GiB device-to-device copy is measured in the same run; the targets are
GB/s >= 80% of it and a time no slower than the fastest of eager, compile and Liger.
Without CUDA it runs only the correctness checks, at tiny shapes under TRITON_INTERPRET=1.
Writes DIR/kernels.json and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks._timing import bench_graph_ms, bench_ms, copy_bandwidth_gbs, l2_bytes, summarize  # noqa: E402
from chronicals.kernels import fused_add_rmsnorm, fused_qk_rope, fused_rmsnorm, fused_swiglu  # noqa: E402
from harness.provenance import snapshot  # noqa: E402

MODELS = {
    "llama-3-8b": dict(tokens=16384, hidden=4096, inter=14336, n_q=32, n_k=8, head_dim=128, eps=1e-5),
    "qwen2.5-0.5b": dict(tokens=16384, hidden=896, inter=4864, n_q=14, n_k=2, head_dim=64, eps=1e-6),
}
TINY = {"tiny": dict(tokens=37, hidden=100, inter=300, n_q=4, n_k=2, head_dim=16, eps=1e-6)}
SLACK = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}  # as tests/oracle.py
PEERS = ("eager", "compile", "liger")
ROUNDS = 3  # interleaved timing rounds (see time_impls)


# ---- reference (Hugging Face) implementations; in float64 they are the ground truth ----
def hf_rmsnorm(x, w, eps):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def hf_add_rmsnorm(x, r, w, eps):
    s = x + r
    return s, hf_rmsnorm(s, w, eps)


def hf_swiglu(a, b):
    return torch.nn.functional.silu(a) * b


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ---- the ops: inputs, implementations, bytes ----
def _make_inputs(op, m, dtype, device, seed):
    """(tensors, indices of those that get gradients). Llama-like magnitudes; packed positions."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)
    weight = lambda n: torch.nn.Parameter((torch.rand(n, generator=g, device=device) + 0.5).to(dtype))
    t, h = m["tokens"], m["hidden"]
    if op == "rmsnorm":
        return [rnd(t, h), weight(h)], [0, 1]
    if op == "add_rmsnorm":
        w = weight(h)
        return [rnd(t, h), rnd(t, h), w], [0, 1, 2]
    if op == "swiglu":
        return [3 * rnd(t, m["inter"]), rnd(t, m["inter"])], [0, 1]
    d = m["head_dim"]
    q = rnd(1, t, m["n_q"], d).transpose(1, 2)  # HF: view(B, S, H, D).transpose(1, 2)
    k = rnd(1, t, m["n_k"], d).transpose(1, 2)
    pos = torch.arange(t, device=device) % 4096  # packed: positions restart every 4096 tokens
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)[None]
    return [q, k, emb.cos().to(dtype), emb.sin().to(dtype)], [0, 1]


def _bytes(op, m, e):
    """(forward, backward) bytes that must move, each counted once, for element size e."""
    t, h, i = m["tokens"], m["hidden"], m["inter"]
    if op == "rmsnorm":  # fwd: x -> y; bwd: x, dy -> dx; w read, dw written
        return 2 * t * h * e + h * e, 3 * t * h * e + 2 * h * e
    if op == "add_rmsnorm":  # fwd: x, r -> s, y; bwd: s, ds, dy -> d(x) (= d(r), one tensor)
        return 4 * t * h * e + h * e, 4 * t * h * e + 2 * h * e
    if op == "swiglu":  # fwd: a, b -> c; bwd: dc, a, b -> da, db
        return 3 * t * i * e, 5 * t * i * e
    qk = t * (m["n_q"] + m["n_k"]) * m["head_dim"] * e  # q and k, read and written, plus cos and sin: their
    cs = 2 * t * (m["head_dim"] // 2) * e  # first halves (HF's halves are equal; Liger and we read only those)
    return 2 * qk + cs, 2 * qk + cs


def rope_as_patched(q, k, cos, sin):
    """fused_qk_rope as the patched attention calls it (chronicals/models/rope.py): HF's cos/sin repeat their
    halves, so it passes the first halves (views)."""
    half = cos.shape[-1] // 2
    return fused_qk_rope(q, k, cos[..., :half], sin[..., :half])


class _RopeInPlace(torch.autograd.Function):
    """The A/B of rotating q and k where they lie, forward and backward, as Liger's RoPE does, in place of writing
    new tensors (the library's way). The bytes moved are the same; what may differ is L2 (the stores hit lines
    the program has just loaded). Not marked dirty, as Liger's is not, so it runs on the checks' leaves too."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from chronicals.kernels import rope

        ctx.save_for_backward(cos, sin)
        rope.qk_rope_launch(q, k, q, k, cos, sin, None, backward=False)
        return q.view_as(q), k.view_as(k)

    @staticmethod
    def backward(ctx, dq, dk):
        from chronicals.kernels import rope

        cos, sin = ctx.saved_tensors
        dq, dk = rope._unit_last_stride(dq), rope._unit_last_stride(dk)
        rope.qk_rope_launch(dq, dk, dq, dk, cos, sin, None, backward=True)
        return dq, dk, None, None


def rope_in_place(q, k, cos, sin):
    half = cos.shape[-1] // 2
    return _RopeInPlace.apply(q, k, cos[..., :half], sin[..., :half])


def _ours(op, eps):
    return {
        "rmsnorm": lambda x, w: fused_rmsnorm(x, w, eps=eps),
        "add_rmsnorm": lambda x, r, w: fused_add_rmsnorm(x, r, w, eps=eps),
        "swiglu": fused_swiglu,
        "rope": rope_as_patched,
    }[op]


def _eager(op, eps):
    return {
        "rmsnorm": lambda x, w: hf_rmsnorm(x, w, eps),
        "add_rmsnorm": lambda x, r, w: hf_add_rmsnorm(x, r, w, eps),
        "swiglu": hf_swiglu,
        "rope": hf_rope,
    }[op]


def _liger(op, eps, example):
    """Liger-Kernel's implementation as a function with our argument order and output order;
    raises ImportError (or another error) when this Liger lacks it."""
    if op == "rmsnorm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda x, w: LigerRMSNormFunction.apply(x, w, eps)
    if op == "add_rmsnorm":
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        x, r, w = example

        def run(x_, r_, w_):  # Liger's module defaults: offset 0, Llama casting, not in place
            return LigerFusedAddRMSNormFunction.apply(x_, r_, w_, eps, 0.0, "llama", False)

        with torch.no_grad():  # which output is the sum? (Liger returns the norm first)
            sum_first = torch.equal(run(x, r, w)[0], x + r)
        return run if sum_first else (lambda x_, r_, w_: tuple(reversed(run(x_, r_, w_))))
    if op == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb


# Launch settings to A/B against the defaults, applied to the forward and the backward alike. History: the H100 run of
# 2026-12-06 had every forward 13-17% behind the fastest peer while every backward led; the H200 runs of the same day
# traced most of it to the loads' evict_first L2 policy (now the default policy, except in RMSNorm's backward).
# SwiGLU: (elements per program, warps), default (1024, 4), Inductor's pointwise launch (its SASS for SwiGLU matched
# ours per element, nvdisasm of both built for sm90, before the approximate sigmoid), and tl.sigmoid and the
# compiler's bf16 cvt in place of _utils.sigmoid and widen; RMSNorm: elements per program (default 2048) and the
# forward's L2 policy fixed in place of its rule, and for the backward (60-70% of copy at Qwen's 896 columns) its
# pipeline depth, programs per SM (default 2) and the dw reduction's rows per step (default 256); RoPE: fixed
# (positions per program, warps) in place of the tuner, and the public call with HF's full cos/sin rows in place of
# the patched models' first halves, rotating in place (Liger's way), output offsets formed from the outputs' own
# strides where they equal the inputs', and bf16 widened by the compiler's cvt in place of bit moves.
SWIGLU_LAUNCHES = ((4096, 8), (2048, 4))
RMSNORM_TILES = (1024, 4096, 8192)
RMSNORM_BWD_STAGES = (3, 4, 8)  # the backward's pipeline depth (the default's variant measures the run's spread)
ROPE_LAUNCHES = ((1, 4), (4, 4), (8, 8))


class _Variant:
    """Our op with some of its module's launch constants changed: a context manager that the check and the timing
    enter around every use, so the forward and the backward (launched later, by autograd) both see the change."""

    def __init__(self, fn, module, **values):
        self.fn, self.module, self.values = fn, module, values

    def __call__(self, *args):
        return self.fn(*args)

    def __enter__(self):
        self.saved = {name: getattr(self.module, name) for name in self.values}
        vars(self.module).update(self.values)

    def __exit__(self, *exc):
        vars(self.module).update(self.saved)


def _settings_of(fn):
    return fn if isinstance(fn, _Variant) else contextlib.nullcontext()


def _launch_variants(op, eps):
    from chronicals.kernels import _utils

    # Every op with the int64 offsets it formed before the int32 path (needs_int64), for the A/B of that change.
    return {**_tuning_variants(op, eps),
            "chronicals[int64 offsets]": _Variant(_ours(op, eps), _utils, FORCE_INT64=True)}


def _tuning_variants(op, eps):
    from chronicals.kernels import rms_norm, rope, swiglu

    if op == "swiglu":
        return {**{f"chronicals[b{b}w{w}]": _Variant(fused_swiglu, swiglu, _BLOCK=b, _NUM_WARPS=w)
                   for b, w in SWIGLU_LAUNCHES},
                "chronicals[evict_first]": _Variant(fused_swiglu, swiglu, _FWD_EVICTION="evict_first",
                                                    _BWD_EVICTION="evict_first"),
                "chronicals[precise sigmoid]": _Variant(fused_swiglu, swiglu, _FAST_SIGMOID=False),
                "chronicals[cvt widen]": _Variant(fused_swiglu, swiglu, _BIT_WIDEN=False),
                "chronicals[precise sigmoid, cvt widen]": _Variant(fused_swiglu, swiglu, _FAST_SIGMOID=False,
                                                                   _BIT_WIDEN=False)}
    if op in ("rmsnorm", "add_rmsnorm"):
        return {**{f"chronicals[tile{t}]": _Variant(_ours(op, eps), rms_norm, _TILE_ELEMENTS=t)
                   for t in RMSNORM_TILES},
                **{f"chronicals[bwd {n} stages]": _Variant(_ours(op, eps), rms_norm, _MAX_BWD_STAGES=n)
                   for n in RMSNORM_BWD_STAGES},
                "chronicals[4 bwd programs/SM]": _Variant(_ours(op, eps), rms_norm, _PROGRAMS_PER_SM=4),
                "chronicals[dw reduce 64 rows]": _Variant(_ours(op, eps), rms_norm, _REDUCE_BLOCK_P=64),
                "chronicals[fwd evict_first]": _Variant(_ours(op, eps), rms_norm, _FWD_EVICTION="evict_first"),
                "chronicals[fwd default L2]": _Variant(_ours(op, eps), rms_norm, _FWD_EVICTION="")}
    return {**{f"chronicals[p{p}w{w}]": _Variant(rope_as_patched, rope, _LAUNCH=(p, w)) for p, w in ROPE_LAUNCHES},
            "chronicals[evict_first]": _Variant(rope_as_patched, rope, _EVICTION="evict_first"),
            "chronicals[full cos/sin rows]": _Variant(fused_qk_rope, rope),
            "chronicals[in place]": _Variant(rope_in_place, rope),
            "chronicals[own output offsets]": _Variant(rope_as_patched, rope, _OUT_OFFSETS_SHARED=False),
            "chronicals[cvt widen]": _Variant(rope_as_patched, rope, _BIT_WIDEN=False)}


def _implementations(op, eps, example, device):
    impls, missing = {"chronicals": _ours(op, eps), "eager": _eager(op, eps)}, {}
    if device == "cuda":
        impls.update(_launch_variants(op, eps))
        impls["compile"] = torch.compile(_eager(op, eps), dynamic=False)
        try:
            impls["liger"] = _liger(op, eps, example)
        except Exception as exc:  # a peer that is missing or lacks this op is skipped, not fatal
            missing["liger"] = f"{type(exc).__name__}: {exc}"
    return impls, missing


# ---- correctness ----
def _outputs_and_grads(fn, inputs, grad_idx, upstream):
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # clone: Liger's RMSNorm backward writes its result into the upstream gradient
    grads = torch.autograd.grad(outs, [leaves[i] for i in grad_idx],
                                [u.to(o.dtype).clone() for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs] + list(grads)


def _rel_err(x, ref):
    x = x.double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom or 1.0)


def check(op, m, impls, inputs, grad_idx, upstream, dtype):
    """Relative error of every output and gradient of each implementation against float64.
    Returns {impl: {"errors": {...}, "ok": bool}} where ok means: no worse than eager + slack."""
    ref = _outputs_and_grads(_eager(op, m["eps"]), [t.double() for t in inputs], grad_idx,
                             [u.double() for u in upstream])
    results = {}
    for name, fn in impls.items():
        try:
            with _settings_of(fn):
                got = _outputs_and_grads(fn, inputs, grad_idx, upstream)
            results[name] = {"errors": [_rel_err(x, r) for x, r in zip(got, ref)]}
        except Exception as exc:
            results[name] = {"errors": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    native = results["eager"]["errors"]
    for res in results.values():
        errs = res["errors"]
        res["ok"] = errs is not None and all(e <= n + SLACK[dtype] for e, n in zip(errs, native))
    del ref
    return results


# ---- timing ----
def _cycling(items):
    """A callable returning the next of `items` each call, round and round."""
    state = {"i": 0}

    def pick():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return pick


def _passes(fn, sets, grad_idx, stream):
    """{pass: callable}, each cycling through the input sets. "bwd" runs only the backward, of forwards run here, once
    per set, on `stream`: autograd launches each backward op on the stream of its forward op, so the forwards must run
    on the stream that captures (or times) the backward; retain_graph keeps their saved tensors for the next call.
    "fwd_bwd" is the fallback for an implementation whose backward cannot be rerun (its backward is then
    (forward + backward) - forward)."""
    pick_fwd, pick_fwd_bwd = _cycling(sets), _cycling(sets)
    graphs = []
    with torch.cuda.stream(stream):
        for inputs, upstream in sets:
            graphs.append((_tuple(fn(*inputs)), [inputs[i] for i in grad_idx], list(upstream)))
    pick_graph = _cycling(graphs)

    def fwd():
        return fn(*pick_fwd()[0])

    def bwd():
        outs, wrt, upstream = pick_graph()
        return torch.autograd.grad(outs, wrt, upstream, retain_graph=True)

    def fwd_bwd():
        inputs, upstream = pick_fwd_bwd()
        torch.autograd.grad(_tuple(fn(*inputs)), [inputs[i] for i in grad_idx], list(upstream))

    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd_bwd}


# How each pass is timed, in order of preference: a CUDA graph's replays (GPU time), else CUDA events per call (with
# launch overhead); for the backward, last, the difference of (forward + backward) and forward.
_METHODS = {"fwd": (("cuda_graph", "fwd"), ("events", "fwd")),
            "bwd": (("cuda_graph", "bwd"), ("events", "bwd"), ("cuda_graph", "fwd_bwd"), ("events", "fwd_bwd"))}


def time_impls(impls, sets, grad_idx, quick):
    """{impl: timing dict or the exception that stopped it}. Timed in ROUNDS interleaved rounds, each of which times
    every implementation once (graph replays of the forward, then of the backward alone), starting one further along
    each round: a drift of the GPU's clocks during the run then falls on all implementations alike, not on whichever
    was timed first. An implementation's time is the median over all rounds' replays. Round 0 picks each pass's method
    (_METHODS: the first that runs) and keeps the errors of those that did not."""
    names = list(impls)
    calls = len(sets) * max(1, (6 if quick else 20) // len(sets))
    stream = torch.cuda.Stream()
    times = {name: {"fwd": [], "bwd": []} for name in names}
    chosen, per_call, method_errors, failed = {}, {}, {}, {}
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in failed:
                continue
            fn = impls[name]
            try:
                with _settings_of(fn):
                    passes = _passes(fn, sets, grad_idx, stream)
                    for pas in ("fwd", "bwd"):
                        for how, which in ([chosen[(name, pas)]] if (name, pas) in chosen else _METHODS[pas]):
                            try:
                                if how == "cuda_graph":
                                    got = bench_graph_ms(passes[which], calls=calls, replays=3 if quick else 5,
                                                         stream=stream)["times_ms"]
                                else:
                                    got = [bench_ms(passes[which], rep_ms=40)["ms"]]
                            except Exception as exc:  # a peer that cannot be captured (or rerun) falls back
                                torch.cuda.synchronize()
                                method_errors.setdefault((name, pas), []).append(
                                    f"{how} {which}: {type(exc).__name__}: {exc}"[:300])
                                continue
                            chosen[(name, pas)] = (how, which)
                            times[name][pas] += got
                            if r == 0:  # the plain per-call time, with launch overhead, once for reference
                                per_call[(name, pas)] = bench_ms(passes[which], rep_ms=40 if quick else 100)["ms"]
                            break
                        else:
                            raise RuntimeError(f"{pas}: no timing method ran: {method_errors[(name, pas)]}")
                    del passes  # frees the retained forwards' saved tensors
            except Exception as exc:
                torch.cuda.synchronize()
                failed[name] = exc
    return {name: failed[name] if name in failed else _summary(times[name], chosen, per_call, method_errors, name)
            for name in names}


def _summary(times, chosen, per_call, method_errors, name):
    """Each pass's median and spread, method, per-call time and the errors of the methods that did not run. A backward
    timed as (forward + backward) has the forward's median subtracted."""
    out = {}
    for pas in ("fwd", "bwd"):
        how, which = chosen[(name, pas)]
        out[pas] = summarize(times[pas], how) | {"events_ms": per_call[(name, pas)]}
        if which == "fwd_bwd":
            fwd = out["fwd"]
            out[pas] = out[pas] | {"method": f"{how}, (fwd + bwd) - fwd", "ms": max(out[pas]["ms"] - fwd["ms"], 1e-6),
                                   "p20_ms": out[pas]["p20_ms"] - fwd["ms"], "p80_ms": out[pas]["p80_ms"] - fwd["ms"],
                                   "events_ms": out[pas]["events_ms"] - fwd["events_ms"]}
        if (name, pas) in method_errors:
            out[pas]["method_errors"] = method_errors[(name, pas)]
    return out


def run(models, dtype, device, quick, ops, save=lambda res: None):
    """The result dict; `save` gets it after each (model, op), so a time limit keeps what was measured."""
    rows, checks = [], []
    copy_gbs = copy_bandwidth_gbs() if device == "cuda" else None
    e = torch.tensor([], dtype=dtype).element_size()
    result_so_far = lambda: {"copy_gb_per_s": copy_gbs, "dtype": str(dtype).replace("torch.", ""),  # noqa: E731
                             "timing_rounds": ROUNDS, "rows": rows, "checks": checks}
    for model, m in models.items():
        for op in ops:
            save(result_so_far())
            inputs, grad_idx = _make_inputs(op, m, dtype, device, seed=0)
            _needs_grad(inputs, grad_idx)
            with torch.no_grad():
                outs = _tuple(_eager(op, m["eps"])(*inputs))
            g = torch.Generator(device=device).manual_seed(1)
            # Each upstream gradient in the memory layout of the output it belongs to (empty_like keeps the strides of
            # RoPE's outputs: q's and k's [B, S, H, D] memory), as SDPA's backward hands dq/dk back in training.
            # Contiguous [B, H, S, D] gradients had every RoPE backward read a layout training never gives it, and
            # Liger's copy it first.
            upstream = [torch.empty_like(o).normal_(generator=g) for o in outs]
            del outs
            impls, missing = _implementations(op, m["eps"], inputs, device)
            result = check(op, m, impls, inputs, grad_idx, upstream, dtype)
            for name, res in result.items():
                checks.append({"model": model, "op": op, "impl": name, **res})
            for name, reason in missing.items():
                rows.append({"model": model, "op": op, "impl": name, "status": "unavailable", "reason": reason})
            if device != "cuda":
                continue
            fwd_b, bwd_b = _bytes(op, m, e)
            # Enough input copies that a pass over all of them moves 3x the L2 size: no call finds its data there.
            n_sets = max(1, math.ceil(3 * l2_bytes() / min(fwd_b, bwd_b)))
            sets = [(inputs, upstream)] + [
                (_needs_grad(_make_inputs(op, m, dtype, device, seed=s)[0], grad_idx), [u.clone() for u in upstream])
                for s in range(1, n_sets)
            ]
            for name in impls:
                if result[name].get("errors") is None:
                    rows.append({"model": model, "op": op, "impl": name, "status": "crashed",
                                 "reason": result[name]["error"]})
            timed = time_impls({n: f for n, f in impls.items() if result[n].get("errors") is not None}, sets,
                               grad_idx, quick)
            for name, t in timed.items():
                if isinstance(t, Exception):
                    rows.append({"model": model, "op": op, "impl": name, "status": "crashed",
                                 "reason": f"{type(t).__name__}: {t}"[:300]})
                    continue
                for pas, nbytes in (("fwd", fwd_b), ("bwd", bwd_b)):
                    timing = t[pas]
                    gbs = nbytes / (timing["ms"] * 1e-3) / 1e9
                    rows.append({"model": model, "op": op, "impl": name, "pass": pas, "status": "ok",
                                 "gb_per_s": gbs, "frac_of_copy": gbs / copy_gbs, "bytes": nbytes, **timing})
            del sets, inputs, upstream, impls
            torch.cuda.empty_cache()
    _judge(rows)
    return result_so_far()


def _needs_grad(inputs, grad_idx):
    for i in grad_idx:
        inputs[i].requires_grad_(True)
    return inputs


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _judge(rows):
    """Mark each chronicals row with the two targets: >= 80% of copy bandwidth, and no slower than the
    fastest peer (eager, compile, Liger) measured for the same model, op and pass."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        if r["impl"] != "chronicals":
            continue
        peers = [p["ms"] for p in ok if p["impl"] in PEERS and (p["model"], p["op"], p["pass"]) ==
                 (r["model"], r["op"], r["pass"])]
        r["fastest_peer_ms"] = min(peers) if peers else None
        r["meets_bandwidth"] = r["frac_of_copy"] >= 0.8
        r["meets_speed"] = bool(peers) and r["ms"] <= min(peers)


def print_table(res):
    if res["copy_gb_per_s"]:
        print(f"\ncopy bandwidth: {res['copy_gb_per_s']:.0f} GB/s (read + write), dtype {res['dtype']}")
    print("\ncorrectness (relative error vs float64 of each output and gradient; ok = no worse than eager + slack)")
    for c in res["checks"]:
        errs = " ".join(f"{e:.1e}" for e in c["errors"]) if c["errors"] else c.get("error", "")
        print(f"  {c['model']:<13} {c['op']:<12} {c['impl']:<11} {'ok ' if c['ok'] else 'BAD'} {errs}")
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    if ok:
        print(f"\n{'model':<13} {'op':<12} {'pass':<4} " + " ".join(f"{n:>18}" for n in ("chronicals",) + PEERS)
              + "   %copy  targets")
        keys = sorted({(r["model"], r["op"], r["pass"]) for r in ok}, key=lambda k: (k[0], k[1], k[2] != "fwd"))
        for key in keys:
            cell = {r["impl"]: r for r in ok if (r["model"], r["op"], r["pass"]) == key}
            cols = [f"{cell[n]['ms'] * 1e3:7.1f}us {cell[n]['gb_per_s']:5.0f}GB/s" if n in cell else f"{'-':>18}"
                    for n in ("chronicals",) + PEERS]
            ours = cell.get("chronicals", {})
            targets = ("bw " + ("ok" if ours.get("meets_bandwidth") else "MISS") + ", speed "
                       + ("ok" if ours.get("meets_speed") else "MISS")) if ours else ""
            print(f"{key[0]:<13} {key[1]:<12} {key[2]:<4} " + " ".join(cols)
                  + f"   {ours.get('frac_of_copy', float('nan')) * 100:5.1f}  {targets}")
    for r in ok:
        if r["impl"].startswith("chronicals["):
            print(f"  {r['model']} {r['op']} {r['impl']} {r['pass']}: {r['ms'] * 1e3:.1f}us {r['gb_per_s']:.0f}GB/s")
    for r in res["rows"]:
        if r["status"] != "ok":
            print(f"  {r['model']} {r['op']} {r['impl']}: {r['status']} ({r['reason'][:120]})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for kernels.json")
    parser.add_argument("--quick", action="store_true", help="Llama-3-8B shapes only, fewer timed replays")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ops", default="rmsnorm,add_rmsnorm,swiglu,rope", help="comma-separated subset")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - {"rmsnorm", "add_rmsnorm", "swiglu", "rope"}
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}")
    if device == "cuda":
        models = {"llama-3-8b": MODELS["llama-3-8b"]} if args.quick else MODELS
    else:
        print("no CUDA device: running the correctness checks at tiny shapes (TRITON_INTERPRET=1), no timing")
        models = TINY
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = snapshot() | {"argv": sys.argv[1:]}

    def save(res, partial=True):
        res = res | {"provenance": provenance | {"wall_s": round(time.time() - start, 1)}, "partial": partial}
        (args.out / "kernels.json").write_text(json.dumps(res, indent=1))
        return res

    res = save(run(models, dtype, device, args.quick, ops, save), partial=False)
    print_table(res)
    all_ok = all(c["ok"] for c in res["checks"] if c["impl"] == "chronicals")
    print(f"\nwrote {args.out / 'kernels.json'} in {res['provenance']['wall_s']} s; "
          f"chronicals correctness: {'ok' if all_ok else 'FAILED'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
