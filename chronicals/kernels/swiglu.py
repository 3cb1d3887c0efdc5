"""SwiGLU activation as Triton kernels: c = silu(a) * b, with a = gate and b = up projections.

    forward:  c = a * sigmoid(a) * b
    backward: with s = sigmoid(a) recomputed from a (nothing but the inputs is stored),
              da = dc * b * s * (1 + a * (1 - s)),   db = dc * a * s
              and, on request, c again (for a caller that did not keep it, e.g. the fused MLP
              in swiglu_mlp.py, whose down_proj weight gradient needs it), in the same pass.

Elementwise and memory-bound. Per element of b bytes: forward reads a, b and writes c (3b);
backward reads dc, a, b and writes da, db (5b), plus c (6b). Math in fp32, results rounded once.

Layout: contiguous tensors are walked as one flat row. A 2-D tensor with unit column stride may have
any row stride, so a and b can be the two column halves of one [N, 2I] matmul output (row stride 2I)
and da, db the halves of one [N, 2I] gradient buffer; program p takes row p // col_blocks and column
block p % col_blocks (one scalar division per program, none per element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import backward_once, cast_rne, check_same, check_tensor, needs_int64, next_power_of_2, sigmoid, widen

# 1024 elements over 4 warps: 8 per thread, one 16-byte access per bf16 tensor (Inductor's pointwise launch). Against
# 4096 over 8 warps, same runs (benchmarks/kernel_ops.py launch variants), fwd / bwd in us: H200 2026-12-06 Llama-3-8B
# 323.5 / 544.9 vs 326.6 / 550.1, Qwen2.5-0.5B 111.0 / 186.2 vs 112.1 / 189.2 (compile 322.8 / 543.8, 110.8 / 186.2);
# H100, same day: 457.0 / 765.5 vs 456.7 / 768.0 and 156.3 / 261.9 vs 157.7 / 262.3.
_BLOCK = 1024
_NUM_WARPS = 4
# Row-strided launches with a larger _BLOCK (the benchmark's launch variants) narrow it, down to this, while more than
# 1/8 of each row's last block would be padding: I = 4864 (Qwen2.5-0.5B) runs 5 blocks of 1024 (5%), not 2 of 4096.
_MIN_ROW_BLOCK = 1024
# L2 policy of each pass's loads ("" is the default policy, "evict_first" marks data read once). H200, 2026-12-06,
# Llama-3-8B MLP (16384 x 14336 bf16): forward 364-396 us with evict_first, 324-326 us with the default (compile
# 321-326); backward 598 us with evict_first, 549 with the default (compile 543). benchmarks/kernel_ops.py A/Bs both.
_FWD_EVICTION = ""
_BWD_EVICTION = ""
# bf16/fp16 outputs take the approximate sigmoid (_utils.sigmoid), and bf16 inputs widen by bit moves (_utils.widen).
# sm90 SASS, 8 bf16 elements a thread: forward 166 -> 101 instructions with the sigmoid, 93 with both; backward 230 ->
# 169, 157. False keeps tl.sigmoid / the compiler's cvt (the A/Bs); fp32 outputs always keep tl.sigmoid. Timed on an
# H100 (2026-12-07, kernel_ops.py, 5 rounds, reports/kernels/kernels-h100-swiglu-3527565.json) the loads bound it:
# forward 455.1 us both ways at Llama-3-8B, backward 763.7 against 764.9 precise; Qwen2.5-0.5B bwd 260.7 against 261.2.
_FAST_SIGMOID = True
_BIT_WIDEN = True


@triton.jit
def _row_and_cols(col_blocks, BLOCK: tl.constexpr, FLAT: tl.constexpr, WIDE: tl.constexpr):
    # This program's row and column block. FLAT (contiguous tensors walked as one row): no division; WIDE: int64
    # offsets (see _utils.needs_int64), else int32, whose division is also the shorter one.
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    if FLAT:
        row = 0
        block = pid
    else:
        row = pid // col_blocks
        block = pid - row * col_blocks
    return row, block * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _swiglu_fwd_kernel(A, B, C, n_cols, col_blocks, stride_a, stride_b, stride_c, BLOCK: tl.constexpr,
                       EVICTION: tl.constexpr, FLAT: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr,
                       BITS: tl.constexpr):
    row, cols = _row_and_cols(col_blocks, BLOCK, FLAT, WIDE)
    mask = cols < n_cols
    a = widen(tl.load(A + row * stride_a + cols, mask=mask, other=0.0, eviction_policy=EVICTION), BITS)
    b = widen(tl.load(B + row * stride_b + cols, mask=mask, other=0.0, eviction_policy=EVICTION), BITS)
    c = a * sigmoid(a, FAST, C.dtype.element_ty) * b
    tl.store(C + row * stride_c + cols, cast_rne(c, C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DC, A, B, DA, DB, C, n_cols, col_blocks, stride_dc, stride_a, stride_b, stride_da, stride_db,
                       stride_c, WRITE_C: tl.constexpr, BLOCK: tl.constexpr, EVICTION: tl.constexpr,
                       FLAT: tl.constexpr, WIDE: tl.constexpr, FAST: tl.constexpr,
                       BITS: tl.constexpr):
    row, cols = _row_and_cols(col_blocks, BLOCK, FLAT, WIDE)
    mask = cols < n_cols
    # All loads come before any store, so C may be DC's own buffer (c written over dc).
    dc = widen(tl.load(DC + row * stride_dc + cols, mask=mask, other=0.0, eviction_policy=EVICTION), BITS)
    a = widen(tl.load(A + row * stride_a + cols, mask=mask, other=0.0, eviction_policy=EVICTION), BITS)
    b = widen(tl.load(B + row * stride_b + cols, mask=mask, other=0.0, eviction_policy=EVICTION), BITS)
    s = sigmoid(a, FAST, DA.dtype.element_ty)
    silu = a * s
    # d silu / da = s + a * s * (1 - s) = s * (1 + a * (1 - s))
    da = dc * b * s * (1.0 + a * (1.0 - s))
    db = dc * silu
    tl.store(DA + row * stride_da + cols, cast_rne(da, DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * stride_db + cols, cast_rne(db, DB.dtype.element_ty), mask=mask)
    if WRITE_C:
        # The forward's c, bit for bit: the same fp32 product, rounded once.
        tl.store(C + row * stride_c + cols, cast_rne(silu * b, C.dtype.element_ty), mask=mask)


def layout(**tensors) -> tuple[int, int, list[int], int, int]:
    """(rows, n_cols, row strides, BLOCK, num_warps) for tensors of one shape and dtype: one flat row when all
    are contiguous, else 2-D tensors with unit column stride and any row strides. Raises a ValueError naming
    the tensor otherwise."""
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(f"{name} has shape {tuple(t.shape)} and dtype {t.dtype} but the others have "
                             f"{tuple(first.shape)} and {first.dtype}")
    if all(t.is_contiguous() for t in tensors.values()):
        return 1, first.numel(), [0] * len(tensors), _BLOCK, _NUM_WARPS
    for name, t in tensors.items():
        if t.ndim != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be contiguous, or 2-D with unit column stride "
                             f"(got shape {tuple(t.shape)}, strides {t.stride()})")
    rows, n_cols = first.shape
    block = min(_BLOCK, next_power_of_2(n_cols))
    while block > _MIN_ROW_BLOCK and triton.cdiv(n_cols, block) * block - n_cols > n_cols // 8:
        block //= 2
    return rows, n_cols, [t.stride(0) for t in tensors.values()], block, max(1, min(_NUM_WARPS, block // 256))


def swiglu_forward(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the forward: c = silu(a) * b into `out` (a new contiguous tensor when None). a, b and out share
    one shape and are contiguous, or 2-D with unit column stride (any row strides, e.g. column halves)."""
    c = torch.empty(a.shape, dtype=a.dtype, device=a.device) if out is None else out
    rows, n_cols, strides, block, warps = layout(a=a, b=b, out=c)
    if rows and n_cols:
        col_blocks = triton.cdiv(n_cols, block)
        _swiglu_fwd_kernel[(rows * col_blocks,)](a, b, c, n_cols, col_blocks, *strides, BLOCK=block,
                                                 EVICTION=_FWD_EVICTION, FLAT=rows == 1,
                                                 WIDE=needs_int64(a, b, c), FAST=_FAST_SIGMOID, BITS=_BIT_WIDEN,
                                                 num_warps=warps)
    return c


def swiglu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, da: torch.Tensor | None = None,
                    db: torch.Tensor | None = None, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns (da, db), written into `da`/`db` when given (new contiguous tensors when
    None). With `c` given, the forward's silu(a) * b is recomputed into it in the same pass; `c` may be `dc`
    itself (each element is read before it is overwritten). Layouts as for `swiglu_forward`."""
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device) if da is None else da
    db = torch.empty(b.shape, dtype=b.dtype, device=b.device) if db is None else db
    write_c = c is not None
    c_arg = c if write_c else dc
    rows, n_cols, strides, block, warps = layout(dc=dc, a=a, b=b, da=da, db=db, c=c_arg)
    if rows and n_cols:
        col_blocks = triton.cdiv(n_cols, block)
        _swiglu_bwd_kernel[(rows * col_blocks,)](dc, a, b, da, db, c_arg, n_cols, col_blocks,
                                                 *strides, WRITE_C=write_c, BLOCK=block, EVICTION=_BWD_EVICTION,
                                                 FLAT=rows == 1, WIDE=needs_int64(dc, a, b, da, db, c_arg),
                                                 FAST=_FAST_SIGMOID, BITS=_BIT_WIDEN, num_warps=warps)
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    @backward_once
    def backward(ctx, dc):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dc.contiguous(), gate, up)


# Public entry points are opaque to torch.compile (torch.compiler.disable): a compiled region breaks its graph
# around them and runs them eagerly, autograd Function and Triton launches included.
@torch.compiler.disable
def fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for tensors of any (equal) shape, in their dtype."""
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}; they must match")
    check_same({"gate": gate, "up": up})
    return SwiGLUFunction.apply(gate, up)
