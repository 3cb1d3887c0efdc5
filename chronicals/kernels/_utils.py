"""Helpers shared by the Triton kernels: interpreter detection, launch settings and input checks.

`TRITON_INTERPRET=1` must be set before any kernel module is imported (Triton reads it when a
`@triton.jit` function is defined). Under the interpreter `tl.dot` on bf16/fp16 operands returns
garbage, so kernels that use `tl.dot` take the `DOT_UPCAST` constexpr and cast their operands to
fp32 first when it is set; on a GPU the native low-precision path runs.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Pass as a constexpr to kernels that call tl.dot: upcast operands to fp32 under the interpreter.
DOT_UPCAST: bool = INTERPRET

# INTERPRET as a constexpr, for the jit helpers below that take another path under the interpreter: Triton's
# interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even), which would double the rounding error
# that CPU tests see, so `cast_rne` rounds the bits first there; and it runs no inline PTX, so `widen` takes the cvt.
_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 `x` -> `dtype`, rounded to nearest even on the GPU and under the interpreter alike."""
    if _INTERPRETED and dtype == tl.bfloat16:
        # bf16 keeps the top 16 bits of an fp32: add half an ulp (minus one when the kept part is
        # even, for ties to even), then clear the dropped bits, so the truncating cast is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def widen(x, BITS: tl.constexpr):
    """`x` -> fp32 (exact). With BITS set, a bf16 pair held in one 32-bit register widens by two bit moves (the low
    element shifted up 16, the high one masked), where the compiler's cvt of each element spends a PRMT and a SHF on
    the high one. Not under the interpreter, which runs no PTX, nor for a one-element tensor (head_dim 2 in RoPE),
    which holds no pair: Triton refuses pack=2 there ("number of input elements 1 must be a multiple of ... 2")."""
    if BITS and x.dtype.is_bf16() and not _INTERPRETED and x.numel > 1:
        return tl.inline_asm_elementwise("shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000;", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    return x.to(tl.float32)


@triton.jit
def sigmoid(x, FAST: tl.constexpr, OUT: tl.constexpr):
    """1 / (1 + exp(-x)) of fp32 `x`, for results rounded to `OUT`. FAST with a bf16/fp16 `OUT`: ex2.approx.ftz and
    rcp.approx.ftz (a few fp32 ulp, far below a bf16 or fp16 rounding), where tl.sigmoid's exp and division carry
    denormal and range fix-ups; an fp32 `OUT` always keeps tl.sigmoid. Limits match: -inf gives 0, +inf 1, NaN NaN.
    Not under the interpreter, which runs no PTX."""
    if FAST and OUT != tl.float32 and not _INTERPRETED:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
            "rcp.approx.ftz.f32 $0, t; }", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return tl.sigmoid(x)


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The elementwise kernels form element offsets in int32 when every offset into their tensors stays below 2^30 (the
# other 2^30 is headroom for the masked lanes a tile runs past the end), and in int64 otherwise: int64 offsets cost
# each program a longer address computation (64-bit multiplies, and a 64-bit division in SwiGLU's row-strided
# layout), which these short, latency-bound programs feel. H100, 2026-12-07 (kernel_ops.py, same rounds, 16384 rows
# bf16): int64 was slower in 10 of 16 op/shape/pass rows (RMSNorm fwd 90.9 against 88.4 us at 4096 columns, 20.1
# against 19.4 at 896; RoPE at Qwen2.5-0.5B 25.8 against 25.3), equal or faster by <= 1.7% in the rest; each within
# the run's ~3% spread for one kernel, most in one direction. FORCE_INT64 makes every launch use int64 offsets
# (benchmarks/kernel_ops.py A/Bs it; tests run both paths).
FORCE_INT64 = False
_INT32_SPAN = 1 << 30


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a kernel must form its offsets into `tensors` in int64. Bounded by each tensor's storage (cheap, and
    it bounds every offset a view of it can take: strides are non-negative)."""
    return FORCE_INT64 or any(t.untyped_storage().nbytes() >= _INT32_SPAN * t.element_size() for t in tensors)


MAX_FUSED_SIZE = 65536 // 2  # largest row (elements) a single program handles in one block


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block_settings(n_cols: int) -> tuple[int, int]:
    """Block size and warp count for a kernel that holds one whole row of `n_cols` in registers."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row of {n_cols} elements exceeds the largest supported size {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def finite_number(x) -> bool:
    """A finite real number: numpy scalars count (np.float32 is no float), a bool does not (it is not meant as one),
    and neither does a tensor or None."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, dtypes=SUPPORTED_DTYPES) -> None:
    """Raise a clear error naming argument `name` when `t` is not a usable kernel input."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.ndim not in allowed:
            dims = " or ".join(map(str, allowed))
            raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before import, for CPU testing)"
        )


def check_same(names_tensors: dict, *, dtype: bool = True, device: bool = True) -> None:
    """All tensors share device (and dtype when asked); the error names the first mismatch."""
    items = list(names_tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if device and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def fits_output(residual, x: torch.Tensor, out_features: int) -> bool:
    """Whether `residual` can be an op's beta = 1 matmul input for an output [*x.shape[:-1], out_features] in x's
    dtype: a tensor of exactly that shape, dtype and device (not one that broadcasts to it, or one whose sum with the
    output promotes to another dtype, such as an fp32 residual stream under autocast)."""
    return isinstance(residual, torch.Tensor) and residual.shape == (*x.shape[:-1], out_features) \
        and residual.dtype == x.dtype and residual.device == x.device


def autocast_inputs(*tensors):
    """`tensors` as autocast's own matmul would take them when autocast is on for the first one's device type: the
    floating tensors other than float64 on that device type cast to autocast's dtype (the casts stay on the autograd
    graph, so fp32 master weights still receive their gradients), anything else as it is. Casting every argument
    first made an int tensor pass the input checks (computed in bf16), cast a module passed in place of its weight
    to bf16 in place before refusing it, and broke on a non-tensor with an AttributeError; left alone, the checks
    refuse each by name. (autocast itself leaves float64 as it is, and so do the checks.)"""
    first = tensors[0]
    if not (isinstance(first, torch.Tensor) and torch.is_autocast_enabled(first.device.type)):
        return tensors
    device_type = first.device.type
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 and t.device.type == device_type else t for t in tensors)


def backward_once(backward=None, *, what: str = "", fix: str = "use the unfused PyTorch op"):
    """Decorates an autograd.Function backward whose Triton kernels build no graph: under create_graph=True its
    gradients get a node that raises if a second backward reaches it. torch's once_differentiable adds that node
    only when the incoming gradients require grad, but these gradients also depend on the saved inputs: after
    loss.backward(create_graph=True) (incoming gradient 1) a gradient penalty silently lost the op's
    second-order terms. (A backward that does not read its inputs, such as RoPE's, can use once_differentiable.)
    `what` prefixes the op's name in the error and `fix` says what to use instead:
    @backward_once(what="the fused LoRA op", fix="use LoRAConfig(fused=False)")."""
    if backward is None:
        return functools.partial(backward_once, what=what, fix=fix)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        name = ctx.__class__.__name__.removesuffix("Backward").lstrip("_")
        error = torch._C._functions.DelayedError(
            f"{what + ' ' if what else ''}{name} has no double backward: its gradient is not differentiable (a second "
            f"backward through a create_graph=True gradient, e.g. a gradient penalty); {fix} for higher-order "
            "gradients", len(outputs))
        return error(*[g.detach().requires_grad_(True) if isinstance(g, torch.Tensor) else g for g in outputs])

    return wrapper
