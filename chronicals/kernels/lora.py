"""Fused LoRA: the frozen base path and the low-rank path of one or several projections in one autograd op.

For projections i = 1..n of the same input X [N, d] (q/k/v, or gate/up), with frozen W_i [o_i, d], adapters
A_i [r_i, d], B_i [o_i, r_i] and scales s_i:

    XA    = X @ cat(A_1..A_n)^T                      one pass over X for all adapters  [N, R]
    Y_i   = X @ W_i^T + s_i * XA_i @ B_i^T           low-rank term first, then the base matmul adds onto it

Backward, given dY_i:

    G_i   = s_i * dY_i @ B_i                         [N, r_i]
    dB_i  = s_i * dY_i^T @ XA_i
    dA    = cat(G_1..G_n)^T @ X                      one pass over X for all adapters
    dX    = cat(G) @ cat(A) + sum_i dY_i @ W_i

Only X and the thin XA [N, R] are saved, never the outputs.

Order of the sums: the thin K = r matmul that writes an [N, o] output is memory-bound, the base matmul (K = d) is
compute-bound. So the thin term is written first (s_i XA_i B_i^T + bias, or cat(G) cat(A)) and the base matmul adds
onto it (addmm with beta = 1: cuBLAS reads it in the epilogue, behind the math). Added the other way round, the thin
matmul read and rewrote the whole output: PEFT's order, and ours before. In an H100 profile of a Llama-3.2-1B r16
step (203 ms) the beta = 1 kernels took 32.6 ms, of which the compute-bound dX accumulations (k, v, up) are ~14, so
~18 ms went to the 176 thin ones. `_LOW_RANK_FIRST` keeps the old order for A/Bs. Either order rounds the term
written first, then the fp32 sum of it and the other product: two roundings per output element, as PEFT's.

K-concatenated forward (opt-in, `kconcat=True`; LoRAConfig.fused_kconcat): the low-rank terms are folded into the
base matmul along K, so all n outputs come from one matmul with no second pass over them:

    X_ext = [X | XA]                                                             [N, d + R]
    W_ext = [[W_1, s_1 B_1, 0, ...], [W_2, 0, s_2 B_2, ...], ...]                  [sum o_i, d + R]
    Y_all = X_ext @ W_ext^T (+ cat(bias)),   Y_i = column slices of Y_all (views)

Each output is rounded once from its fp32 accumulation (the addmm path rounds X W_i^T, then the sum); s_i B_i is
rounded to the activation dtype first (a tiny [o_i, r_i] matrix). Saved tensors and the backward are unchanged.

The SwiGLU MLP adds, with e, g the gate/up outputs, h = silu(e) * g and Y = h @ W_d^T + s_d * (h @ A_d^T) @ B_d^T:
it saves X, e, g and h @ A_d^T (not h, silu(e) or the product, which PEFT's eager path keeps; K-concatenated, e and
g are the halves of one [N, 2I] buffer and down's matmul takes [h | h A_d^T]), and its backward recomputes h in
the same Triton pass that forms de and dg, writing h, de, dg over dh, e, g so no new [N, I] buffers are allocated:

    sig = sigmoid(e),  h = e * sig * g,  dg = dh * e * sig,  de = dh * g * sig * (1 + e * (1 - sig))

Given the decoder layer's residual (chronicals' patched layer passes it), the op returns residual + Y, the residual
being the beta = 1 input of down's first matmul (read in cuBLAS's epilogue) and its gradient dY itself, so the
layer's last add is no separate pass over [N, d].

DoRA (weight-decomposed LoRA, PEFT's formulation) scales each output row by m_j / ||W + s B A||_j, with the
norm treated as a constant (DoRA paper, section 4.3; PEFT detaches it too):

    Z = X @ W^T + s * XA @ B^T,   Y = bias + (m / norm) * Z
    dm = sum_N(dY * Z) / norm,    dZ = dY * m / norm, then dA, dB, dX as for LoRA with dZ

It saves X W^T (not Z: dm rebuilds Z in fp32 from it and the thin XA, one rounding fewer) besides X and
XA; the norm is computed in fp32.

Frozen weights and biases get no gradient. Adapters may be stored in fp32 (PEFT's default); they are cast to
the activations' dtype for the matmuls and their gradients are returned in their own dtype.
"""

from __future__ import annotations

import functools

import torch

from . import lora_swiglu
from . import swiglu as swiglu_kernels
from ._utils import INTERPRET, backward_once, fits_output


def _autocast_off(method):
    """Run a forward/backward with autocast off: its dtypes are chosen explicitly (fp32 where it says so)."""
    @functools.wraps(method)
    def wrapper(ctx, first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *args)

    return wrapper


# These backwards read their saved inputs (X, XA, B, the MLP's activations) and build no graph through them (the
# saved XA and cat(A) are detached; the MLP's SwiGLU step runs in Triton, in place): a gradient penalty through them
# silently lost the ops' second-order terms (lora_A's gradient off by 37-54% on q/k/v, the MLP's lora_A gradients
# missing). Under create_graph=True their gradients now raise if differentiated again.
_backward_once = backward_once(what="the fused LoRA op", fix="use LoRAConfig(fused=False) (PEFT's own layers)")


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET


# Public entry points are opaque to torch.compile (torch.compiler.disable): a compiled region breaks its graph
# around them and runs them eagerly, autograd Function and Triton launches included (dynamo cannot trace the
# autotuned launches, nor the interpreter's).
@torch.compiler.disable
def swiglu_forward(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(e) * g, computed in fp32 and stored in e's dtype, into `out` (a new contiguous tensor when None).
    e, g and out share one shape and dtype and are contiguous, or 2-D with unit column stride (e.g. column
    halves). The kernel is chronicals.kernels.swiglu's; this adds the plain-PyTorch path for CPUs without Triton."""
    h = torch.empty(e.shape, dtype=e.dtype, device=e.device) if out is None else out
    if _use_triton(e):
        return swiglu_kernels.swiglu_forward(e, g, out=h)
    swiglu_kernels.layout(e=e, g=g, out=h)
    return h.copy_(torch.nn.functional.silu(e.float()) * g.float())


@torch.compiler.disable
def swiglu_backward_inplace(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor):
    """Overwrite dh with h, e with de and g with dg; returns (h, de, dg) as those same buffers. Layouts as for
    `swiglu_forward` (e and g may be the column halves of one buffer)."""
    if _use_triton(e):
        # The kernel loads dh, e, g before it stores, element by element, so its outputs may be its inputs.
        swiglu_kernels.swiglu_backward(dh, e, g, da=e, db=g, c=dh)
        return dh, e, g
    swiglu_kernels.layout(dh=dh, e=e, g=g)
    # .float() of an fp32 tensor is that tensor itself: every result is formed before any buffer is written.
    ef, gf, dhf = e.float(), g.float(), dh.float()
    sig = torch.sigmoid(ef)
    silu = ef * sig
    h, dg, de = silu * gf, dhf * silu, dhf * gf * sig * (1.0 + ef * (1.0 - sig))
    dh.copy_(h)
    g.copy_(dg)
    e.copy_(de)
    return dh, e, g


def _base(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
          ) -> torch.Tensor:
    """x2 @ w^T (+ bias), into `out` when given (the same GEMM)."""
    return torch.mm(x2, w.t(), out=out) if bias is None else torch.addmm(bias, x2, w.t(), out=out)


# See the module docstring ("Order of the sums"); False is the order PEFT uses, kept for benchmarks/step_profile.py.
_LOW_RANK_FIRST = True
# The MLP's gate/up low-rank terms and h A_d^T inside the SwiGLU pass (chronicals.kernels.lora_swiglu), on a GPU or
# under the interpreter; else thin cuBLAS matmuls around the SwiGLU kernel. benchmarks/step_profile.py A/Bs both.
# H100, 2026-12-06, the fused LoRA MLP at Llama-3.2-1B (16384 tokens, I 8192, r 16), forward + backward per layer:
# 6.945 ms in PEFT's order, 6.665 low-rank first, 6.091 with this. Ranks above _LOW_RANK_IN_SWIGLU_MAX_RANK take the
# cuBLAS path: the kernel holds [64, r] adapter tiles in registers; it is built for sm90 at both rank blocks (16 and
# 32, tests/kernels/test_compile_for_hopper.py), GPU-tested up to r 32 and timed only at r 16.
_LOW_RANK_IN_SWIGLU = True
_LOW_RANK_IN_SWIGLU_MAX_RANK = 32


def _output(lead: torch.Size, cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An output allocated in the caller's leading shape, and its [N, cols] view for the matmuls to write. An
    autograd.Function that returned y2.view(*lead, cols) would hand out a view made inside it, which autograd
    refuses to let the caller change in place ('Output 0 of _LoRAFanOut is a view and is being modified
    inplace' on out += residual, where PEFT's own layers allow it)."""
    y = torch.empty((*lead, cols), dtype=like.dtype, device=like.device)
    return y, y.view(-1, cols)


@functools.cache
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), device=device, dtype=dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """s * (a @ b) rounded once (a separate mul_ would round the product a second time), into `out` when given. The
    ignored beta=0 input is one cached zero, not a fill kernel per call (224 of them per Llama-3.2-1B step)."""
    return torch.addmm(_zero(a.device, a.dtype), a, b, beta=0, alpha=s, out=out)


@functools.cache
def _fp32_out_works(device: torch.device) -> bool:
    """Whether cuBLAS here writes an fp32 product of half-precision operands straight from its fp32 accumulator
    (addmm's out_dtype, CUDA in recent torch), checked once per device on a tiny product against the fp32 one."""
    a = torch.arange(12, device=device, dtype=torch.float32).reshape(3, 4).div(8).to(torch.bfloat16)
    b = torch.arange(8, device=device, dtype=torch.float32).reshape(4, 2).div(4).to(torch.bfloat16)
    try:
        got = torch.addmm(_zero(device, torch.float32), a, b, beta=0, alpha=0.5, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return got.dtype == torch.float32 and torch.equal(got, 0.5 * (a.float() @ b.float()))


def _grad_mm(a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """s * (a @ b) as an adapter's gradient in the adapter's dtype `dtype`. fp32 adapters (PEFT's default) of a
    bf16 model: on a GPU cuBLAS writes the fp32 sum directly, not rounded to bf16 and then cast by a separate kernel
    (a Llama-3.2-1B LoRA step had 226 of those casts, a few us each on an H100); elsewhere the product in the
    operands' dtype, cast."""
    if dtype == torch.float32 and a.dtype != dtype and a.is_cuda and _fp32_out_works(a.device):
        return torch.addmm(_zero(a.device, dtype), a, b, beta=0, alpha=s, out_dtype=dtype)
    return _scaled_mm(a, b, s).to(dtype)


def _fanout_forward(x2, scales, weights, biases, a_list, b_list, lead=None):
    """Y_i = X W_i^T + s_i (X A^T)_i B_i^T for every projection; returns (outputs, XA, cat(A)). The outputs have
    the leading shape `lead` ([N] when None), see _output."""
    a_cat = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    xa = x2 @ a_cat.t()
    lead = x2.shape[:1] if lead is None else lead
    outs, off = [], 0
    for s, w, bias, a, b in zip(scales, weights, biases, a_list, b_list):
        r = a.shape[0]
        y, y2 = _output(lead, w.shape[0], x2)
        _add_low_rank(y2, x2, w, bias, xa[:, off:off + r], b.t(), s)
        outs.append(y)
        off += r
    return outs, xa, a_cat


def _add_low_rank(out, x2, w, bias, thin, b_t, s, residual=None):
    """out = x2 @ w^T (+ bias) + s * thin @ b_t (+ residual [N, o]), in the order _LOW_RANK_FIRST picks (see the
    module docstring). The residual is the thin matmul's beta = 1 input: read in its epilogue, not a pass of its own."""
    if not _LOW_RANK_FIRST:
        _base(x2, w, bias, out=out)
        out.addmm_(thin, b_t, alpha=s)
        if residual is not None:
            out.add_(residual)
        return
    if bias is None and residual is None:
        _scaled_mm(thin, b_t, s, out=out)
    else:
        start = bias if residual is None else residual if bias is None else residual + bias
        torch.addmm(start, thin, b_t, alpha=s, out=out)
    out.addmm_(x2, w.t())


def _extended_weight(weights, scales, b_params, dt):
    """W_ext = [[W_1, s_1 B_1, 0, ...], [W_2, 0, s_2 B_2, ...], ...]: [sum o_i, d + R], block-diagonal in its last R
    columns. Built per call (a copy of the frozen weights, small next to the activations; never saved). s_i B_i is
    formed in the adapter's own dtype (fp32 as apply_lora keeps it) and rounded to `dt` once: that rounding of the
    tiny [o_i, r_i] matrix is the one this path adds, where the addmm path rounds B_i to `dt` instead."""
    d = weights[0].shape[1]
    ranks = [b.shape[1] for b in b_params]
    w_ext = torch.empty(sum(w.shape[0] for w in weights), d + sum(ranks), dtype=dt, device=weights[0].device)
    if len(weights) > 1:
        w_ext[:, d:].zero_()
    row, col = 0, d
    for w, s, b, r in zip(weights, scales, b_params, ranks):
        o = w.shape[0]
        w_ext[row:row + o, :d].copy_(w)
        w_ext[row:row + o, col:col + r].copy_(b * s)
        row, col = row + o, col + r
    return w_ext


def _kconcat_forward(x2, scales, weights, biases, a_list, b_params, lead=None):
    """All outputs Y_all = [X | XA] @ W_ext^T (+ cat(bias)) in one matmul, the low-rank terms folded in along K;
    returns (Y_all [*lead, sum o_i] ([N, sum o_i] when lead is None, see _output), XA, cat(A)). One fp32
    accumulation and one rounding per output element, where the addmm path rounds X W_i^T to the activation
    dtype and then the sum again (so this is at least as accurate, bar the rounding of s_i B_i noted in
    _extended_weight), and no second pass over the outputs.

    XA gets its own [N, R] buffer and is copied into X_ext (a thin copy): XA is saved for the backward, and a
    view of X_ext would keep all of X_ext alive, a second copy of X besides the X the backward saves (and that
    the op producing X, attention or a norm, may keep as well). X_ext and W_ext are freed on return."""
    a_cat = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    xa = x2 @ a_cat.t()
    n_rows, d = x2.shape
    x_ext = torch.empty(n_rows, d + xa.shape[1], dtype=x2.dtype, device=x2.device)
    x_ext[:, :d].copy_(x2)
    x_ext[:, d:].copy_(xa)
    w_ext = _extended_weight(weights, scales, b_params, x2.dtype)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
    y_all, y2 = _output(x2.shape[:1] if lead is None else lead, w_ext.shape[0], x2)
    _base(x_ext, w_ext, bias, out=y2)
    return y_all, xa, a_cat


def _fanout_backward(x2, xa, a_cat, scales, weights, b_list, dys, need_dx: bool, a_dtypes, b_dtypes, g_cat=None):
    """Gradients (dX or None, [dA_i], [dB_i]) of the fan-out for output gradients dys ([N, o_i] each), dA_i and dB_i
    in the adapters' dtypes `a_dtypes`, `b_dtypes`. `g_cat`: cat(G) when the caller formed it already (the LoRA
    SwiGLU kernel does, in its pass over dY)."""
    gs, d_b, off = [], [], 0
    for s, b, dy, dt in zip(scales, b_list, dys, b_dtypes):
        r = b.shape[1]
        if g_cat is None:
            gs.append(_scaled_mm(dy, b, s))
        d_b.append(_grad_mm(dy.t(), xa[:, off:off + r], s, dt))
        off += r
    if g_cat is None:
        g_cat = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)
    d_a_dtype = a_dtypes[0] if len(set(a_dtypes)) == 1 else x2.dtype  # one matmul for all A's; cast each if not
    d_a = [g.to(dt) for g, dt in zip(torch.split(_grad_mm(g_cat.t(), x2, 1.0, d_a_dtype), [b.shape[1] for b in b_list]),
                                     a_dtypes)]
    dx = None
    if need_dx:
        if _LOW_RANK_FIRST:  # the thin term written first, the base matmuls add onto it (module docstring)
            dx = g_cat @ a_cat
            for w, dy in zip(weights, dys):
                dx.addmm_(dy, w)
        else:
            dx = dys[0] @ weights[0]
            for w, dy in zip(weights[1:], dys[1:]):
                dx.addmm_(dy, w)
            dx.addmm_(g_cat, a_cat)
    return dx, d_a, d_b


def _fanout_op_forward(ctx, x, scales, params, kconcat: bool):
    n = len(scales)
    weights, biases = params[:n], params[n:2 * n]
    a_params, b_params = params[2 * n:3 * n], params[3 * n:]
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    a_list = [a.to(dt) for a in a_params]
    b_list = [b.to(dt) for b in b_params]
    lead = x.shape[:-1]  # outputs are allocated in the caller's shape, not views of [N, o] ones (see _output)
    if kconcat:
        y_all, xa, a_cat = _kconcat_forward(x2, scales, weights, biases, a_list, b_params, lead)
        # Column views of one [*lead, sum o_i] buffer (one output: the buffer itself). Their gradients come back as
        # separate tensors; like torch.split's outputs they may not be modified in place.
        outs = [y_all] if n == 1 else y_all.split([w.shape[0] for w in weights], dim=-1)
    else:
        outs, xa, a_cat = _fanout_forward(x2, scales, weights, biases, a_list, b_list, lead)
    ctx.scales = scales
    ctx.param_dtypes = [p.dtype for p in (*a_params, *b_params)]
    ctx.save_for_backward(x, xa, a_cat, *weights, *b_list)
    return tuple(outs)


class _LoRAFanOut(torch.autograd.Function):
    """n LoRA projections of one input. Inputs: x, scales, then W_1..n, bias_1..n, A_1..n, B_1..n."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, scales, *params):
        return _fanout_op_forward(ctx, x, scales, params, kconcat=False)

    @staticmethod
    @_backward_once
    @_autocast_off
    def backward(ctx, *dys):
        n = len(ctx.scales)
        x, xa, a_cat, *rest = ctx.saved_tensors
        weights, b_list = rest[:n], rest[n:]
        x2 = x.reshape(-1, x.shape[-1])
        # An output gradient may be strided (e.g. a transposed view); every matmul below takes strided operands.
        dys2 = [dy.reshape(-1, dy.shape[-1]).to(x.dtype) for dy in dys]
        dx, d_a, d_b = _fanout_backward(x2, xa, a_cat, ctx.scales, weights, b_list, dys2, ctx.needs_input_grad[0],
                                        ctx.param_dtypes[:n], ctx.param_dtypes[n:])
        return (None if dx is None else dx.view_as(x), None, *([None] * (2 * n)), *d_a, *d_b)


class _LoRAFanOutKConcat(_LoRAFanOut):
    """_LoRAFanOut with the K-concatenated forward (_kconcat_forward); same inputs, saved tensors and backward."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, scales, *params):
        return _fanout_op_forward(ctx, x, scales, params, kconcat=True)


def _low_rank_in_swiglu(x, a_params) -> bool:
    """Whether the MLP's low-rank terms go inside its SwiGLU pass (see _LOW_RANK_IN_SWIGLU)."""
    return (_LOW_RANK_IN_SWIGLU and _use_triton(x)
            and max(a.shape[0] for a in a_params) <= _LOW_RANK_IN_SWIGLU_MAX_RANK)


def _mlp_op_forward(ctx, x, residual, scales, params, kconcat: bool):
    wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d = params
    in_swiglu = not kconcat and _low_rank_in_swiglu(x, (ag, au, ad))  # decided once: the backward follows the forward
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    res2 = None if residual is None else residual.reshape(-1, wd.shape[0])
    ag_, bg_, au_, bu_, ad_, bd_ = (t.to(dt) for t in (ag, b_g, au, b_u, ad, b_d))
    # y in x's shape, written through its [N, d_out] view: not a view made here, so y += residual works (_output).
    y, y2 = _output(x.shape[:-1], wd.shape[0], x2)
    if kconcat:
        # gate|up in one matmul into [N, 2I] (e, g its column halves); h written straight into the first I
        # columns of H_ext = [h | h A_d^T] for down's K-concatenated matmul. The [N, 2I] buffer is saved once (the
        # bytes of e and g); h A_d^T has its own buffer (saved; copied into H_ext), H_ext is freed on return.
        eg, xa, a_cat = _kconcat_forward(x2, scales[:2], (wg, wu), (bg, bu), (ag_, au_), (b_g, b_u))
        inter = wg.shape[0]
        e, g = eg[:, :inter], eg[:, inter:]
        h_ext = torch.empty(x2.shape[0], inter + ad.shape[0], dtype=dt, device=x.device)
        # Zeroed before h A_d^T reads h, a row-strided view: the CPU's bf16 GEMM reads each row on past its last
        # column, and uninitialised memory there (inf, NaN) leaked into the product as NaN (seen under the tests).
        h_ext[:, inter:].zero_()
        h = swiglu_forward(e, g, out=h_ext[:, :inter])
        ha = h @ ad_.t()
        h_ext[:, inter:].copy_(ha)
        w_ext = _extended_weight((wd,), scales[2:], (b_d,), dt)
        if res2 is None:
            _base(h_ext, w_ext, bd, out=y2)
        else:
            torch.addmm(res2 if bd is None else res2 + bd, h_ext, w_ext.t(), out=y2)
        activations = (eg,)
    elif in_swiglu:
        # gate/up's low-rank terms and h A_d^T are formed inside the SwiGLU pass (chronicals.kernels.lora_swiglu):
        # e and g saved here are the base outputs e0, g0, and the backward adds the low-rank terms again in-kernel.
        a_cat = torch.cat((ag_, au_))
        xa = x2 @ a_cat.t()
        e, g = _base(x2, wg, bg), _base(x2, wu, bu)
        h, ha = lora_swiglu.lora_swiglu_forward(e, g, xa, bg_.contiguous(), bu_.contiguous(), scales[0], scales[1],
                                                ad_.contiguous())
        _add_low_rank(y2, h, wd, bd, ha, bd_.t(), scales[2], res2)
        activations = (e, g)
    else:
        (e, g), xa, a_cat = _fanout_forward(x2, scales[:2], (wg, wu), (bg, bu), (ag_, au_), (bg_, bu_))
        h = swiglu_forward(e, g)
        ha = h @ ad_.t()
        _add_low_rank(y2, h, wd, bd, ha, bd_.t(), scales[2], res2)
        activations = (e, g)
    ctx.low_rank_in_swiglu = in_swiglu
    ctx.scales = scales
    ctx.kconcat = kconcat
    ctx.param_dtypes = [p.dtype for p in (ag, au, b_g, b_u, ad, b_d)]
    ctx.save_for_backward(x, xa, a_cat, ha, ad_, wg, wu, wd, bg_, bu_, bd_, *activations)
    return y


class _LoRASwiGLUMLP(torch.autograd.Function):
    """residual + down(silu(gate(x)) * up(x)) with LoRA on all three (no residual when it is None). Inputs: x,
    residual, (s_g, s_u, s_d), then for gate, up, down in turn: W, bias, A, B."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, residual, scales, *params):
        return _mlp_op_forward(ctx, x, residual, scales, params, kconcat=False)

    @staticmethod
    @_backward_once
    @_autocast_off
    def backward(ctx, dy):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the fused LoRA MLP backward overwrites its saved activations, so it runs once per "
                               "forward (no retain_graph double backward); use LoRAConfig(fused=False) for that")
        ctx.consumed = True
        x, xa, a_cat, ha, ad_, wg, wu, wd, bg_, bu_, bd_, *activations = ctx.saved_tensors
        if ctx.kconcat:  # the column halves of one [N, 2I] buffer: de, dg are written over them, row-strided
            (eg,) = activations
            e, g = eg[:, :wg.shape[0]], eg[:, wg.shape[0]:]
        else:
            e, g = activations
        sg, su, sd = ctx.scales
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        dt_ag, dt_au, dt_bg, dt_bu, dt_ad, dt_bd = ctx.param_dtypes
        gd = _scaled_mm(dy2, bd_, sd)
        d_bd = _grad_mm(dy2.t(), ha, sd, dt_bd)
        g_cat = None
        if ctx.low_rank_in_swiglu:  # dh's low-rank term and cat(G) for gate/up are formed in the SwiGLU pass
            h, de, dg, g_cat = lora_swiglu.lora_swiglu_backward(dy2 @ wd, e, g, xa, bg_.contiguous(),
                                                                bu_.contiguous(), sg, su, gd, ad_.contiguous())
        else:
            if _LOW_RANK_FIRST:  # the thin term written first (module docstring)
                dh = gd @ ad_
                dh.addmm_(dy2, wd)
            else:
                dh = dy2 @ wd
                dh.addmm_(gd, ad_)
            h, de, dg = swiglu_backward_inplace(dh, e, g)
        d_ad = _grad_mm(gd.t(), h, 1.0, dt_ad)
        del h
        dx, (d_ag, d_au), (d_bg, d_bu) = _fanout_backward(
            x2, xa, a_cat, (sg, su), (wg, wu), (bg_, bu_), (de, dg), ctx.needs_input_grad[0], (dt_ag, dt_au),
            (dt_bg, dt_bu), g_cat=g_cat
        )
        return (None if dx is None else dx.view_as(x), dy if ctx.needs_input_grad[1] else None, None,
                None, None, d_ag, d_bg, None, None, d_au, d_bu, None, None, d_ad, d_bd)


class _LoRASwiGLUMLPKConcat(_LoRASwiGLUMLP):
    """_LoRASwiGLUMLP with K-concatenated gate|up and down matmuls (_kconcat_forward); same inputs and backward,
    saved bytes unchanged (one [N, 2I] buffer instead of e and g)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, residual, scales, *params):
        return _mlp_op_forward(ctx, x, residual, scales, params, kconcat=True)


class _DoRALinear(torch.autograd.Function):
    """One DoRA projection. Inputs: x, scale, W, bias, A, B, magnitude m [o]."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, scale, weight, bias, a, b, magnitude):
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_, b_ = a.to(dt), b.to(dt)
        norm = torch.linalg.vector_norm(weight.float() + scale * (b.float() @ a.float()), dim=1)
        mns = (magnitude.float() / norm).to(dt)
        xa = x2 @ a_.t()
        base = x2 @ weight.t()
        # y in x's shape, written through its [N, o] view: not a view made here, so y += residual works (_output).
        y, y2 = _output(x.shape[:-1], weight.shape[0], x2)
        if bias is None:
            torch.addmm(base, xa, b_.t(), alpha=scale, out=y2).mul_(mns)
        else:
            torch.addcmul(bias, torch.addmm(base, xa, b_.t(), alpha=scale), mns, out=y2)
        ctx.scale = scale
        ctx.param_dtypes = (a.dtype, b.dtype, magnitude.dtype)
        ctx.save_for_backward(x, xa, base, norm, mns, weight, a_, b)
        return y

    @staticmethod
    @_backward_once
    @_autocast_off
    def backward(ctx, dy):
        x, xa, base, norm, mns, weight, a_, b = ctx.saved_tensors
        b_ = b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        # Z = base + s * XA B^T rebuilt in fp32 (base rounded once; the thin low-rank term recomputed exactly).
        z = torch.addmm(base.float(), xa.float(), b.float().t(), alpha=ctx.scale)
        d_m = (dy2.float() * z).sum(0) / norm
        del z
        dz = dy2 * mns
        dt_a, dt_b, dt_m = ctx.param_dtypes
        dx, (d_a,), (d_b,) = _fanout_backward(x2, xa, a_, (ctx.scale,), (weight,), (b_,), (dz,),
                                              ctx.needs_input_grad[0], (dt_a,), (dt_b,))
        return (None if dx is None else dx.view_as(x), None, None, None, d_a, d_b, d_m.to(dt_m))


def _check_projection(name, x, weight, bias, lora_a, lora_b, scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    # Checked by name: these failed further on with errors naming nothing ("not enough values to unpack" for a 1-D
    # weight, an IndexError for a 0-d x, "'NoneType' object has no attribute 'shape'", "could not convert string
    # to float").
    if x.dim() == 0:
        raise ValueError("x must have a feature dimension (its last), got a 0-d tensor")
    for field, t in (("weight", weight), ("lora_A", lora_a), ("lora_B", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {field} must be a 2-D tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {field} must be a 2-D tensor, got shape {tuple(t.shape)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: bias must be a tensor or None, got {type(bias).__name__}")
    try:
        float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: scale must be a number, got {scale!r}") from None
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"{name}: x has {x.shape[-1]} features but the weight takes {in_f}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast the model or x")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} should be ({out_f},)")
    # Checked here: the addmm that adds it otherwise failed with "self and mat2 must have the same dtype", naming
    # neither the bias nor the projection (a bf16 model keeping its biases in fp32).
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{name}: bias dtype {bias.dtype} differs from x dtype {x.dtype}; cast the model or x")
    r = lora_a.shape[0]
    if tuple(lora_a.shape) != (r, in_f) or tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"{name}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} should be "
                         f"({r}, {in_f}) / ({out_f}, {r})")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(f"{name}: the fused LoRA path needs a frozen base weight and bias (requires_grad=False)")


@torch.compiler.disable
def lora_projections(x: torch.Tensor, projections, *, kconcat: bool = False) -> tuple[torch.Tensor, ...]:
    """Outputs of several LoRA projections of the same `x`.

    `projections`: sequence of (weight [o, d], bias [o] or None, lora_A [r, d], lora_B [o, r], scale).
    Weights and biases are frozen (no gradient); A and B get gradients. `kconcat`: compute all outputs in one
    matmul [X | X A^T] @ W_ext^T (see _kconcat_forward); the outputs are then column views of one buffer (not to be
    modified in place, like torch.split's); the backward is the same.
    """
    if not projections:
        raise ValueError("projections must name at least one (weight, bias, lora_A, lora_B, scale)")
    for i, p in enumerate(projections):
        _check_projection(f"projections[{i}]", x, *p)
    scales = tuple(float(p[4]) for p in projections)
    cols = list(zip(*[p[:4] for p in projections]))
    op = _LoRAFanOutKConcat if kconcat else _LoRAFanOut
    return op.apply(x, scales, *cols[0], *cols[1], *cols[2], *cols[3])


@torch.compiler.disable
def lora_linear(x: torch.Tensor, weight, bias, lora_a, lora_b, scale: float, *, kconcat: bool = False
                ) -> torch.Tensor:
    """x @ weight^T + bias + scale * (x @ lora_a^T) @ lora_b^T with a frozen weight/bias."""
    return lora_projections(x, [(weight, bias, lora_a, lora_b, scale)], kconcat=kconcat)[0]


@torch.compiler.disable
def lora_swiglu_mlp(x: torch.Tensor, gate, up, down, *, kconcat: bool = False,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); gate, up, down are (weight, bias, lora_A, lora_B, scale) tuples. `kconcat`:
    gate|up as one K-concatenated matmul into one [N, 2I] buffer, down as another (see _kconcat_forward).
    `residual`: returns residual + the MLP, added inside down's matmul when it has the output's shape and dtype."""
    for name, p in (("gate", gate), ("up", up)):
        _check_projection(name, x, *p)
    if gate[0].shape != up[0].shape:
        raise ValueError(f"gate weight {tuple(gate[0].shape)} and up weight {tuple(up[0].shape)} must have one shape")
    _check_projection("down", x.new_empty(0, gate[0].shape[0]), *down)
    scales = (float(gate[4]), float(up[4]), float(down[4]))
    op = _LoRASwiGLUMLPKConcat if kconcat else _LoRASwiGLUMLP
    if residual is None or fits_output(residual, x, down[0].shape[0]):
        return op.apply(x, residual, scales, *gate[:4], *up[:4], *down[:4])
    return residual + op.apply(x, None, scales, *gate[:4], *up[:4], *down[:4])  # the sum `r + mlp(x)` forms


@torch.compiler.disable
def dora_linear(x: torch.Tensor, weight, bias, lora_a, lora_b, scale: float, magnitude) -> torch.Tensor:
    """bias + m / ||weight + scale * lora_b @ lora_a||_row * (x @ weight^T + scale * x @ lora_a^T @ lora_b^T),
    m = magnitude [out], the norm taken per output row and held constant in the backward (as PEFT does)."""
    _check_projection("dora", x, weight, bias, lora_a, lora_b, scale)
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a tensor of shape ({weight.shape[0]},), got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude shape {tuple(magnitude.shape)} should be ({weight.shape[0]},)")
    return _DoRALinear.apply(x, float(scale), weight, bias, lora_a, lora_b, magnitude)
