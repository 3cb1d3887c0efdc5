"""Fused linear cross-entropy: CE(hidden @ weightᵀ + bias, labels) without the [N, V] logits.

Only one block of logits exists at a time; it comes from one cuBLAS matmul (fp32 accumulation
inside) and is consumed by two Triton row kernels, in fp32:
  statistics:  z ← cap·tanh(z / cap) when softcapped; a row-wise online log-sum-exp keeps (m, s)
               with lse = m + log s, and the target logit is picked out of the block holding the label.
  gradient:    the block is overwritten in place by
               dz_ij = g_i · (p_ij · (1 + 2 w_z lse_i) - (1 - ε) [j == y_i] - ε / V) · (1 - tanh²)  [tanh: softcap only]
               with p_ij = exp(z_ij - lse_i) and g_i the row's gradient (0 for ignored rows).
Per-row loss:  ℓ_i = lse_i - (1 - ε) z_{i,y_i} - ε / V · Σ_j z_ij + w_z · lse_i²   (0 where y_i == ignore_index)
               with ε the label smoothing (torch.nn.functional.cross_entropy's: the target distribution is
               (1 - ε) one-hot + ε uniform over the V columns), whose Σ_j z_ij the statistics kernel sums with its
               target logit; ε = 0 compiles without it.

Three ways to cut the logits (`strategy`):
  "vocab" [N, chunk] column blocks. Forward folds each block into the running (m, s); backward
          recomputes each block, then dW_c = dzᵀ @ hidden (rows of dW written once) and
          dH += dz @ W_c (fp32 accumulator). Extra memory: N·chunk (input dtype) + 4·N·d bytes + O(N).
          Work: 8·N·d·V FLOPs (2 forward, 2 recompute, 4 gradients).
  "rows"  [chunk, V] row blocks, whole rows, so each block's lse is final at once and the gradients
          are formed in the forward pass (a scalar loss's gradient is known up to the incoming scalar,
          applied in backward): dH rows written once, dW += dzᵀ @ h in fp32.
          Extra memory: chunk·V (input dtype) + 4·V·d bytes + O(N). Work: 6·N·d·V FLOPs.
  "tiles" [rows, cols] tiles, the gradients also formed in forward: per row block, one pass over the
          vocabulary for its lse, a second that recomputes each tile for dH (fp32 accumulator of the
          block's rows, written once) and dW += dzᵀ @ h straight into dW in the weight's dtype (the sum
          is fp32 inside cuBLAS, rounded once per row block: N / rows roundings, as Liger's chunks).
          Extra memory: rows·cols (input dtype) + 4·rows·d bytes + O(N), independent of N and V
          (~40 MiB at the default 2048 x 8192 tile: 32 MiB of tile, small enough to stay in L2 between
          its matmul and its row kernels). Work: 8·N·d·V FLOPs.
`labels` are aligned with `hidden` rows: the caller shifts them (position t predicts token t + 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRET,
    autocast_inputs,
    backward_once,
    check_same,
    check_tensor,
    finite_number,
    next_power_of_2,
    row_block_settings,
)

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "vocab", "rows", "tiles")
# What "auto" picks for scalar losses when a backward will follow: "rows" does 6·N·d·V FLOPs against
# "vocab"'s 8; the H200 benchmark (benchmarks/linear_cross_entropy.py) times both and decides.
DEFAULT_STRATEGY = "rows"
# 4096 rows: 2-4 row blocks at 8-16k tokens, so the fp32 dW update (V·d per block) stays a few % of
# the time, at chunk·V·2 bytes of logits (1.2 GB at V = 152k).
DEFAULT_ROW_CHUNK = 4096
# "tiles": rows x vocabulary columns per tile (a 32 MiB bf16 tile).
DEFAULT_TILE = (2048, 8192)
# Widest column block a program holds at once; a logits block wider than this is walked in steps.
MAX_BLOCK_V = 4096


def default_vocab_chunk(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Vocabulary block width: wide enough that the per-block fp32 dH update (N·d) costs little
    next to the block's logits traffic (N·chunk), i.e. chunk ≥ 4·d, a power of two (whole program
    steps of MAX_BLOCK_V columns), within [1024, 16384]."""
    return min(max(1024, min(16384, next_power_of_2(4 * hidden_size))), vocab_size)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits ±1 when exp overflows to inf or underflows to 0.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _round_to_bf16(x):
    # Round-to-nearest-even of fp32 to bf16 precision on the bits: add 0x7FFF plus the lowest kept bit,
    # then clear the 16 dropped bits. The interpreter's own fp32 -> bf16 cast truncates (the GPU's rounds
    # to nearest), which biases every gradient towards zero by ~2^-9.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_logits(row_ptr, bias_ptr, v_start, cols, mask, HAS_BIAS: tl.constexpr):
    # One tile of a logits row in fp32, the bias of its vocabulary columns added (masked columns read 0).
    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + v_start + cols, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _block_lse_kernel(logits_ptr, stride_row, bias_ptr, labels_ptr, max_ptr, sumexp_ptr, target_ptr,
                      v_start, n_cols, softcap, on_label, per_column,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
                      HAS_SMOOTHING: tl.constexpr):
    # One program per row: fold this block's columns into the row's running (m, s) so that
    # Σ_j exp(z_j) = s · exp(m) over every column seen so far; pick out the target logit (with label smoothing, add
    # on_label = 1 - ε times it and per_column = ε / V times the block's Σ_j z_j instead).
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(max_ptr + row)
    s = tl.load(sumexp_ptr + row)
    target = tl.load(target_ptr + row)
    local_label = tl.load(labels_ptr + row) - v_start
    row_ptr = logits_ptr + row * stride_row
    start = 0
    while start < n_cols:  # not range(): the interpreter cannot index with its 1-element scalars
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = _load_logits(row_ptr, bias_ptr, v_start, cols, mask, HAS_BIAS)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Rescale against m_new, or against 0 while every column so far is -inf (a -inf bias masking the vocabulary's
        # start): exp(-inf - (-inf)) would be NaN, where the sum of those columns is simply 0. m starts at -inf and s
        # at 0, so the first rescale is 0 · exp(-inf) = 0.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
        m = m_new
        # `mask` too: a label just past this block can sit in the tile's padding (masked to -inf).
        picked = tl.sum(tl.where((cols == local_label) & mask, z, 0.0), axis=0)
        if HAS_SMOOTHING:
            picked = on_label * picked + per_column * tl.sum(tl.where(mask, z, 0.0), axis=0)
        target += picked
        start += BLOCK_V
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(target_ptr + row, target)


@triton.jit
def _block_grad_kernel(logits_ptr, stride_row, bias_ptr, labels_ptr, lse_ptr, row_grad_ptr,
                       v_start, n_cols, softcap, z_loss_weight, on_label, per_column,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
                       ROUND_BF16: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    # One program per row, in place: logits block -> dz = g·(p·(1 + 2·w_z·lse) - onehot)·dcap, the one-hot target
    # (1 - ε)·onehot + ε / V with label smoothing.
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(row_grad_ptr + row)
    local_label = tl.load(labels_ptr + row) - v_start
    p_coef = 1.0 + 2.0 * z_loss_weight * lse  # d(lse + w·lse²)/dlse
    row_ptr = logits_ptr + row * stride_row
    start = 0
    while start < n_cols:  # not range(): the interpreter cannot index with its 1-element scalars
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = _load_logits(row_ptr, bias_ptr, v_start, cols, mask, HAS_BIAS)
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        p = tl.exp(z - lse)
        if HAS_SMOOTHING:
            dz = g * (p * p_coef - tl.where(cols == local_label, on_label, 0.0) - per_column)
        else:
            dz = g * (p * p_coef - tl.where(cols == local_label, 1.0, 0.0))
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)  # d(cap·tanh(x/cap))/dx
        if ROUND_BF16:
            dz = _round_to_bf16(dz)
        tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=mask)
        start += BLOCK_V


def _block_view(buffer: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A contiguous [n_rows, n_cols] view at the start of `buffer` (the last block may be smaller)."""
    return buffer.view(-1)[: n_rows * n_cols].view(n_rows, n_cols)


@functools.cache
def _fp32_out_matmul_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether cuBLAS can add a bf16/fp16 product straight into an fp32 tensor here (torch >= 2.8)."""
    a = torch.ones(2, 2, device=device, dtype=dtype)
    acc = torch.ones(2, 2, device=device, dtype=torch.float32)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 3.0).all())


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, the product summed in fp32 inside the matmul."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _fp32_out_matmul_works(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # the product rounds once to a's dtype before the fp32 sum
        acc.add_(a @ b)


@dataclass(frozen=True)
class _Plan:
    strategy: str  # "vocab": vocabulary blocks, backward recomputes; "rows"/"tiles": gradients in forward
    chunk: int  # vocabulary columns ("vocab") or rows ("rows", "tiles") per block
    chunk_v: int  # vocabulary columns per tile ("tiles"; V otherwise)
    block_v: int  # columns a Triton program holds at once
    num_warps: int
    softcap: float | None
    z_loss_weight: float
    label_smoothing: float  # ε
    per_column: float  # ε / V


def _lse_launch(block, bias, v_start, labels, m, s, target, plan):
    if block.shape[0] == 0:
        return
    _block_lse_kernel[(block.shape[0],)](
        block, block.stride(0), bias if bias is not None else block, labels, m, s, target,
        v_start, block.shape[1], float(plan.softcap or 1.0), 1.0 - plan.label_smoothing, plan.per_column,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None, BLOCK_V=plan.block_v,
        HAS_SMOOTHING=plan.label_smoothing > 0, num_warps=plan.num_warps,
    )


def _grad_launch(block, bias, v_start, labels, lse, row_grad, plan):
    if block.shape[0] == 0:
        return
    _block_grad_kernel[(block.shape[0],)](
        block, block.stride(0), bias if bias is not None else block, labels, lse, row_grad,
        v_start, block.shape[1], float(plan.softcap or 1.0), plan.z_loss_weight, 1.0 - plan.label_smoothing,
        plan.per_column, HAS_BIAS=bias is not None, HAS_SOFTCAP=plan.softcap is not None, BLOCK_V=plan.block_v,
        ROUND_BF16=INTERPRET and block.dtype == torch.bfloat16, HAS_SMOOTHING=plan.label_smoothing > 0,
        num_warps=plan.num_warps,
    )


def _fold_statistics(h, weight, bias, labels, m, s, target, buffer, width, plan):
    """Fold the logits h @ weightᵀ, `width` vocabulary columns at a time (in `buffer`), into the rows' running
    (m, s), and pick out their target logits."""
    vocab = weight.shape[0]
    for v_start in range(0, vocab, width):
        v_end = min(v_start + width, vocab)
        block = torch.mm(h, weight[v_start:v_end].t(), out=_block_view(buffer, h.shape[0], v_end - v_start))
        _lse_launch(block, bias, v_start, labels, m, s, target, plan)


def _vocab_blocked_statistics(hidden, weight, bias, labels, plan):
    """Per-row log-sum-exp and target logit (fp32), one [N, chunk] logits block at a time."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    m = torch.full((n_rows,), float("-inf"), device=hidden.device, dtype=torch.float32)
    s = torch.zeros_like(m)
    target = torch.zeros_like(m)
    buffer = torch.empty(n_rows * min(plan.chunk, vocab), device=hidden.device, dtype=hidden.dtype)
    _fold_statistics(hidden, weight, bias, labels, m, s, target, buffer, plan.chunk, plan)
    return m + torch.log(s), target


def _vocab_blocked_gradients(hidden, weight, bias, labels, lse, row_grad, plan, need_hidden, need_weight,
                             need_bias):
    """Backward by vocabulary blocks: dW rows are written once; dH sums over blocks in fp32."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab, device=hidden.device, dtype=torch.float32) if need_bias else None
    buffer = torch.empty(n_rows * min(plan.chunk, vocab), device=hidden.device, dtype=hidden.dtype)
    for v_start in range(0, vocab, plan.chunk):
        v_end = min(v_start + plan.chunk, vocab)
        block = torch.mm(hidden, weight[v_start:v_end].t(), out=_block_view(buffer, n_rows, v_end - v_start))
        _grad_launch(block, bias, v_start, labels, lse, row_grad, plan)
        if need_weight:
            torch.mm(block.t(), hidden, out=grad_weight[v_start:v_end])
        if need_hidden:
            _accumulate_product(grad_hidden, block, weight[v_start:v_end])
        if need_bias:
            grad_bias[v_start:v_end] = block.sum(0, dtype=torch.float32)
    return (
        grad_hidden.to(hidden.dtype) if need_hidden else None,
        grad_weight,
        grad_bias.to(bias.dtype) if need_bias else None,
    )


def _row_blocked_forward_backward(hidden, weight, bias, labels, row_grad, plan, need_hidden, need_weight,
                                  need_bias):
    """Loss statistics and gradients in one pass over [chunk, V] logits blocks (6·N·d·V FLOPs).

    Each block holds whole rows, so its log-sum-exp is final before its gradient is formed: dH rows
    are written once; dW and db sum over row blocks in fp32.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    m = torch.full((n_rows,), float("-inf"), device=hidden.device, dtype=torch.float32)
    s = torch.zeros_like(m)
    target = torch.zeros_like(m)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # One block writes dW once, in the weight's dtype; several sum into an fp32 accumulator.
    one_block = 0 < n_rows <= plan.chunk
    if need_weight:
        grad_weight = torch.empty_like(weight) if one_block else torch.zeros_like(weight, dtype=torch.float32)
    grad_bias = torch.zeros(vocab, device=hidden.device, dtype=torch.float32) if need_bias else None
    buffer = torch.empty(min(plan.chunk, n_rows) * vocab, device=hidden.device, dtype=hidden.dtype)
    for r0 in range(0, n_rows, plan.chunk):
        rows = slice(r0, min(r0 + plan.chunk, n_rows))
        h = hidden[rows]
        block = torch.mm(h, weight.t(), out=_block_view(buffer, h.shape[0], vocab))
        _lse_launch(block, bias, 0, labels[rows], m[rows], s[rows], target[rows], plan)
        lse = m[rows] + torch.log(s[rows])
        _grad_launch(block, bias, 0, labels[rows], lse, row_grad[rows], plan)
        if need_hidden:
            torch.mm(block, weight, out=grad_hidden[rows])
        if need_weight and one_block:
            torch.mm(block.t(), h, out=grad_weight)
        elif need_weight:
            _accumulate_product(grad_weight, block.t(), h)
        if need_bias:
            grad_bias += block.sum(0, dtype=torch.float32)
    # Free the logits block before dW is cast to the weight's dtype, so that the block, the fp32 dW and its cast never
    # coexist: at Qwen3-0.6B's shape (4096 x 151936 block, 151936 x 1024 dW) the call's peak falls from 2.2 to 1.9 GB.
    buffer = block = None
    lse = m + torch.log(s)
    grads = (
        grad_hidden,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(bias.dtype) if need_bias else None,
    )
    return lse, target, grads


def _tiled_forward_backward(hidden, weight, bias, labels, row_grad, plan, need_hidden, need_weight, need_bias):
    """Loss statistics and gradients over [chunk, chunk_v] tiles, two passes over the vocabulary per row block.

    Pass 1 folds each tile into the block's running (m, s); pass 2 recomputes each tile, turns it into dz
    in place, and adds dz @ W_c to the block's fp32 dH accumulator and dzᵀ @ h to dW's rows in place.
    A tile as wide as the vocabulary is still in the buffer after pass 1, so pass 2 uses it as it is:
    6·N·d·V FLOPs, the rows strategy's, with dW summed in the weight's dtype instead of an fp32 V·d buffer.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    m = torch.full((n_rows,), float("-inf"), device=hidden.device, dtype=torch.float32)
    s = torch.zeros_like(m)
    target = torch.zeros_like(m)
    rows_per_block, cols = min(plan.chunk, max(n_rows, 1)), min(plan.chunk_v, vocab)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # Written by the first row block (torch.mm out=), added to by the rest: no zero-fill pass over V·d.
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.zeros(vocab, device=hidden.device, dtype=torch.float32) if need_bias else None
    buffer = torch.empty(rows_per_block * cols, device=hidden.device, dtype=hidden.dtype)
    accumulator = torch.empty(rows_per_block, hidden.shape[1], device=hidden.device, dtype=torch.float32) \
        if need_hidden else None
    if need_weight and n_rows == 0:
        grad_weight.zero_()
    for r0 in range(0, n_rows, rows_per_block):
        rows = slice(r0, min(r0 + rows_per_block, n_rows))
        h, y = hidden[rows], labels[rows]
        n = h.shape[0]
        _fold_statistics(h, weight, bias, y, m[rows], s[rows], target[rows], buffer, cols, plan)
        lse = m[rows] + torch.log(s[rows])
        if need_hidden:
            dh = accumulator[:n].zero_()
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            tile = _block_view(buffer, n, v1 - v0)
            if cols < vocab:
                torch.mm(h, weight[v0:v1].t(), out=tile)
            _grad_launch(tile, bias, v0, y, lse, row_grad[rows], plan)
            if need_hidden:
                _accumulate_product(dh, tile, weight[v0:v1])
            if need_weight and r0 == 0:
                torch.mm(tile.t(), h, out=grad_weight[v0:v1])
            elif need_weight:
                grad_weight[v0:v1].addmm_(tile.t(), h)
            if need_bias:
                grad_bias[v0:v1] += tile.sum(0, dtype=torch.float32)
        if need_hidden:
            grad_hidden[rows] = dh
    grads = (grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_bias else None)
    return m + torch.log(s), target, grads


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, normalizer, plan):
        valid = labels != ignore_index
        if reduction == "mean":
            # An all-ignored batch gives 0, not 0/0: the count is clamped to 1 (the sum is 0 anyway).
            denominator = valid.sum().clamp(min=1).float() if normalizer is None else normalizer
        else:
            denominator = 1.0
        needs = ctx.needs_input_grad[:3]
        ctx.plan, ctx.denominator = plan, denominator
        if plan.strategy in ("rows", "tiles") and any(needs):
            # The loss is a scalar, so each row's gradient is known now up to the incoming scalar.
            row_grad = torch.where(valid, 1.0 / denominator, 0.0)
            forward_backward = _row_blocked_forward_backward if plan.strategy == "rows" else _tiled_forward_backward
            lse, target, ctx.grads = forward_backward(hidden, weight, bias, labels, row_grad, plan, *needs)
        else:
            lse, target = _vocab_blocked_statistics(hidden, weight, bias, labels, plan)
            ctx.save_for_backward(hidden, weight, bias, labels, lse, valid)
        row_loss = torch.where(valid, lse - target + plan.z_loss_weight * lse * lse, 0.0)
        # A label outside [0, V) matches no column; its loss is NaN, never a silent lse - 0 (check_labels=False
        # skips the host-side check, so this is what stops such a label without a synchronisation).
        row_loss = torch.where(valid & ((labels < 0) | (labels >= weight.shape[0])), float("nan"), row_loss)
        if reduction == "none":
            return row_loss
        return row_loss.sum() / denominator

    @staticmethod
    @backward_once
    def backward(ctx, grad_loss):
        needs = ctx.needs_input_grad[:3]
        if not any(needs):
            return (None,) * 8
        grad_loss = grad_loss.float()
        if ctx.plan.strategy in ("rows", "tiles"):
            # The gradients were formed in forward; scaling them in place and handing them over (not
            # keeping a copy) saves their memory, so a second backward through this graph cannot work.
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(f"fused_linear_cross_entropy(strategy={ctx.plan.strategy!r}) supports one "
                                   "backward per forward; use strategy='vocab' to backward twice (retain_graph=True)")
            return (*(g.mul_(grad_loss) if g is not None else None for g in grads), None, None, None, None, None)
        hidden, weight, bias, labels, lse, valid = ctx.saved_tensors
        row_grad = torch.where(valid, (grad_loss / ctx.denominator).expand(valid.shape), 0.0).contiguous()
        grads = _vocab_blocked_gradients(hidden, weight, bias, labels, lse, row_grad, ctx.plan, *needs)
        return (*grads, None, None, None, None, None)


def _check_inputs(hidden, weight, labels, bias, ignore_index, reduction, normalizer, softcap, z_loss_weight,
                  label_smoothing, strategy, chunk, check_labels):
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):  # True would skip every label 1
        raise TypeError(f"ignore_index must be an int (the label value that carries no loss, usually -100), "
                        f"got {ignore_index!r}")
    tensors = {"hidden": hidden, "weight": weight}
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        tensors["bias"] = bias
    check_same(tensors)
    check_same({"hidden": hidden, "labels": labels}, dtype=False)
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"weight must be [vocab, {hidden_size}] to match hidden [N, {hidden_size}], "
                         f"got {tuple(weight.shape)}")
    if vocab == 0 or hidden_size == 0:
        raise ValueError(f"weight must have a non-empty vocabulary and hidden size, got {tuple(weight.shape)}")
    if labels.shape[0] != n_rows:
        raise ValueError(f"labels must have one entry per hidden row ({n_rows}), got {labels.shape[0]}")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias must have {vocab} entries (one per vocabulary row of weight), got {bias.shape[0]}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer replaces the mean's denominator; it needs reduction='mean', "
                             f"got {reduction!r}")
        if not isinstance(normalizer, torch.Tensor) and not normalizer >= 0:
            raise ValueError(f"normalizer must be a token count >= 0, got {normalizer!r}")
        if isinstance(normalizer, torch.Tensor) and normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape "
                             f"{tuple(normalizer.shape)}")
    # Numbers only (None, a string or a tensor failed on the comparison with a bare TypeError); finite: cap·tanh(z/cap)
    # is inf·0 = NaN at cap = inf, and an infinite z_loss_weight made every loss inf.
    if softcap is not None and not (finite_number(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None (no cap), got {softcap!r}")
    if not (finite_number(z_loss_weight) and z_loss_weight >= 0):
        raise ValueError(f"z_loss_weight must be a finite number >= 0, got {z_loss_weight!r}")
    if not (finite_number(label_smoothing) and 0 <= label_smoothing <= 1):
        raise ValueError(f"label_smoothing must be a number in [0, 1] (0: none), got {label_smoothing!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in ("rows", "tiles") and reduction == "none":
        raise ValueError(f"strategy={strategy!r} forms gradients in the forward pass, which needs a scalar loss; "
                         "use reduction='mean' or 'sum', or strategy='vocab'")
    if strategy == "tiles" and isinstance(chunk, tuple):
        if len(chunk) != 2 or not all(_positive_int(c) for c in chunk):
            raise ValueError(f"chunk for strategy='tiles' must be rows or (rows, vocabulary columns), positive "
                             f"ints, got {chunk!r}")
    elif chunk is not None and not _positive_int(chunk):
        what = "int or (rows, columns) of ints" if strategy == "tiles" else "int"
        raise ValueError(f"chunk must be a positive {what} or None, got {chunk!r}")
    if n_rows and check_labels:
        check_label_range(labels, vocab, ignore_index)


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """A label outside [0, V) that is not ignore_index would silently count as a zero target logit: refuse it.
    This reads one flag back from the device (a host synchronisation per call)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index ({ignore_index}); "
                         f"found {labels[bad][:5].tolist()}")


def default_row_chunk(n_rows: int, hidden_size: int, element_size: int) -> int:
    """All rows in one block when that holds no more memory than DEFAULT_ROW_CHUNK-row blocks plus the
    fp32 dW accumulator they need (N·V·e <= chunk·V·e + 4·V·d bytes); else DEFAULT_ROW_CHUNK rows."""
    accumulator_rows = 4 * hidden_size // element_size if element_size < 4 else 0
    return max(n_rows, 1) if n_rows <= DEFAULT_ROW_CHUNK + accumulator_rows else DEFAULT_ROW_CHUNK


def _make_plan(n_rows, hidden_size, vocab, element_size, reduction, softcap, z_loss_weight, label_smoothing,
               strategy, chunk, grad_wanted) -> _Plan:
    if strategy == "auto":
        strategy = DEFAULT_STRATEGY if reduction != "none" else "vocab"
    if not grad_wanted:  # no backward will come: the forward-only statistics pass is all that is needed
        strategy = "vocab"
        chunk = None
    chunk_v = vocab
    if strategy == "vocab":
        chunk = min(chunk or default_vocab_chunk(n_rows, hidden_size, vocab), vocab)
        block_v = min(next_power_of_2(chunk), MAX_BLOCK_V)
    elif strategy == "tiles":
        chunk, chunk_v = chunk if isinstance(chunk, tuple) else (chunk or DEFAULT_TILE[0], DEFAULT_TILE[1])
        chunk_v = min(chunk_v, vocab)
        block_v = min(next_power_of_2(chunk_v), MAX_BLOCK_V)
    else:
        chunk = chunk or default_row_chunk(n_rows, hidden_size, element_size)
        block_v = min(next_power_of_2(vocab), MAX_BLOCK_V)
    num_warps = row_block_settings(block_v)[1]
    return _Plan(strategy, chunk, chunk_v, block_v, num_warps, None if softcap is None else float(softcap),
                 float(z_loss_weight), float(label_smoothing), float(label_smoothing) / vocab)


# Public entry points are opaque to torch.compile (torch.compiler.disable): a compiled region breaks its graph
# around them and runs them eagerly, autograd Function and Triton launches included (dynamo cannot trace the
# autotuned launches, nor the interpreter's).
@torch.compiler.disable
def fused_linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index: int = -100,
                               reduction: str = "mean", normalizer=None, softcap: float | None = None,
                               z_loss_weight: float = 0.0, label_smoothing: float = 0.0, strategy: str = "auto",
                               chunk: int | tuple[int, int] | None = None,
                               check_labels: bool = True):
    """Cross-entropy of `hidden [N, d] @ weight[V, d]ᵀ (+ bias [V])` against `labels [N]`, in fp32.

    `labels` are aligned with the rows of `hidden` (shift them before calling). Rows labelled
    `ignore_index` contribute nothing. `reduction="mean"` divides by the number of valid labels, or
    by `normalizer` (a number or 0-d tensor: the valid-token count over all gradient-accumulation
    micro-batches; 0 counts as 1) when given; an all-ignored batch gives 0. `softcap` applies cap·tanh(z/cap) to the
    logits (Gemma); `z_loss_weight` adds w·lse² per valid row; `label_smoothing` ε trains each valid row towards
    (1 - ε) one-hot + ε uniform over the vocabulary, as torch's cross_entropy(label_smoothing=ε).
    Gradients flow to hidden, weight and bias; a frozen weight or a hidden without grad skips its matmul.

    `strategy` picks how the [N, V] logits are cut: "vocab" holds [N, chunk] column blocks and
    recomputes them in backward (8·N·d·V FLOPs; extra memory N·chunk + fp32 N·d); "rows" holds
    [chunk, V] row blocks and forms the gradients during the forward pass (6·N·d·V FLOPs; extra memory
    chunk·V + fp32 V·d unless one block holds all rows; scalar losses only); "tiles" holds one
    [rows, cols] tile (`chunk` = rows or (rows, cols)) and also forms the gradients in forward, the
    leanest: extra memory rows·cols + fp32 rows·d whatever N and V (8·N·d·V FLOPs, 6 when cols >= V; dW
    summed in the weight's dtype once per row block; scalar losses only). "auto" uses DEFAULT_STRATEGY, or "vocab"
    for reduction="none" and when no gradient is wanted. `chunk` None picks the strategy's default
    block (`default_vocab_chunk`, `default_row_chunk`, DEFAULT_TILE).

    A label outside [0, V) that is not `ignore_index` raises a ValueError naming it; that check reads a flag back
    from the GPU. `check_labels=False` skips it for training loops whose data is validated up front (the
    patched models, after ChronicalsTrainer's token-id check): such a label then makes the loss NaN, never a
    silently wrong number, and costs no host synchronisation. (On the H200, a 0.5B full-fine-tuning step took
    144.5 ms with the check and 123.5 ms without it in one benchmarks/step_profile.py run; the harness runs before
    and after the change, 120.6 and 126.5 ms, did not separate it from run-to-run noise.)
    """
    # As autocast would run the lm_head matmul: in its low-precision dtype (fp32 master weights still receive their
    # gradient); an argument autocast would not cast is left for the checks below.
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    _check_inputs(hidden, weight, labels, bias, ignore_index, reduction, normalizer, softcap, z_loss_weight,
                  label_smoothing, strategy, chunk, check_labels)
    grad_wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    plan = _make_plan(*hidden.shape, weight.shape[0], hidden.element_size(), reduction, softcap, z_loss_weight,
                      label_smoothing, strategy, chunk, grad_wanted)
    # A count of 0 means no valid label in any micro-batch, so the sum is 0 too: divide by 1, not 0.
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=hidden.device, dtype=torch.float32).reshape(())
        # 0 counts as 1; a negative count (checking it here would cost a host sync per call) makes the loss NaN
        # rather than silently flipping its sign, so the trainer's non-finite check stops or skips the step.
        normalizer = torch.where(normalizer == 0, 1.0, torch.where(normalizer < 0, float("nan"), normalizer))
    elif normalizer is not None:
        normalizer = float(normalizer) or 1.0
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels.contiguous(),
        ignore_index, reduction, normalizer, plan,
    )


@torch.compiler.disable
def fused_cross_entropy(hidden_states, lm_head_weight, targets, chunk_size: int = 4096, ignore_index: int = -100, *,
                        reduction: str = "mean", normalizer=None, softcap: float | None = None,
                        z_loss_weight: float = 0.0, label_smoothing: float = 0.0):
    """Mean cross-entropy over valid targets of `hidden_states [B, N, d]` through `lm_head_weight [V, d]`.

    `targets [B, N]` are aligned with the hidden positions (no shift inside). Flattened rows, `hidden_states [N, d]`
    with `targets [N]` (the layout of Liger's fused loss), are taken too. `chunk_size` is the
    block size of `fused_linear_cross_entropy`'s default strategy: tokens per block for "rows",
    vocabulary columns for "vocab" (the forward-only pass under no_grad picks its own). The keyword-only options are
    `fused_linear_cross_entropy`'s: `reduction` "sum" or "none" (then one loss per target, in `targets`' shape, 0 where
    ignored), the accumulation `normalizer`, Gemma's logit `softcap`, `z_loss_weight` and `label_smoothing`.
    """
    # This function's own argument names in its errors: fused_linear_cross_entropy's checks alone named lm_head_weight
    # "weight" and hidden_states "hidden" (as autocast would cast them first, so are they here).
    hidden_states, lm_head_weight = autocast_inputs(hidden_states, lm_head_weight)
    check_tensor("hidden_states", hidden_states, ndim=(2, 3))
    check_tensor("lm_head_weight", lm_head_weight, ndim=2)
    check_tensor("targets", targets, ndim=hidden_states.ndim - 1, dtypes=(torch.int64, torch.int32))
    check_same({"hidden_states": hidden_states, "lm_head_weight": lm_head_weight})
    check_same({"hidden_states": hidden_states, "targets": targets}, dtype=False)
    if lm_head_weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(f"lm_head_weight must be [vocab, {hidden_states.shape[-1]}] to match hidden_states "
                         f"{tuple(hidden_states.shape)}, got {tuple(lm_head_weight.shape)}")
    if chunk_size is not None and not _positive_int(chunk_size):
        raise ValueError(f"chunk_size must be a positive int (tokens or vocabulary columns per block) or None, got "
                         f"{chunk_size!r}")
    if tuple(targets.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden_states.shape[:-1])} to match hidden_states "
                         f"{tuple(hidden_states.shape)} (one target per row), got {tuple(targets.shape)}")
    loss = fused_linear_cross_entropy(
        hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head_weight, targets.reshape(-1),
        ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, softcap=softcap,
        z_loss_weight=z_loss_weight, label_smoothing=label_smoothing, chunk=chunk_size,
    )
    return loss.view(targets.shape) if reduction == "none" else loss
