"""The q, k and v projections of an attention module as one matmul.

HF runs three `nn.Linear` calls on the same hidden states. With the weights concatenated, [Wq; Wk; Wv], the
forward is one GEMM, and so is the backward: one dx matmul (autograd would otherwise add three dx contributions),
one weight-gradient matmul (k and v alone are thin GEMMs, [Hkv*D, N] @ [N, d], that run as slow split-K kernels)
and one bias reduction (Qwen2's q/k/v biases). The output is split into views of one [..., (Hq + 2 Hkv) D] tensor
(no copy); their gradients are joined by one `cat` in the split's backward. The concatenated weight is rebuilt
each forward (a copy of the q/k/v weights, small next to the activations) so the gradients reach the three
parameters through `cat`'s backward (views of one gradient), fp32 master weights under autocast included.

Only plain `torch.nn.Linear` modules are fused: a LoRA layer (PEFT), a quantised linear or a module with hooks
or a replaced forward (DeepSpeed ZeRO-3, accelerate offloading) is called as a module, as HF does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_linear(module) -> bool:
    """A bare `nn.Linear` (no subclass, hooks or replaced forward) whose weight may be read and used directly."""
    return (type(module) is nn.Linear and "forward" not in vars(module)
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks))


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
    weight = torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])
    bias = None if q_proj.bias is None else torch.cat([q_proj.bias, k_proj.bias, v_proj.bias])
    qkv = F.linear(hidden_states, weight, bias)
    sizes = [q_proj.weight.shape[0], k_proj.weight.shape[0], v_proj.weight.shape[0]]
    return qkv.split(sizes, dim=-1)
