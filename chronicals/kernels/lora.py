"""Fused LoRA: the frozen base path and the low-rank path of one or several projections in one autograd op.

For projections i = 1..n of the same input X [N, d] (q/k/v, or gate/up), with frozen W_i [o_i, d], adapters
A_i [r_i, d], B_i [o_i, r_i] and scales s_i:

    XA    = X @ cat(A_1..A_n)^T                      one pass over X for all adapters  [N, R]
    Y_i   = X @ W_i^T + s_i * XA_i @ B_i^T           the low-rank term is added in place (addmm)

Backward, given dY_i:

    G_i   = s_i * dY_i @ B_i                         [N, r_i]
    dB_i  = s_i * dY_i^T @ XA_i
    dA    = cat(G_1..G_n)^T @ X                      one pass over X for all adapters
    dX    = sum_i dY_i @ W_i + cat(G) @ cat(A)

Only X and the thin XA [N, R] are saved, never the outputs. The SwiGLU MLP adds, with e, g the gate/up
outputs, h = silu(e) * g and Y = h @ W_d^T + s_d * (h @ A_d^T) @ B_d^T: it saves X, e, g and h @ A_d^T (not h,
silu(e) or the product, which PEFT's eager path keeps), and its backward recomputes h in the same Triton pass
that forms de and dg, writing h, de, dg over dh, e, g so no new [N, I] buffers are allocated:

    sig = sigmoid(e),  h = e * sig * g,  dg = dh * e * sig,  de = dh * g * sig * (1 + e * (1 - sig))

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
import triton
import triton.language as tl

from ._utils import INTERPRET

_BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = e * tl.sigmoid(e) * g
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_inplace_kernel(dh_ptr, e_ptr, g_ptr, n, BLOCK: tl.constexpr):
    # Reads dh, e, g; writes h over dh, de over e, dg over g (all three loaded before any store).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(e)
    silu = e * sig
    h = silu * g
    dg = dh * silu
    de = dh * g * sig * (1.0 + e * (1.0 - sig))
    tl.store(dh_ptr + offs, h.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(e_ptr + offs, de.to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offs, dg.to(g_ptr.dtype.element_ty), mask=mask)


def _autocast_off(method):
    """Run a forward/backward with autocast off: its dtypes are chosen explicitly (fp32 where it says so)."""
    @functools.wraps(method)
    def wrapper(ctx, first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *args)

    return wrapper


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET


def _check_swiglu(**tensors) -> None:
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with the shape and dtype of the others "
                             f"(got {tuple(t.shape)} {t.dtype}, contiguous={t.is_contiguous()})")


# Public entry points are opaque to torch.compile (torch.compiler.disable): a compiled region breaks its graph
# around them and runs them eagerly, autograd Function and Triton launches included (dynamo cannot trace the
# autotuned launches, nor the interpreter's).
@torch.compiler.disable
def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """silu(e) * g, computed in fp32 and stored in e's dtype; e and g contiguous, same shape."""
    _check_swiglu(e=e, g=g)
    if not _use_triton(e):
        return (torch.nn.functional.silu(e.float()) * g.float()).to(e.dtype)
    h = torch.empty_like(e)
    n = e.numel()
    _swiglu_forward_kernel[(triton.cdiv(n, _BLOCK),)](e, g, h, n, BLOCK=_BLOCK)
    return h


@torch.compiler.disable
def swiglu_backward_inplace(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor):
    """Overwrite dh with h, e with de and g with dg; returns (h, de, dg) as those same buffers."""
    _check_swiglu(dh=dh, e=e, g=g)
    if not _use_triton(e):
        # .float() of an fp32 tensor is that tensor itself: every result is formed before any buffer is written.
        ef, gf, dhf = e.float(), g.float(), dh.float()
        sig = torch.sigmoid(ef)
        silu = ef * sig
        h, dg, de = silu * gf, dhf * silu, dhf * gf * sig * (1.0 + ef * (1.0 - sig))
        dh.copy_(h)
        g.copy_(dg)
        e.copy_(de)
        return dh, e, g
    n = e.numel()
    _swiglu_backward_inplace_kernel[(triton.cdiv(n, _BLOCK),)](dh, e, g, n, BLOCK=_BLOCK)
    return dh, e, g


def _base(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())


@functools.cache
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), device=device, dtype=dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s * (a @ b) rounded once (a separate mul_ would round the product a second time). The ignored beta=0 input
    is one cached zero, not a fill kernel per call (224 of them per Llama-3.2-1B step)."""
    return torch.addmm(_zero(a.device, a.dtype), a, b, beta=0, alpha=s)


def _fanout_forward(x2, scales, weights, biases, a_list, b_list):
    """Y_i = X W_i^T + s_i (X A^T)_i B_i^T for every projection; returns (outputs, XA, cat(A))."""
    a_cat = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    xa = x2 @ a_cat.t()
    outs, off = [], 0
    for s, w, bias, a, b in zip(scales, weights, biases, a_list, b_list):
        r = a.shape[0]
        y = _base(x2, w, bias)
        y.addmm_(xa[:, off:off + r], b.t(), alpha=s)
        outs.append(y)
        off += r
    return outs, xa, a_cat


def _fanout_backward(x2, xa, a_cat, scales, weights, b_list, dys, need_dx: bool):
    """Gradients (dX or None, [dA_i], [dB_i]) of the fan-out for output gradients dys ([N, o_i] each)."""
    gs, d_b, off = [], [], 0
    for s, b, dy in zip(scales, b_list, dys):
        r = b.shape[1]
        gs.append(_scaled_mm(dy, b, s))
        d_b.append(_scaled_mm(dy.t(), xa[:, off:off + r], s))
        off += r
    g_cat = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)
    d_a = torch.split(g_cat.t() @ x2, [b.shape[1] for b in b_list])
    dx = None
    if need_dx:
        dx = dys[0] @ weights[0]
        for w, dy in zip(weights[1:], dys[1:]):
            dx.addmm_(dy, w)
        dx.addmm_(g_cat, a_cat)
    return dx, list(d_a), d_b


class _LoRAFanOut(torch.autograd.Function):
    """n LoRA projections of one input. Inputs: x, scales, then W_1..n, bias_1..n, A_1..n, B_1..n."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, scales, *params):
        n = len(scales)
        weights, biases = params[:n], params[n:2 * n]
        a_params, b_params = params[2 * n:3 * n], params[3 * n:]
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_list = [a.to(dt) for a in a_params]
        b_list = [b.to(dt) for b in b_params]
        outs, xa, a_cat = _fanout_forward(x2, scales, weights, biases, a_list, b_list)
        ctx.scales = scales
        ctx.param_dtypes = [p.dtype for p in (*a_params, *b_params)]
        ctx.save_for_backward(x, xa, a_cat, *weights, *b_list)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    @_autocast_off
    def backward(ctx, *dys):
        n = len(ctx.scales)
        x, xa, a_cat, *rest = ctx.saved_tensors
        weights, b_list = rest[:n], rest[n:]
        x2 = x.reshape(-1, x.shape[-1])
        dys2 = [dy.reshape(-1, dy.shape[-1]).to(x.dtype) for dy in dys]
        dx, d_a, d_b = _fanout_backward(x2, xa, a_cat, ctx.scales, weights, b_list, dys2, ctx.needs_input_grad[0])
        grads = [g.to(dt) for g, dt in zip(d_a + d_b, ctx.param_dtypes)]
        return (None if dx is None else dx.view_as(x), None, *([None] * (2 * n)), *grads)


class _LoRASwiGLUMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with LoRA on all three. Inputs: x, (s_g, s_u, s_d), then for gate, up,
    down in turn: W, bias, A, B."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, scales, wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d):
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        ag_, bg_, au_, bu_, ad_, bd_ = (t.to(dt) for t in (ag, b_g, au, b_u, ad, b_d))
        (e, g), xa, a_cat = _fanout_forward(x2, scales[:2], (wg, wu), (bg, bu), (ag_, au_), (bg_, bu_))
        h = swiglu_forward(e, g)
        ha = h @ ad_.t()
        y = _base(h, wd, bd)
        y.addmm_(ha, bd_.t(), alpha=scales[2])
        ctx.scales = scales
        ctx.param_dtypes = [p.dtype for p in (ag, au, b_g, b_u, ad, b_d)]
        ctx.save_for_backward(x, e, g, xa, a_cat, ha, ad_, wg, wu, wd, bg_, bu_, bd_)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the fused LoRA MLP backward overwrites its saved activations, so it runs once per "
                               "forward (no retain_graph double backward); use LoRAConfig(fused=False) for that")
        ctx.consumed = True
        x, e, g, xa, a_cat, ha, ad_, wg, wu, wd, bg_, bu_, bd_ = ctx.saved_tensors
        sg, su, sd = ctx.scales
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        gd = _scaled_mm(dy2, bd_, sd)
        d_bd = _scaled_mm(dy2.t(), ha, sd)
        dh = dy2 @ wd
        dh.addmm_(gd, ad_)
        h, de, dg = swiglu_backward_inplace(dh, e, g)
        d_ad = gd.t() @ h
        del h, dh
        dx, (d_ag, d_au), (d_bg, d_bu) = _fanout_backward(
            x2, xa, a_cat, (sg, su), (wg, wu), (bg_, bu_), (de, dg), ctx.needs_input_grad[0]
        )
        grads = [t.to(dt) for t, dt in zip((d_ag, d_au, d_bg, d_bu, d_ad, d_bd), ctx.param_dtypes)]
        d_ag, d_au, d_bg, d_bu, d_ad, d_bd = grads
        return (None if dx is None else dx.view_as(x), None,
                None, None, d_ag, d_bg, None, None, d_au, d_bu, None, None, d_ad, d_bd)


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
        z = torch.addmm(base, xa, b_.t(), alpha=scale)
        y = z.mul_(mns) if bias is None else torch.addcmul(bias, z, mns)
        ctx.scale = scale
        ctx.param_dtypes = (a.dtype, b.dtype, magnitude.dtype)
        ctx.save_for_backward(x, xa, base, norm, mns, weight, a_, b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
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
        dx, (d_a,), (d_b,) = _fanout_backward(x2, xa, a_, (ctx.scale,), (weight,), (b_,), (dz,),
                                              ctx.needs_input_grad[0])
        grads = [t.to(dt) for t, dt in zip((d_a, d_b, d_m), ctx.param_dtypes)]
        return (None if dx is None else dx.view_as(x), None, None, None, *grads)


def _check_projection(name, x, weight, bias, lora_a, lora_b, scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"{name}: x has {x.shape[-1]} features but the weight takes {in_f}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} differs from x dtype {x.dtype}; cast the model or x")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} should be ({out_f},)")
    r = lora_a.shape[0]
    if tuple(lora_a.shape) != (r, in_f) or tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"{name}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} should be "
                         f"({r}, {in_f}) / ({out_f}, {r})")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(f"{name}: the fused LoRA path needs a frozen base weight and bias (requires_grad=False)")


@torch.compiler.disable
def lora_projections(x: torch.Tensor, projections) -> tuple[torch.Tensor, ...]:
    """Outputs of several LoRA projections of the same `x`.

    `projections`: sequence of (weight [o, d], bias [o] or None, lora_A [r, d], lora_B [o, r], scale).
    Weights and biases are frozen (no gradient); A and B get gradients.
    """
    if not projections:
        raise ValueError("projections must name at least one (weight, bias, lora_A, lora_B, scale)")
    for i, p in enumerate(projections):
        _check_projection(f"projections[{i}]", x, *p)
    scales = tuple(float(p[4]) for p in projections)
    cols = list(zip(*[p[:4] for p in projections]))
    return _LoRAFanOut.apply(x, scales, *cols[0], *cols[1], *cols[2], *cols[3])


@torch.compiler.disable
def lora_linear(x: torch.Tensor, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """x @ weight^T + bias + scale * (x @ lora_a^T) @ lora_b^T with a frozen weight/bias."""
    return lora_projections(x, [(weight, bias, lora_a, lora_b, scale)])[0]


@torch.compiler.disable
def lora_swiglu_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); gate, up, down are (weight, bias, lora_A, lora_B, scale) tuples."""
    for name, p in (("gate", gate), ("up", up)):
        _check_projection(name, x, *p)
    if gate[0].shape != up[0].shape:
        raise ValueError(f"gate weight {tuple(gate[0].shape)} and up weight {tuple(up[0].shape)} must have one shape")
    _check_projection("down", x.new_empty(0, gate[0].shape[0]), *down)
    scales = (float(gate[4]), float(up[4]), float(down[4]))
    return _LoRASwiGLUMLP.apply(x, scales, *gate[:4], *up[:4], *down[:4])


@torch.compiler.disable
def dora_linear(x: torch.Tensor, weight, bias, lora_a, lora_b, scale: float, magnitude) -> torch.Tensor:
    """bias + m / ||weight + scale * lora_b @ lora_a||_row * (x @ weight^T + scale * x @ lora_a^T @ lora_b^T),
    m = magnitude [out], the norm taken per output row and held constant in the backward (as PEFT does)."""
    _check_projection("dora", x, weight, bias, lora_a, lora_b, scale)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude shape {tuple(magnitude.shape)} should be ({weight.shape[0]},)")
    return _DoRALinear.apply(x, float(scale), weight, bias, lora_a, lora_b, magnitude)
