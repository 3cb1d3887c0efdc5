"""Patched MLP forward for the `swiglu` flag: down(silu(gate(x)) * up(x)).

When gate/up/down are plain bias-free nn.Linear layers of one dtype and device, the whole MLP is one fused op
(chronicals.kernels.swiglu_mlp): gate and up in one matmul, and the activation recomputed in the backward
instead of saved. Otherwise (LoRA-wrapped PEFT layers, biases, hooks) the projections stay module calls and only
silu(gate) * up is one kernel. Both compute silu in place of calling `act_fn`, so they run only while act_fn is
HF's own SiLU module without hooks or a replaced forward; a hooked or replaced act_fn (a user's forward hook or
pre-hook, a wrapper module, accelerate's hook) makes the MLP HF's module calls, act_fn(gate_proj(x)) * up_proj(x)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations

from .dispatch import kernels_usable
from .projections import no_hooks, plain_linear

SILU_NAMES = ("silu", "swish")
# The modules transformers' ACT2FN gives for those names (SiLUActivation for "silu" in transformers 5, nn.SiLU
# before it and for "swish").
SILU_MODULES = (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))


def plain_silu(act) -> bool:
    """`act` is transformers' or torch's SiLU module with no hooks and no replaced forward, so silu may be computed
    in its place. By the module's own class: an MLP or layer whose class FSDP2 swapped still passes."""
    return type(act) in SILU_MODULES and "forward" not in vars(act) and no_hooks(act)


def _plain_weights(mlp, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(W_gate, W_up, W_down) when the three projections are plain bias-free nn.Linear (no LoRA wrapper, hooks
    or replaced forward: those stay module calls) on x's device, in one dtype that is x's (or any, under
    autocast, which casts them all); else None."""
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(plain_linear(m) and m.bias is None for m in layers):
        return None
    weights = tuple(m.weight for m in layers)
    dtype = weights[0].dtype
    if any(w.dtype != dtype or w.device != x.device for w in weights):
        return None
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return None
    return weights


def swiglu_mlp_forward(self, x, residual=None):
    """HF's MLP forward; with `residual` (the patched decoder layer passes it, see rms_norm.mlp_with_residual),
    residual + mlp(x), the sum formed inside the fused op's last matmul where it runs."""
    silu = plain_silu(self.act_fn)
    if silu and kernels_usable(x):
        weights = _plain_weights(self, x)
        if weights is not None:
            from chronicals.kernels.swiglu_mlp import fused_swiglu_mlp

            return fused_swiglu_mlp(x, *weights) if residual is None else fused_swiglu_mlp(x, *weights, residual)
    out = _module_calls(self, x, silu)
    return out if residual is None else residual + out


swiglu_mlp_forward.adds_residual = True


def _module_calls(mlp, x, silu: bool):
    gate = mlp.gate_proj(x)
    if not silu:  # a hooked or replaced act_fn: HF's forward, module calls in HF's order
        return mlp.down_proj(mlp.act_fn(gate) * mlp.up_proj(x))
    up = mlp.up_proj(x)
    if kernels_usable(gate):
        from chronicals.kernels import fused_swiglu

        return mlp.down_proj(fused_swiglu(gate, up))
    return mlp.down_proj(mlp.act_fn(gate) * up)
