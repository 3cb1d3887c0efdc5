"""Patched forwards for the `rms_norm` flag: every RMSNorm (Qwen3's per-head q/k norms included), and the
decoder layer with its residual adds fused into its kernels (the post-attention norm, the MLP's last matmul, the
input norm's backward).

HF's RMSNorm: y = w * (x / sqrt(mean(x^2) + eps)) with the statistics in fp32 and the normalised value cast
back to the input dtype before the weight multiply; the kernels follow the same casting (docs/CONTRACTS.md).
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as nn_module

from .dispatch import kernels_usable
from .projections import no_hooks


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm math, used where the kernels cannot run."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if kernels_usable(hidden_states):
        from chronicals.kernels import fused_rmsnorm

        return fused_rmsnorm(hidden_states, self.weight, self.variance_epsilon)
    return rms_norm_reference(hidden_states, self.weight, self.variance_epsilon)


def decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                          use_cache=False, position_embeddings=None, **kwargs):
    """HF's pre-norm decoder layer with `residual + attn_out` and the post-attention RMSNorm in one kernel, the
    layer's last residual add inside the MLP's last matmul (where the MLP is a patched one), and the residual
    stream's gradient added inside the input norm's backward kernel. Each of those adds was a separate pass over
    [N, H] (read two tensors, write one): two per layer, ~2 ms of a 190 ms Llama-3.2-1B LoRA step on an H100."""
    residual = hidden_states
    norm = self.input_layernorm
    if kernels_usable(hidden_states) and _plain_rms_norm(norm):
        from chronicals.kernels import fused_rmsnorm_residual

        residual, hidden_states = fused_rmsnorm_residual(hidden_states, norm.weight, norm.variance_epsilon)
    else:
        hidden_states = norm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = self.post_attention_layernorm
    if kernels_usable(hidden_states) and _plain_rms_norm(norm):
        from chronicals.kernels import fused_add_rmsnorm

        # summed = attn_out + residual becomes the next residual; normed = RMSNorm(summed) feeds the MLP.
        # Under autocast with fp32 weights the residual stream is fp32 while attn_out is bf16: HF's `residual +
        # attn_out` promotes to fp32, so the kernel gets attn_out in the residual's dtype to compute the same thing.
        residual, hidden_states = fused_add_rmsnorm(hidden_states.to(residual.dtype), residual, norm.weight,
                                                    norm.variance_epsilon)
    else:
        residual = residual + hidden_states
        hidden_states = norm(residual)
    return mlp_with_residual(self.mlp, hidden_states, residual)


def mlp_with_residual(mlp, x, residual):
    """residual + mlp(x). A patched MLP forward that takes the residual (marked `adds_residual`: chronicals'
    SwiGLU MLP, the fused LoRA MLP) is handed it, to add inside its last matmul (cuBLAS's epilogue, beta = 1), when
    the call goes through no hooks that would see its output, which then includes the residual."""
    forward = vars(mlp).get("forward")
    if getattr(getattr(forward, "func", None), "adds_residual", False) and no_hooks(mlp) and not _global_hooks():
        return mlp(x, residual=residual)
    return residual + mlp(x)


def _global_hooks() -> bool:
    """Forward hooks registered for every module (torch.nn.modules.module.register_module_forward_hook)."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _plain_rms_norm(norm) -> bool:
    """Whether the post-attention norm is the family's own RMSNorm, read directly (weight, eps) by the fused add +
    norm: no hooks, no forward other than HF's or ours. A wrapped or hooked norm (PEFT's LN tuning, a user's hook,
    DeepSpeed ZeRO-3 / accelerate offloading) is called as a module instead, as HF calls it."""
    # By the norm's class alone, not the layer's: FSDP2 swaps a sharded layer's class for one defined in torch.
    cls = type(norm)
    forward = vars(norm).get("forward")
    return (cls.__module__.startswith("transformers.models.") and cls.__name__.endswith("RMSNorm")
            and (forward is None or getattr(forward, "func", None) is rms_norm_forward) and no_hooks(norm))
