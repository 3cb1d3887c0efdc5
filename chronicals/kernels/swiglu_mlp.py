"""The whole SwiGLU MLP, down(silu(gate(x)) * up(x)) without biases, as one autograd op that does not keep
the activation h = silu(g) * u for the backward.

With x [N, d], W_gate, W_up [I, d], W_down [d_out, I] and W_gu = cat(W_gate, W_up) [2I, d]:

    forward:   gu = x @ W_guᵀ                  one matmul, [N, 2I]; g = gu[:, :I], u = gu[:, I:] are views
               h  = silu(g) * u                Triton, reading the strided halves of gu (no copy)
               y  = h @ W_downᵀ (+ residual: cuBLAS adds it in its epilogue, beta = 1, where a separate
                    residual + y after the op reads two [N, d_out] tensors and writes a third)
               saves x, gu and the weights: not h (the unfused path also keeps h for dW_down: N·I more)
    backward:  dh = dy @ W_down                [N, I]
               one Triton pass reads g, u, dh and writes dg, du into dgu [N, 2I] (halves as views) and
               h = silu(g) * u over dh (its last use is that read)
               dW_down = dyᵀ @ h
               dW_gu   = dguᵀ @ x              one matmul; dW_gate, dW_up are its row halves
               dx      = dgu @ W_gu            one matmul: the gate and up terms summed inside it

Matmuls run in the input dtype (cuBLAS accumulates in fp32 inside and rounds once), the elementwise math in
fp32. A frozen weight (requires_grad False) skips its gradient matmul. W_gu is rebuilt by the backward
(2·I·d elements, transient) rather than saved, so no weight copy outlives the step and weights gathered
per block by FSDP2 are read where they are, as F.linear reads them.
"""

from __future__ import annotations

import torch

from ._utils import autocast_inputs, backward_once, check_same, check_tensor, fits_output
from .swiglu import swiglu_backward, swiglu_forward


class SwiGLUMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, residual):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are the caller's (cast before, under autocast)
            inter, d_out = w_gate.shape[0], w_down.shape[0]
            x2 = x.reshape(-1, x.shape[-1])
            gu = x2 @ torch.cat((w_gate, w_up)).t()
            h = swiglu_forward(gu[:, :inter], gu[:, inter:])
            # y is allocated in x's leading shape and the matmul writes its [N, d_out] view: returning a view of a
            # [N, d_out] product would hand out a view made inside the Function, which autograd refuses to let the
            # caller change in place (y += residual raised a RuntimeError, where the unfused MLP's output allows it).
            y = torch.empty((*x.shape[:-1], d_out), dtype=h.dtype, device=h.device)
            if residual is None:
                torch.mm(h, w_down.t(), out=y.view(-1, d_out))
            else:
                torch.addmm(residual.reshape(-1, d_out), h, w_down.t(), out=y.view(-1, d_out))
        ctx.save_for_backward(x2, gu, w_gate, w_up, w_down)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @backward_once
    def backward(ctx, dy):
        x2, gu, w_gate, w_up, w_down = ctx.saved_tensors
        need_x, need_gate, need_up, need_down, need_residual = ctx.needs_input_grad
        dx = d_gate = d_up = d_down = None
        inter = w_gate.shape[0]
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            dh = dy2 @ w_down
            dgu = torch.empty_like(gu)
            dg, du = dgu[:, :inter], dgu[:, inter:]
            swiglu_backward(dh, gu[:, :inter], gu[:, inter:], da=dg, db=du, c=dh if need_down else None)
            if need_down:
                d_down = dy2.t() @ dh  # dh now holds h
            del dh
            if need_gate and need_up:
                d_gu = dgu.t() @ x2
                d_gate, d_up = d_gu[:inter], d_gu[inter:]
            elif need_gate:
                d_gate = dg.t() @ x2
            elif need_up:
                d_up = du.t() @ x2
            if need_x:
                dx = (dgu @ torch.cat((w_gate, w_up))).view(ctx.x_shape)
        return dx, d_gate, d_up, d_down, dy if need_residual else None


# Opaque to torch.compile, as every public kernel op: a compiled region breaks its graph around it.
@torch.compiler.disable
def fused_swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """(silu(x @ w_gateᵀ) * (x @ w_upᵀ)) @ w_downᵀ for x [..., d], w_gate and w_up [I, d], w_down [d_out, I];
    plus `residual` when given (a pre-norm layer's `residual + mlp(x)`), added inside the last matmul when it has
    the output's shape and dtype, else as that sum.

    Under autocast, x and the weights are cast to the autocast dtype first, as autocast's own linear would
    (the casts stay on the autograd graph, so fp32 master weights still get their gradients)."""
    x, w_gate, w_up, w_down = autocast_inputs(x, w_gate, w_up, w_down)  # a tensor autocast would not cast is refused
    check_tensor("x", x)
    check_tensor("w_gate", w_gate, ndim=2)
    check_tensor("w_up", w_up, ndim=2)
    check_tensor("w_down", w_down, ndim=2)
    check_same({"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    if x.ndim == 0 or w_gate.shape[1] != x.shape[-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but w_gate {tuple(w_gate.shape)} takes {w_gate.shape[1]} "
                         "features in its last dimension")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up has shape {tuple(w_up.shape)} but w_gate has {tuple(w_gate.shape)}; they must match")
    if w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"w_down has shape {tuple(w_down.shape)} but must take the {w_gate.shape[0]} intermediate "
                         "features of w_gate")
    if residual is None or fits_output(residual, x, w_down.shape[0]):
        return SwiGLUMLPFunction.apply(x, w_gate, w_up, w_down, residual)
    return residual + SwiGLUMLPFunction.apply(x, w_gate, w_up, w_down, None)  # the sum the caller's `r + mlp(x)` forms
