"""Patched MLP forward for the `swiglu` flag: down(silu(gate(x)) * up(x)).

When gate/up/down are plain bias-free nn.Linear layers of one dtype and device, the whole MLP is one fused op
(chronicals.kernels.swiglu_mlp): gate and up in one matmul, and the activation recomputed in the backward
instead of saved. Otherwise (LoRA-wrapped PEFT layers, biases) the projections stay module calls and only
silu(gate) * up is one kernel."""

from __future__ import annotations

import torch

from .dispatch import kernels_usable
from .projections import plain_linear

SILU_NAMES = ("silu", "swish")


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


def swiglu_mlp_forward(self, x):
    if kernels_usable(x):
        weights = _plain_weights(self, x)
        if weights is not None:
            from chronicals.kernels.swiglu_mlp import fused_swiglu_mlp

            return fused_swiglu_mlp(x, *weights)
    gate = self.gate_proj(x)
    up = self.up_proj(x)
    if kernels_usable(gate):
        from chronicals.kernels import fused_swiglu

        return self.down_proj(fused_swiglu(gate, up))
    return self.down_proj(self.act_fn(gate) * up)
