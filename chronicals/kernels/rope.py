"""Rotary position embedding of q and k in one Triton launch (Hugging Face rotate_half layout).

With x = [x1, x2] split in halves of D/2 and cos = [c1, c2], sin = [s1, s2] likewise, HF computes
    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
i.e. o1 = x1*c1 - x2*s1,  o2 = x2*c2 + x1*s2.
The backward applies the transposed map, rotate_half^T(y) = [y2, -y1]:
    g1 = y1*c1 + y2*s2,   g2 = y2*c2 - y1*s1
(for HF's cos/sin, whose halves are equal, that is the rotation by -theta).

One program handles POS_PER_PROG token positions; for each it reads the cos/sin row once and
rotates all q heads and all k heads (GQA: their counts differ). Memory-bound: per position of
b-byte elements it reads and writes (Hq + Hkv) * D * b and reads 2 * D cos/sin elements.
q and k are taken through their strides, so the [B, H, S, D] views that HF attention makes with
view(B, S, H, D).transpose(1, 2) need no copy, nor do the views of a fused q/k/v projection's output.
cos/sin are HF's per-position [B or 1, S, D] output, or a [max_pos, D] table indexed by position_ids
[B or 1, S] (packed batches restart positions per sequence). cos/sin get no gradient (HF computes them without one).
HF's rows repeat their halves (cat((freqs, freqs))), so a caller may pass only the first half (D/2 wide, a view):
the patched models do. Head counts and head_dim are compile-time constants, and heads that lie back to back (HF's
views) get a constant stride. H200, 2026-12-06, Qwen2.5-0.5B forward (16384 tokens, 14 q / 2 kv heads of 64;
scratch A/B, best launch of each): 22.0 us as it was, 20.6 specialised, 19.3 specialised with half tables (Liger
19.9, which reads half tables too); H100: 27.1, 26.5, 25.9 (Liger 26.0). At Llama-3-8B shapes all within 2%.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import INTERPRET, cast_rne, check_same, check_tensor, needs_int64, next_power_of_2, widen

_TILE_ELEMENTS = 4096  # elements of q and k per program, summed over its positions
_MAX_POS_PER_PROG = 8
_MAX_HEAD_ELEMENTS = 32768  # (Hq + Hkv) * D per position that one program's tile may hold
# L2 policy of the q/k loads ("" is the default policy). H200, 2026-12-06, Llama-3-8B (16384 tokens, HF's transposed
# q/k views): evict_first 90.3 / 92.5 us fwd / bwd, the default 86.4 / 87.5 (Liger's fwd 84.5, compile's bwd 92.0).
# _LAUNCH fixes (positions per program, warps) in place of the tuner; benchmarks/kernel_ops.py A/Bs both knobs (no
# fixed launch beat the tuner: 1 x 4 warps 90.2 us, 1 x 8 96.3, 2 x 8 96.4, 4 x 16 128.1).
_EVICTION = ""
_LAUNCH: tuple[int, int] | None = None
# Outputs strided as the inputs (HF's views of separate projections, every backward) are addressed with the inputs'
# offsets (OUT_LIKE_IN): sm90 SASS at Qwen's heads 216 -> 192 instructions, the outputs' strides never read. H100,
# 2026-12-07, two runs, shared / own offsets: Llama-3-8B fwd 113.5 / 114.2 us, bwd 112.9 / 115.1 (Liger 116.0 / 116.1);
# Qwen2.5-0.5B 25.2-25.8 either way (Liger 25.0-25.2). False forms them from the outputs' own strides (the A/B).
_OUT_OFFSETS_SHARED = True
# q/k/cos/sin in bf16 widen to fp32 by bit moves (_utils.widen) rather than the compiler's cvt: sm90 SASS at Qwen's
# heads 192 -> 184 instructions (2 warps). H100, 2026-12-07, same rounds, bits / cvt: Llama-3-8B fwd 113.8 / 115.2 us,
# bwd 113.5 / 114.8; Qwen2.5-0.5B, three runs, fwd 25.2-25.5 / 25.8-26.2, bwd 25.3-25.8 / 25.8-26.2 (Liger 25.3 /
# 25.4-25.6). False is the A/B.
_BIT_WIDEN = True


@triton.jit
def _heads(X, off, stride_h, valid, N_HEADS: tl.constexpr, HALF: tl.constexpr, DENSE_HEADS: tl.constexpr,
           BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, WIDE: tl.constexpr):
    # Pointers to the first halves of one position's N_HEADS heads, and their mask.
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = ((h < N_HEADS)[:, None] & (d < HALF)[None, :]) & valid
    if DENSE_HEADS:  # heads back to back (HF's views): a constant stride, so the addressing folds at compile time
        return X + off + h[:, None] * (2 * HALF) + d[None, :], mask
    if WIDE:
        h = h.to(tl.int64)
    return X + off + h[:, None] * stride_h + d[None, :], mask


@triton.jit
def _rotate_store(y_ptr, mask, x1, x2, c1, c2, s1, s2, HALF: tl.constexpr, BACKWARD: tl.constexpr):
    if BACKWARD:
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(y_ptr, cast_rne(o1, y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, cast_rne(o2, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
    sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
    scos_b, scos_s, ssin_b, ssin_s, spos_b, spos_s,
    seq_len,
    N_Q_HEADS: tl.constexpr, N_K_HEADS: tl.constexpr, HALF: tl.constexpr, DENSE_HEADS: tl.constexpr,
    HALF_TABLE: tl.constexpr, HAS_POS: tl.constexpr, BACKWARD: tl.constexpr, POS_PER_PROG: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, EVICTION: tl.constexpr,
    WIDE: tl.constexpr, OUT_LIKE_IN: tl.constexpr, BITS: tl.constexpr,
):
    # The grid is (position blocks of a sequence, batch): b and s come from the program ids. A flat grid over B * S
    # would divide by S for them (int64 division, a long instruction sequence) before any address is known. H100,
    # 2026-12-06, Qwen2.5-0.5B fwd, same call, two runs each: flat 25.3 / 25.3 us, 2-D 24.7 / 24.7 (Liger 24.2 / 24.3);
    # the backward and Llama-3-8B's shapes unchanged within 0.5%.
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    # Offsets in int32 unless WIDE (see _utils.needs_int64).
    b = tl.program_id(1)
    s0 = tl.program_id(0) * POS_PER_PROG
    if WIDE:
        b = b.to(tl.int64)
        s0 = s0.to(tl.int64)
    for i in tl.static_range(POS_PER_PROG):
        s = s0 + i
        valid = s < seq_len
        if HAS_POS:
            row = tl.load(POS + b * spos_b + s * spos_s, mask=valid, other=0)
            if WIDE:
                row = row.to(tl.int64)
            else:
                row = row.to(tl.int32)
            cos_off = row * scos_s
            sin_off = row * ssin_s
        else:
            cos_off = b * scos_b + s * scos_s
            sin_off = b * ssin_b + s * ssin_s
        m = d_ok & valid
        c1 = widen(tl.load(COS + cos_off + d, mask=m, other=0.0), BITS)
        s1 = widen(tl.load(SIN + sin_off + d, mask=m, other=0.0), BITS)
        if HALF_TABLE:  # cos/sin given as their first half: HF's repeat it, [f, f]
            c2 = c1
            s2 = s1
        else:
            c2 = widen(tl.load(COS + cos_off + HALF + d, mask=m, other=0.0), BITS)
            s2 = widen(tl.load(SIN + sin_off + HALF + d, mask=m, other=0.0), BITS)
        q_off = b * sq_b + s * sq_s
        k_off = b * sk_b + s * sk_s
        q_ptr, q_mask = _heads(Q, q_off, sq_h, valid, N_Q_HEADS, HALF, DENSE_HEADS, BLOCK_HQ, BLOCK_HALF, WIDE)
        k_ptr, k_mask = _heads(K, k_off, sk_h, valid, N_K_HEADS, HALF, DENSE_HEADS, BLOCK_HK, BLOCK_HALF, WIDE)
        # q's and k's loads all go out before the first store: as far as the compiler knows a store may alias a
        # later load, so loading k after storing q would cost each program a second DRAM round trip. H100, Llama-3-8B:
        # fwd / bwd 115.3 / 115.1 -> 113.5 / 113.5 us (Liger 116.4 / 115.5); at Qwen unchanged (25.2, Liger 24.3).
        q1 = widen(tl.load(q_ptr, mask=q_mask, other=0.0, eviction_policy=EVICTION), BITS)
        q2 = widen(tl.load(q_ptr + HALF, mask=q_mask, other=0.0, eviction_policy=EVICTION), BITS)
        k1 = widen(tl.load(k_ptr, mask=k_mask, other=0.0, eviction_policy=EVICTION), BITS)
        k2 = widen(tl.load(k_ptr + HALF, mask=k_mask, other=0.0, eviction_policy=EVICTION), BITS)
        if OUT_LIKE_IN:  # the outputs have the inputs' strides: the inputs' offsets serve (fewer integer ops)
            qo_off, qo_h, ko_off, ko_h = q_off, sq_h, k_off, sk_h
        else:
            qo_off, qo_h, ko_off, ko_h = b * sqo_b + s * sqo_s, sqo_h, b * sko_b + s * sko_s, sko_h
        qo_ptr, _ = _heads(QO, qo_off, qo_h, valid, N_Q_HEADS, HALF, DENSE_HEADS, BLOCK_HQ, BLOCK_HALF, WIDE)
        ko_ptr, _ = _heads(KO, ko_off, ko_h, valid, N_K_HEADS, HALF, DENSE_HEADS, BLOCK_HK, BLOCK_HALF, WIDE)
        _rotate_store(qo_ptr, q_mask, q1, q2, c1, c2, s1, s2, HALF, BACKWARD)
        _rotate_store(ko_ptr, k_mask, k1, k2, c1, c2, s1, s2, HALF, BACKWARD)


def _settings(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_HQ, BLOCK_HK, BLOCK_HALF, POS_PER_PROG); the last for untuned launches (interpreter, small calls)."""
    block_hq, block_hk = next_power_of_2(n_q_heads), next_power_of_2(n_k_heads)
    block_half = next_power_of_2(head_dim // 2)
    pos_per_prog = max(1, min(_MAX_POS_PER_PROG, _TILE_ELEMENTS // _per_position(block_hq, block_hk, block_half)))
    return block_hq, block_hk, block_half, pos_per_prog


def _per_position(block_hq: int, block_hk: int, block_half: int) -> int:
    return (block_hq + block_hk) * block_half * 2


def _prune(configs, named_args, **kwargs):
    """Keep the warp counts that give each thread 8..64 elements of one position (fewer leaves the
    threads idle, more spills registers); else the one nearest 32."""
    per_pos = _per_position(kwargs["BLOCK_HQ"], kwargs["BLOCK_HK"], kwargs["BLOCK_HALF"])
    per_thread = lambda c: per_pos / (32 * c.num_warps)
    kept = [c for c in configs if 8 <= per_thread(c) <= 64]
    return kept or [min(configs, key=lambda c: abs(per_thread(c) - 32))]


_TUNE_MIN_POSITIONS = 1024  # smaller calls (tests, short batches) take a fixed choice instead of tuning
# On the GPU the launch is tuned once per head counts, head_dim, dtype and direction: warps and
# positions per program decide how many programs fit on an SM (registers), so how many bytes are
# in flight. Tuning reruns the kernel, which is safe: it writes only its outputs.
_qk_rope_tuned = triton.autotune(
    configs=[triton.Config({"POS_PER_PROG": p}, num_warps=w) for p in (1, 2) for w in (1, 2, 4, 8, 16)],
    key=["N_Q_HEADS", "N_K_HEADS", "HALF", "DENSE_HEADS", "HALF_TABLE", "HAS_POS", "BACKWARD", "EVICTION", "WIDE",
         "OUT_LIKE_IN", "BITS"],
    prune_configs_by={"early_config_prune": _prune},
)(_qk_rope_kernel)


_MAX_GRID_BATCH = 65535  # CUDA's limit on the grid's second dimension, which runs over the batch


def qk_rope_launch(q, k, q_out, k_out, cos, sin, position_ids, backward: bool) -> None:
    """Rotate q, k ([B, H, S, D], unit last stride) into q_out, k_out (or un-rotate when `backward`).

    cos/sin: [Bc, S, D] with Bc in (1, B) when position_ids is None, else a [max_pos, D] table; either may hold
    only the first half of each row (last dimension D/2) when its halves are equal, as HF's are."""
    batch, n_q_heads, seq_len, head_dim = q.shape
    if batch > _MAX_GRID_BATCH:  # launch per slice of the batch; per-row cos/sin and position_ids are sliced along
        for b0 in range(0, batch, _MAX_GRID_BATCH):
            rows = slice(b0, b0 + _MAX_GRID_BATCH)
            per_row = position_ids is None and cos.shape[0] > 1
            qk_rope_launch(q[rows], k[rows], q_out[rows], k_out[rows], cos[rows] if per_row else cos,
                           sin[rows] if per_row else sin,
                           position_ids[rows] if position_ids is not None and position_ids.shape[0] > 1
                           else position_ids, backward)
        return
    n_k_heads = k.shape[1]
    n_pos = batch * seq_len
    if n_pos == 0:
        return
    if position_ids is None:
        scos_b = cos.stride(0) if cos.shape[0] > 1 else 0
        ssin_b = sin.stride(0) if sin.shape[0] > 1 else 0
        scos_s, ssin_s, spos_b, spos_s, pos = cos.stride(1), sin.stride(1), 0, 0, cos
    else:
        scos_b, ssin_b, scos_s, ssin_s = 0, 0, cos.stride(0), sin.stride(0)
        spos_b = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        spos_s, pos = position_ids.stride(1), position_ids
    block_hq, block_hk, block_half, pos_per_prog = _settings(n_q_heads, n_k_heads, head_dim)
    args = (
        q, k, q_out, k_out, cos, sin, pos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        scos_b, scos_s, ssin_b, ssin_s, spos_b, spos_s,
        seq_len,
    )
    dense = all(t.shape[1] == 1 or t.stride(1) == head_dim for t in (q, k, q_out, k_out))
    blocks = dict(N_Q_HEADS=n_q_heads, N_K_HEADS=n_k_heads, HALF=head_dim // 2, DENSE_HEADS=dense,
                  HALF_TABLE=cos.shape[-1] != head_dim, HAS_POS=position_ids is not None, BACKWARD=backward,
                  BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, EVICTION=_EVICTION,
                  WIDE=needs_int64(q, k, q_out, k_out, cos, sin, pos),
                  OUT_LIKE_IN=_OUT_OFFSETS_SHARED and q_out.stride()[:3] == q.stride()[:3]
                  and k_out.stride()[:3] == k.stride()[:3], BITS=_BIT_WIDEN)
    if _LAUNCH is not None:
        pos_per_prog, num_warps = _LAUNCH
        _qk_rope_kernel[(triton.cdiv(seq_len, pos_per_prog), batch)](*args, POS_PER_PROG=pos_per_prog, **blocks,
                                                                     num_warps=num_warps)
    elif INTERPRET or n_pos < _TUNE_MIN_POSITIONS:
        per_pos = _per_position(block_hq, block_hk, block_half)
        num_warps = min(16, max(1, next_power_of_2(per_pos // 2048 + 1)))  # ~32 elements per thread
        _qk_rope_kernel[(triton.cdiv(seq_len, pos_per_prog), batch)](*args, POS_PER_PROG=pos_per_prog, **blocks,
                                                                     num_warps=num_warps)
    else:
        _qk_rope_tuned[lambda meta: (triton.cdiv(seq_len, meta["POS_PER_PROG"]), batch)](*args, **blocks)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_in_layout(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor shaped like `t` with its dimensions in `t`'s memory order. empty_like does that for a dense
    `t` (a transposed input gives a transposed output); for a strided view, such as q or k split from a fused
    q/k/v projection ([B, S, H, D] rows of a wider tensor, transposed), it would fall back to a contiguous
    [B, H, S, D], a layout the attention after RoPE does not expect. D stays innermost whatever the strides: the
    kernel writes with unit last stride, and an expanded (stride-0) dimension, as in the gradient of q_rot.sum(0),
    would otherwise sort below it. Allocated with those strides (empty_strided), not as a permuted view of a
    dense tensor: q_rot and k_rot would then be views made inside the autograd.Function, which autograd refuses to
    let the caller change in place (q_rot.mul_(scale) raised a RuntimeError, where HF's RoPE output allows it)."""
    order = sorted(range(t.ndim - 1), key=lambda d: t.stride(d), reverse=True) + [t.ndim - 1]
    strides, step = [0] * t.ndim, 1
    for d in reversed(order):
        strides[d] = step
        step *= max(t.shape[d], 1)
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)


def _rotate(q, k, cos, sin, position_ids, backward: bool):
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    q_out, k_out = _empty_in_layout(q), _empty_in_layout(k)
    qk_rope_launch(q, k, q_out, k_out, cos, sin, position_ids, backward)
    return q_out, k_out


class QKRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        return _rotate(q, k, cos, sin, position_ids, backward=False)

    @staticmethod
    # The backward reads no input, only the incoming gradients: once those require grad, a second backward would
    # miss its term through them, and raises instead (Triton builds no graph).
    @once_differentiable
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _rotate(dq, dk, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None


def _check(q, k, cos, sin, position_ids) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_same({"q": q, "k": k})
    check_tensor("cos", cos, ndim=(2, 3))
    check_tensor("sin", sin, ndim=(2, 3))
    check_same({"q": q, "cos": cos, "sin": sin}, dtype=False)  # cos/sin are read in fp32 whatever their dtype
    batch, n_q_heads, seq_len, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; both are [B, heads, S, D] "
                         "with the same B, S and D (only the head counts may differ)")
    if head_dim % 2:
        raise ValueError(f"q and k have head_dim {head_dim}; rotate_half needs an even head_dim")
    if (n_q_heads + k.shape[1]) * head_dim > _MAX_HEAD_ELEMENTS:
        raise ValueError(f"q and k have {n_q_heads} + {k.shape[1]} heads of {head_dim}; at most "
                         f"{_MAX_HEAD_ELEMENTS} elements per position are supported")
    if cos.shape != sin.shape:
        raise ValueError(f"cos has shape {tuple(cos.shape)} but sin has {tuple(sin.shape)}; they must match")
    if cos.shape[-1] not in (head_dim, head_dim // 2):
        raise ValueError(f"cos/sin have last dimension {cos.shape[-1]} but q and k have head_dim {head_dim}; pass "
                         f"rows of {head_dim}, or their first halves ({head_dim // 2}) when the halves are equal")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos/sin require grad, but fused_qk_rope gives them no gradient; pass them detached")
    rows = "1" if batch == 1 else f"1 or {batch}"  # the leading size these checks accept, as the messages say it
    if cos.ndim == 3:
        if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
            raise ValueError(f"cos/sin have shape {tuple(cos.shape)}; expected [{rows}, {seq_len}, "
                             f"{head_dim} or {head_dim // 2}] for q of shape {tuple(q.shape)}, read as [B, heads, S, "
                             "D] (HF's layout; a [B, S, heads, D] q or k needs .transpose(1, 2))")
        return
    if position_ids is None:
        return
    check_tensor("position_ids", position_ids, ndim=(1, 2), dtypes=(torch.int64, torch.int32))
    check_same({"q": q, "position_ids": position_ids}, dtype=False)
    if position_ids.ndim == 1 and position_ids.shape[0] != seq_len:  # [S]: one row of positions for every row
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected [{seq_len}] (one position "
                         f"per token of q's {seq_len}) or [B or 1, {seq_len}]")
    if position_ids.ndim == 2 and (position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected [{rows}, {seq_len}]")
    if position_ids.numel():
        lo, hi = torch.aminmax(position_ids)
        if lo.item() < 0 or hi.item() >= cos.shape[0]:
            raise ValueError(f"position_ids range over [{lo.item()}, {hi.item()}] but the cos/sin table has "
                             f"{cos.shape[0]} rows")


# Public entry points are opaque to torch.compile (torch.compiler.disable): a compiled region breaks its graph
# around them and runs them eagerly, autograd Function and Triton launches included (dynamo cannot trace the
# autotuned launches, nor the interpreter's).
@torch.compiler.disable
def fused_qk_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hkv, S, D] by RoPE; returns (q_rot, k_rot) in their dtype.

    cos/sin: HF's per-position [B or 1, S, D] (or that unsqueezed at dim 1, [B or 1, 1, S, D], as HF's
    apply_rotary_pos_emb broadcasts them), or a [max_pos, D] table with `position_ids` [B or 1, S] (or [S], for
    every row; omitted: positions 0..S-1). Either may instead hold only the first half of each row (last dimension
    D/2), for tables whose two halves are equal, as HF's cat((freqs, freqs)) are: the kernel then reads half the
    bytes.
    Per-position cos/sin already hold each token's angle, so `position_ids` passed with them is not used, as in
    HF's apply_rotary_pos_emb and Liger's liger_rotary_pos_emb (they take it and ignore it)."""
    if isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.ndim == sin.ndim == 4 \
            and cos.shape[1] == sin.shape[1] == 1:
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    if isinstance(cos, torch.Tensor) and cos.ndim == 3:
        position_ids = None
    _check(q, k, cos, sin, position_ids)
    if position_ids is not None and position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)  # [S] as [1, S]: the launch reads a batch stride of 0 for one row
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    if cos.ndim == 2 and position_ids is None:
        position_ids = torch.arange(q.shape[2], device=q.device).unsqueeze(0)
        if q.shape[2] > cos.shape[0]:
            raise ValueError(f"q and k have {q.shape[2]} positions but the cos/sin table has {cos.shape[0]} rows")
    return QKRopeFunction.apply(q, k, cos, sin, position_ids)
