"""SwiGLU activation as Triton kernels: c = silu(a) * b, with a = gate and b = up projections.

    forward:  c = a * sigmoid(a) * b
    backward: with s = sigmoid(a) recomputed from a (nothing but the inputs is stored),
              da = dc * b * s * (1 + a * (1 - s)),   db = dc * a * s

Elementwise and memory-bound. Per element of b bytes: forward reads a, b and writes c (3b);
backward reads dc, a, b and writes da, db (5b). Math in fp32, results rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cast_rne, check_same, check_tensor

# 4096 elements over 8 warps: 16 per thread, i.e. two 16-byte accesses per bf16 tensor.
_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _swiglu_fwd_kernel(A, B, C, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(C + offs, cast_rne(c, C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DC, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = tl.load(DC + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    # d silu / da = s + a * s * (1 - s) = s * (1 + a * (1 - s))
    da = dc * b * s * (1.0 + a * (1.0 - s))
    db = dc * silu
    tl.store(DA + offs, cast_rne(da, DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, cast_rne(db, DB.dtype.element_ty), mask=mask)


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the forward on contiguous tensors of one shape."""
    c = torch.empty_like(a)
    n = a.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](a, b, c, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return c


def swiglu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward on contiguous tensors of one shape. Returns (da, db)."""
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    n = a.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dc, a, b, da, db, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dc):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dc.contiguous(), gate, up)


def fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for tensors of any (equal) shape, in their dtype."""
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}; they must match")
    check_same({"gate": gate, "up": up})
    return SwiGLUFunction.apply(gate, up)
