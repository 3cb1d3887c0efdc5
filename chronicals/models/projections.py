"""The q, k and v projections of an attention module as one matmul.

HF runs three `nn.Linear` calls on the same hidden states. With the weights concatenated, [Wq; Wk; Wv], the
forward is one GEMM, and so is the backward: one dx matmul (autograd would otherwise add three dx contributions),
one weight-gradient matmul (k and v alone are thin GEMMs, [Hkv*D, N] @ [N, d], that run as slow split-K kernels)
and one bias reduction (Qwen2's q/k/v biases). The output is split into views of one [..., (Hq + 2 Hkv) D] tensor
(no copy); their gradients are joined by one `cat` in the split's backward. The concatenated weight [Wq; Wk; Wv]
is a copy of the three weights, built by the forward and again by the backward, and never saved: the op saves the
input and the three weights themselves (as nn.Linear saves its weight), and the three weight gradients are views
of one [(Hq + 2 Hkv) D, d] gradient. (F.linear on the concatenated weight saved that copy, which stayed alive from
each layer's forward to its backward: (Hq + 2 Hkv) D * d elements per layer, e.g. Llama-3.2-1B bf16 12 MiB per
layer, 192 MiB over its 16 layers; Qwen3-0.6B 224 MiB; Llama-3-8B 1.5 GiB, whatever the batch.) Under autocast the
input, weights and biases are cast to autocast's dtype first, as autocast's linear casts them (fp32 master weights
still get their gradients through the casts).

Only plain `torch.nn.Linear` modules are fused: a LoRA layer (PEFT), a quantised linear or a module with hooks
or a replaced forward (DeepSpeed ZeRO-3, accelerate offloading) is called as a module, as HF does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def no_hooks(module) -> bool:
    """No forward or backward hooks on `module` (global module hooks apply to every call alike)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def plain_linear(module) -> bool:
    """A bare `nn.Linear` (no subclass, hooks or replaced forward) whose weight may be read and used directly."""
    return type(module) is nn.Linear and "forward" not in vars(module) and no_hooks(module)


def qkv_fusable(attention: nn.Module) -> bool:
    """Whether `attention`'s q_proj, k_proj and v_proj can run as one matmul: all plain `nn.Linear`s without
    hooks, weights of one dtype and device, and biases on all three (of the weights' dtype) or on none."""
    projs = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if not all(plain_linear(p) for p in projs):
        return False
    weight = projs[0].weight
    if any(p.weight.dtype != weight.dtype or p.weight.device != weight.device
           or p.weight.shape[1] != weight.shape[1] for p in projs):
        return False
    biases = [p.bias for p in projs]
    if all(b is None for b in biases):
        return True
    return all(b is not None and b.dtype == weight.dtype and b.device == weight.device for b in biases)


def qkv_projections(attention: nn.Module, hidden_states: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_proj(x), k_proj(x), v_proj(x)): one fused matmul split into views when `qkv_fusable`, else the
    three module calls. The views share one [..., q_out + k_out + v_out] tensor, so their rows are strided."""
    q_proj, k_proj, v_proj = attention.q_proj, attention.k_proj, attention.v_proj
    if not qkv_fusable(attention):
        return q_proj(hidden_states), k_proj(hidden_states), v_proj(hidden_states)
    tensors = (hidden_states, q_proj.weight, k_proj.weight, v_proj.weight, q_proj.bias, k_proj.bias, v_proj.bias)
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):  # autocast's linear casts its floating inputs (not float64) likewise
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                        for t in tensors)
    x, w_q, w_k, w_v, *biases = tensors
    bias = None if biases[0] is None else torch.cat(biases)  # not saved: the bias gradient is a sum of dy
    qkv = _QKVLinear.apply(x, w_q, w_k, w_v, bias)
    return qkv.split([w_q.shape[0], w_k.shape[0], w_v.shape[0]], dim=-1)


class _QKVLinear(torch.autograd.Function):
    """x @ [Wq; Wk; Wv]^T + bias as one matmul, saving x and the three weights (not their concatenation). The
    backward is F.linear's (dx = dy @ W, dW = dy^T x, db = sum dy) in plain torch ops, so it is differentiable
    again (create_graph)."""

    @staticmethod
    def forward(ctx, x, w_q, w_k, w_v, bias):
        with torch.autocast(x.device.type, enabled=False):  # inputs already in the dtype autocast would pick
            out = F.linear(x, torch.cat((w_q, w_k, w_v)), bias)
        ctx.save_for_backward(x, w_q, w_k, w_v)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_k, w_v = ctx.saved_tensors
        need_x, *need_w, need_bias = ctx.needs_input_grad
        dx = db = None
        d_w = [None] * 3
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            if need_x:
                dx = dy @ torch.cat((w_q, w_k, w_v))  # the concatenated weight rebuilt, freed on return
            if any(need_w):
                d_all = dy2.t() @ x.reshape(-1, x.shape[-1])
                d_w = [g if need else None for g, need in
                       zip(d_all.split([w_q.shape[0], w_k.shape[0], w_v.shape[0]]), need_w)]
            if need_bias:
                db = _column_sums(dy2)
        return dx, *d_w, db


def _column_sums(dy2: torch.Tensor) -> torch.Tensor:
    """dy2.sum(0), the bias gradient. In bf16 on CUDA as a matrix-vector product with ones (cuBLAS, fp32
    accumulation), which reads dy2 at nearly copy bandwidth where the column reduction does not: H100, [16384, 1152]
    (Qwen2.5-0.5B's q/k/v), 25.2 us against 41.0, the same largest error against a float64 sum (0.999, one bf16 step
    of a sum near 128); 21.8 against 37.5 at 896 columns, 59.5 against 69.6 at 4096. Other dtypes keep the sum."""
    if dy2.is_cuda and dy2.dtype == torch.bfloat16:
        return torch.mv(dy2.t(), dy2.new_ones(dy2.shape[0]))
    return dy2.sum(0)
