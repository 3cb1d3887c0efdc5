"""RMSNorm and fused residual-add + RMSNorm as Triton kernels.

    y = x * rstd * (offset + w),   rstd = 1 / sqrt(mean(x^2) + eps)

Casting follows Hugging Face Llama: statistics in fp32, output in the input's dtype. The whole row
is computed in fp32 and rounded once (HF rounds x * rstd to the input dtype before multiplying by w;
one rounding is no less accurate). `offset` is 1.0 for Gemma-style weights (scale = 1 + w), else 0.

The fused variant computes s = x + residual (rounded to the input dtype, exactly as PyTorch's add)
and returns (s, rmsnorm(s)), saving a full read of s between the two ops in every decoder layer.
The residual variant returns (x, rmsnorm(x)) for a layer's input norm, so that the residual stream's gradient
reaches the norm's backward and is added there (the fused add's `ds`), not in a pass of its own.

Memory-bound: each kernel moves its bytes once. Per row of H elements of b bytes:
  forward:  read x (and residual) H*b, write y (and s) H*b, write rstd 4 B
  backward: read x, dy (and ds) H*b, write dx H*b; w is read once per program and dw is reduced
            from one fp32 partial row per program (about #SMs * 4 rows), not with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRET,
    backward_once,
    cast_rne,
    check_same,
    check_tensor,
    finite_number,
    needs_int64,
    next_power_of_2,
)

# A program holds a tile of BLOCK_M rows x BLOCK_N columns, about this many elements (rows of 4096 or more: one row
# per program). H100, 2026-12-06 (benchmarks/kernel_ops.py, 16384 rows of 896 bf16): 2048 (2 rows, 4 warps) against
# 4096 (4 rows, 8 warps): fwd 21.7 / 22.3 us, bwd 39.5 / 39.8, add+RMSNorm bwd 46.2 / 48.7; equal at 4096 hidden.
# One row per program as a 1-D block (Liger's kernel shape) was no faster at 4096 hidden: 92.5 us against this tile's
# 91.4 (Liger 88.0, same run), so the shape of the block is not the forward's gap to Liger.
_TILE_ELEMENTS = 2048
_MIN_BLOCK_N = 16  # tiny rows still get a power-of-two tile the compiler is happy with
_MAX_BLOCK_N = 32768
_PROGRAMS_PER_SM = 2  # backward: programs per SM that fit at once (~120 registers x 8 warps each): one wave
_PREFETCH_BYTES = 96 * 1024  # backward: shared memory per program for prefetched tiles (H100/H200: 228 KiB/SM)
# Backward: deepest software pipeline tried (tiles in flight per program), within the budget above. H100, 2026-12-07,
# 16384 rows bf16, scratch A/B (each launch twice, CUDA-graph replays): 3 -> 4 stages at 896 columns 37.4 / 37.7 ->
# 34.8 / 35.0 us (a torch.add of the same bytes, 2 in 1 out: 35.0); with ds (3 streams) 43.9 / 44.2 -> 44.2 / 44.5;
# at 4096 columns 149.2 / 149.0 -> 149.5 / 149.3, with ds 184.0 / 183.7 -> 184.8 / 185.7 (the same within the run's
# spread). The dw reduction as a programmatic dependent launch (launched before the main kernel ends) was no faster:
# 35.0 against 34.8 us at 896 columns, 4 stages.
_MAX_BWD_STAGES = 4
# L2 policy of the forward's loads ("" is the default policy, "evict_first" marks data read once): None picks it by
# the rule in _fwd_eviction, a value fixes it (benchmarks/kernel_ops.py A/Bs both). Neither wins everywhere, on H100
# and H200 alike, 2026-12-06, 16384 rows bf16: at 896 columns evict_first (H200 15.2 us against 16.3; H100 20.1
# against 21.5 and 20.3 against 22.2; compile 15.8 / 21.0), at 4096 the default (H200 67.7 against 70.4; H100 91.2
# against 93.2), and with the residual add the default at both widths (H200 30.8 against 31.4 at 896; H100 41.4
# against 42.7). Timing both on the first call (triton.autotune) was tried and dropped: its ~20 us timings cannot
# tell 1.3 us apart, and it kept the slower policy at 896 (21.6 us, H100). The backward keeps evict_first (99.0 us at
# 4096 on the H200, against Liger's 183.1).
_FWD_EVICTION: str | None = None
# dw reduction tile: 32 fp32 columns = one 128-byte line per row; 256 partial rows per step, so the ~264 partials (2
# programs x 132 SMs) take 2 dependent load rounds, not 5 (its grid is only n_cols / 32 programs, 28 at 896 columns).
# H100, 2026-12-06, 16384 rows bf16, same run: 64 -> 256 rows: RMSNorm bwd 147.5 -> 142.6 us at 4096 columns, 41.8 ->
# 40.1 at 896; add + RMSNorm bwd 186.9 -> 184.7 and 46.1 -> 44.2. More programs per SM (4) or a deeper pipeline (5 or
# 8 stages) in the main loop were slower or within the run's spread.
_REDUCE_BLOCK_P, _REDUCE_BLOCK_N = 256, 32


def _settings(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of `n_cols` elements."""
    block_n = max(next_power_of_2(n_cols), _MIN_BLOCK_N)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, next_power_of_2(n_rows)))
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16 if tile <= 16384 else 32
    return block_m, block_n, num_warps


def _fwd_eviction(n_cols: int, has_residual: bool) -> str:
    """The forward's L2 policy (see _FWD_EVICTION): evict_first for narrow rows (several per program) without the
    residual add, the default policy otherwise."""
    return "evict_first" if n_cols <= 1024 and not has_residual else ""


def _bwd_stages(block_m: int, block_n: int, n_streams: int, elem_bytes: int) -> int:
    """Software-pipeline depth of the backward loop (0: the interpreter's while loop). Each extra
    stage holds one tile of every streamed input in shared memory; keep that within the budget."""
    if INTERPRET:
        return 0
    per_stage = block_m * block_n * n_streams * elem_bytes
    return max((s for s in range(1, _MAX_BWD_STAGES + 1) if (s - 1) * per_stage <= _PREFETCH_BYTES), default=1)


def _num_programs(device: torch.device, n_tiles: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_tiles, sms * _PROGRAMS_PER_SM))


@triton.jit
def _load_tile(PTR, rows, stride, cols, mask, EVICTION: tl.constexpr):
    # Each element is read once per pass; EVICTION is its L2 policy (see _FWD_EVICTION).
    ptrs = PTR + rows[:, None] * stride + cols[None, :]
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)


@triton.jit
def _tile_rows(tile, BLOCK_M: tl.constexpr, WIDE: tl.constexpr):
    # The tile's row indices: int64 when WIDE (rows * stride may pass 2^31; see _utils.needs_int64), else int32.
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_rows, n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVICTION: tl.constexpr,
    WIDE: tl.constexpr,
):
    # One tile of BLOCK_M rows: x <- x + r (rounded, stored as s) when fused;
    # rstd = 1/sqrt(sum(x^2)/H + eps); y = x * rstd * (offset + w), all in fp32, stored once.
    rows = _tile_rows(tl.program_id(0), BLOCK_M, WIDE)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = _load_tile(X, rows, stride_x, cols, mask, EVICTION)
    # w is loaded before the row reduction, not after it: the reduction's barrier would keep its load from being
    # issued early, and each program would then wait out an L2 round trip between its reduction and its store.
    # Aimed at the H200's 6% gap to Liger at 4096 columns (67.7 against 64.1 us), which the H100 never showed; on
    # the H100 no change (88.3 against Liger's 87.9 us; 88.6 against 88.1 before). Not yet timed on an H200.
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    if HAS_RESIDUAL:
        r = _load_tile(R, rows, stride_r, cols, mask, EVICTION)
        s = cast_rne(x + r, S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)  # normalise the stored (rounded) sum, as the unfused ops would
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_rne(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_tile(DY, DS, X, RSTD, DX, stride_dy, stride_ds, stride_x, stride_dx, n_rows, n_cols, eps,
                       tile, cols, col_ok, w, dw_acc,
                       HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, ONE_COL: tl.constexpr,
                       WIDE: tl.constexpr):
    # With xh = x * rstd and g = dy * (offset + w):
    #   dx = rstd * (g - xh * sum(g * xh) / H)   (+ ds, the gradient reaching the stored sum s)
    #   dw += dy * xh   (this program's partial sum over its rows)
    # At H = 1, mean(x^2) = x^2, so g - xh * (g * xh) = g * (1 - xh^2) = g * eps * rstd^2 exactly: the general form
    # subtracts two nearly equal terms there and kept few correct digits (fp32 relative errors of 1e-4 to 5e-3, as
    # PyTorch's own); this one is exact to a few ulp. Any other H compiles the general form alone.
    rows = _tile_rows(tile, BLOCK_M, WIDE)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & col_ok[None, :]
    x = _load_tile(X, rows, stride_x, cols, mask, "evict_first")
    dy = _load_tile(DY, rows, stride_dy, cols, mask, "evict_first")
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    xh = x * rstd[:, None]
    g = dy * w[None, :]
    if ONE_COL:
        dx = g * (eps * rstd * rstd * rstd)[:, None]
    else:
        c = tl.sum(g * xh, axis=1) / n_cols
        dx = (g - xh * c[:, None]) * rstd[:, None]
    if HAS_DS:
        dx += _load_tile(DS, rows, stride_ds, cols, mask, "evict_first")
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_rne(dx, DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        dw_acc += dy * xh
    return dw_acc


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DS, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_ds, stride_x, stride_dx,
    n_rows, n_cols, n_tiles, offset, eps,
    HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr, ONE_COL: tl.constexpr, WIDE: tl.constexpr,
):
    # Each program loops over row tiles pid, pid + P, ... keeping its own fp32 dw partial row; the
    # P partial rows are summed afterwards by _dw_reduce_kernel (deterministic, no atomics).
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NUM_STAGES == 0:
        # Interpreter: a while loop, since it cannot run range() over its 1-element scalars (numpy 2.4).
        tile = pid
        while tile < n_tiles:
            dw_acc = _rms_norm_bwd_tile(DY, DS, X, RSTD, DX, stride_dy, stride_ds, stride_x, stride_dx, n_rows,
                                        n_cols, eps, tile, cols, col_ok, w, dw_acc, HAS_DS, COMPUTE_DW, BLOCK_M,
                                        ONE_COL, WIDE)
            tile += n_progs
    else:
        # GPU: a pipelined loop. The next tiles' loads stream into shared memory (cp.async) while this
        # one is reduced, so more bytes are in flight than the registers of ~2 programs per SM hold.
        for tile in tl.range(pid, n_tiles, n_progs, num_stages=NUM_STAGES):
            dw_acc = _rms_norm_bwd_tile(DY, DS, X, RSTD, DX, stride_dy, stride_ds, stride_x, stride_dx, n_rows,
                                        n_cols, eps, tile, cols, col_ok, w, dw_acc, HAS_DS, COMPUTE_DW, BLOCK_M,
                                        ONE_COL, WIDE)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


@triton.jit
def _dw_reduce_kernel(PARTIAL, DW, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # dw[c] = sum over programs p of partial[p, c], summed in fp32 and rounded once to w's dtype
    # (one launch instead of a torch sum plus a cast).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    p = 0
    while p < n_partials:
        rows = p + tl.arange(0, BLOCK_P)
        mask = (rows < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(PARTIAL + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        p += BLOCK_P
    tl.store(DW + cols, cast_rne(tl.sum(acc, axis=0), DW.dtype.element_ty), mask=col_ok)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """`t` as [rows, n_cols] with unit column stride, a view when possible (no copy)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(1) == 1 or n_cols == 1 else t2.contiguous()


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                     residual2: torch.Tensor | None = None, shape: torch.Size | None = None):
    """Launch the forward on [rows, H] inputs. Returns (y, rstd, s); s is None without a residual. y and s are
    allocated in `shape` (the caller's leading dimensions; [rows, H] when None) and written through [rows, H] views:
    an autograd.Function that returned y.view(shape) would hand out a view made inside it, which autograd refuses
    to let the caller change in place (y += 1, y.mul_(2) raised a RuntimeError, where PyTorch's RMSNorm allows it)."""
    n_rows, n_cols = x2.shape
    shape = (n_rows, n_cols) if shape is None else shape
    y_out = torch.empty(shape, dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    s_out = torch.empty_like(y_out) if residual2 is not None else None
    if n_rows == 0:
        return y_out, rstd, s_out
    y = y_out.view(n_rows, n_cols)
    s = s_out.view(n_rows, n_cols) if s_out is not None else None
    block_m, block_n, num_warps = _settings(n_rows, n_cols)
    r_arg = residual2 if residual2 is not None else x2
    s_arg = s if s is not None else y
    eviction = _fwd_eviction(n_cols, residual2 is not None) if _FWD_EVICTION is None else _FWD_EVICTION
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x2, r_arg, s_arg, y, weight, rstd,
        x2.stride(0), r_arg.stride(0), s_arg.stride(0), y.stride(0),
        n_rows, n_cols, eps, offset,
        HAS_RESIDUAL=residual2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, EVICTION=eviction,
        WIDE=needs_int64(x2, r_arg, s_arg, y), num_warps=num_warps,
    )
    return y_out, rstd, s_out


def rms_norm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float, ds2: torch.Tensor | None, compute_dw: bool, eps: float):
    """Launch the backward on [rows, H] tensors. Returns (dx, dw); dw is None unless asked for."""
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    block_m, block_n, num_warps = _settings(n_rows, n_cols)
    n_tiles = triton.cdiv(n_rows, block_m)
    n_progs = _num_programs(x2.device, n_tiles)
    dw_partial = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else rstd
    ds_arg = ds2 if ds2 is not None else dy2
    _rms_norm_bwd_kernel[(n_progs,)](
        dy2, ds_arg, x2, weight, rstd, dx, dw_partial,
        dy2.stride(0), ds_arg.stride(0), x2.stride(0), dx.stride(0),
        n_rows, n_cols, n_tiles, offset, eps,
        HAS_DS=ds2 is not None, COMPUTE_DW=compute_dw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        NUM_STAGES=_bwd_stages(block_m, block_n, 3 if ds2 is not None else 2, x2.element_size()), ONE_COL=n_cols == 1,
        WIDE=needs_int64(dy2, ds_arg, x2, dx),
    )
    if not compute_dw:
        return dx, None
    dw = torch.empty_like(weight)
    _dw_reduce_kernel[(triton.cdiv(n_cols, _REDUCE_BLOCK_N),)](
        dw_partial, dw, n_progs, n_cols, BLOCK_P=_REDUCE_BLOCK_P, BLOCK_N=_REDUCE_BLOCK_N, num_warps=4,
    )
    return dx, dw


def _norm_forward(ctx, x, weight, eps, offset) -> torch.Tensor:
    """rmsnorm(x), saving what _norm_backward reads (RMSNormFunction's and RMSNormResidualFunction's forward)."""
    x2 = _rows(x, weight.shape[0])
    y, rstd, _ = rms_norm_forward(x2, weight, eps, offset, shape=x.shape)
    # x itself is saved when x2 is a view of it: a view made here (grad mode is off in forward) would turn an
    # in-place change of x before backward into autograd's misleading "view was created in no_grad mode" error
    # rather than its usual "modified by an inplace operation". A copy (non-contiguous x) is saved as it is.
    ctx.save_for_backward(x if x2.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else x2,
                          weight, rstd)
    ctx.offset, ctx.eps = offset, eps
    return y


def _norm_backward(ctx, dy, ds=None):
    """(dx, dw) for the upstream dy, plus `ds` (a gradient that reaches x itself) added to dx in the same kernel."""
    x, weight, rstd = ctx.saved_tensors
    n_cols = weight.shape[0]
    dx, dw = rms_norm_backward(_rows(dy, n_cols), _rows(x, n_cols), weight, rstd, ctx.offset,
                               None if ds is None else _rows(ds, n_cols), ctx.needs_input_grad[1], ctx.eps)
    return dx.view(dy.shape), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        return _norm_forward(ctx, x, weight, eps, offset)

    @staticmethod
    @backward_once
    def backward(ctx, dy):
        return *_norm_backward(ctx, dy), None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset):
        n_cols = weight.shape[0]
        y, rstd, s = rms_norm_forward(_rows(x, n_cols), weight, eps, offset, _rows(residual, n_cols), shape=x.shape)
        ctx.save_for_backward(s, weight, rstd)  # an output: changing it in place before backward is autograd's error
        ctx.offset, ctx.eps = offset, eps
        ctx.set_materialize_grads(False)  # an unused output gets no zero-filled gradient to read
        return s, y

    @staticmethod
    @backward_once
    def backward(ctx, ds, dy):
        if dy is None:  # only the sum was used: the norm contributes nothing (nor is s read, changed or not)
            return ds, ds, None, None, None
        s, weight, rstd = ctx.saved_tensors
        n_cols = weight.shape[0]
        s2 = s.view(-1, n_cols)
        ds2 = _rows(ds, n_cols) if ds is not None else None
        dx, dw = rms_norm_backward(_rows(dy, n_cols), s2, weight, rstd, ctx.offset, ds2, ctx.needs_input_grad[2],
                                   ctx.eps)
        dx = dx.view(dy.shape)
        # x and residual enter only through s = x + residual, so both receive d(s).
        return dx, dx, dw, None, None


class RMSNormResidualFunction(torch.autograd.Function):
    """(x, rmsnorm(x)) for a pre-norm layer's input, whose residual stream takes the x handed back. The gradient
    that reaches it (the layer's residual-stream gradient) comes to this op's backward, which adds it inside the
    norm's backward kernel (the `ds` input the fused add-norm has): autograd would otherwise sum x's two gradients
    in a separate pass (read two [N, H] tensors, write one; ~64 us a layer at Llama-3.2-1B, batch 8 x 2048, H100)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        y = _norm_forward(ctx, x, weight, eps, offset)
        ctx.set_materialize_grads(False)
        return x, y  # x returned as it is: autograd hands out a view of it, whose gradient comes here

    @staticmethod
    @backward_once
    def backward(ctx, d_residual, dy):
        if dy is None:  # the norm unused: x's gradient is the residual stream's alone
            return d_residual, None, None, None
        return *_norm_backward(ctx, dy, d_residual), None, None


def _check(hidden_states, weight, eps, offset, residual=None) -> None:
    check_tensor("hidden_states", hidden_states)
    check_tensor("weight", weight, ndim=1)
    tensors = {"hidden_states": hidden_states, "weight": weight}
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != hidden_states.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but hidden_states has "
                             f"{tuple(hidden_states.shape)}; they must match")
        check_same({"hidden_states": hidden_states, "residual": residual})
        tensors["residual"] = residual
    # weight may be in another dtype (fp32 master weights): it is read in fp32 either way.
    check_same(tensors, dtype=False)
    if hidden_states.ndim == 0:
        raise ValueError("hidden_states must have at least one dimension (..., hidden), got a 0-d tensor")
    if hidden_states.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight has {weight.shape[0]} elements but the last dimension of hidden_states "
                         f"(shape {tuple(hidden_states.shape)}) must equal it")
    if not 1 <= weight.shape[0] <= _MAX_BLOCK_N:
        raise ValueError(f"weight has {weight.shape[0]} elements; supported hidden sizes are 1..{_MAX_BLOCK_N}")
    if not (finite_number(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not finite_number(offset):
        raise ValueError(f"offset must be a finite number (0.0, or 1.0 for Gemma-style weights), got {offset!r}")


# Public entry points are opaque to torch.compile (torch.compiler.disable): a compiled region breaks its graph
# around them and runs them eagerly, autograd Function and Triton launches included (dynamo cannot trace the
# autotuned launches, nor the interpreter's).
@torch.compiler.disable
def fused_rmsnorm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                  offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of `hidden_states` (any leading shape); output in its dtype."""
    _check(hidden_states, weight, eps, offset)
    # The kernels read weight with unit stride; a strided view (a slice of a wider buffer) would read the wrong
    # elements. contiguous() is a no-op for a Parameter and stays on the graph for a view (dw reaches its base).
    return RMSNormFunction.apply(hidden_states, weight.contiguous(), float(eps), float(offset))


@torch.compiler.disable
def fused_add_rmsnorm(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (s, rmsnorm(s)) with s = hidden_states + residual, in one pass over memory."""
    _check(hidden_states, weight, eps, offset, residual)
    return AddRMSNormFunction.apply(hidden_states, residual, weight.contiguous(), float(eps), float(offset))  # as above


@torch.compiler.disable
def fused_rmsnorm_residual(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                           offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (hidden_states, rmsnorm(hidden_states)) for a pre-norm layer: use the first as the residual stream
    (in place of hidden_states itself), so that its gradient is added to the norm's inside the backward kernel."""
    _check(hidden_states, weight, eps, offset)
    return RMSNormResidualFunction.apply(hidden_states, weight.contiguous(), float(eps), float(offset))  # as above


class FusedRMSNorm(torch.nn.Module):
    """Drop-in RMSNorm module; the weight starts at 1 - offset so the initial scale is 1."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.eps = eps
        self.offset = offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return fused_rmsnorm(hidden_states, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
