"""Patched MLP forward for the `swiglu` flag: down(silu(gate(x)) * up(x)) with the activation and the
product in one kernel (the projections stay module calls, so LoRA-wrapped linears keep working)."""

from __future__ import annotations

from .dispatch import kernels_usable

SILU_NAMES = ("silu", "swish")


def swiglu_mlp_forward(self, x):
    gate = self.gate_proj(x)
    up = self.up_proj(x)
    if kernels_usable(gate):
        from chronicals.kernels import fused_swiglu

        return self.down_proj(fused_swiglu(gate, up))
    return self.down_proj(self.act_fn(gate) * up)
