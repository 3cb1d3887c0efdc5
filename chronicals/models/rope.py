"""Patched attention forward for the `rope` flag: HF's attention with the rotary embedding of q and k
in one kernel (`fused_qk_rope`) instead of four elementwise passes each.

Generic over the supported families: Qwen3's per-head `q_norm`/`k_norm` (applied before RoPE) and the
`sliding_window` of Qwen2/Mistral are read from the module. The q, k and v projections run as one matmul
when they are plain linears (chronicals.models.projections; LoRA-wrapped ones stay module calls). Everything
else (KV cache, the attention implementation chosen in the config) is exactly HF's.
"""

from __future__ import annotations

import sys

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .dispatch import kernels_usable
from .projections import qkv_projections
from .registry import family_for


def rope_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                           past_key_values=None, **kwargs):
    modeling = sys.modules[type(self).__module__]  # the family's own helpers: eager attention, reference RoPE
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    # One matmul for q, k and v where they are plain linears (views of its output), else the three module calls.
    query, key, value = (t.view(hidden_shape) for t in qkv_projections(self, hidden_states))
    # v on its own: attention saves v for its backward, and a view would keep the whole q/k/v output alive
    # (q and k are consumed here: the RoPE kernel saves neither, Qwen3's norms save their own copies). Copying v
    # frees (Hq + Hkv) * D per token per layer: at Qwen3-0.6B's shape, batch 8 x 2048, 2.6 GiB of peak.
    value = value.contiguous()
    if hasattr(self, "q_norm"):  # Qwen3 normalises each head before the rotation
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    cos, sin = position_embeddings
    if cos.shape[-1] != self.head_dim:
        # rope_parameters' partial_rotary_factor < 1 makes the tables narrower than head_dim, but these families
        # rotate whole heads (HF's own forward fails on it). A table head_dim / 2 wide (factor 0.5) would pass for
        # the kernel's half table and rotate every dimension with the wrong frequencies, so it is refused here.
        factor = (getattr(self.config, "rope_parameters", None) or {}).get("partial_rotary_factor")
        raise ValueError(f"the rotary embedding's cos/sin are {cos.shape[-1]} wide for head_dim {self.head_dim}: "
                         f"{type(self).__name__} rotates whole heads, so config.rope_parameters"
                         f"['partial_rotary_factor'] (is {factor}) must be 1.0")
    if kernels_usable(query):
        from chronicals.kernels import fused_qk_rope

        # The families' rotary embeddings return cat((freqs, freqs)).cos() and .sin(): equal halves, so the kernel
        # reads the first (tests/models pins this per family).
        half = self.head_dim // 2
        query, key = fused_qk_rope(query, key, cos[..., :half], sin[..., :half])
    else:
        query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)

    if past_key_values is not None:  # a cache may keep what it is given: v is its own tensor (above), not a view
        key, value = past_key_values.update(key, value, self.layer_idx)

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    out, weights = attention(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=_sliding_window(self),
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _sliding_window(attention) -> int | None:
    """Qwen2/Qwen3 set the window per layer on the module (None on full-attention layers); Mistral's attention reads
    it from its config; Llama has none. HF's SDPA path applies it through the mask, the varlen path through this.
    Only the family that reads the config's window gets it: a Llama config may carry a `sliding_window` field that
    HF's Llama ignores, and the varlen path would otherwise apply it."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    if family_for(attention.config.model_type).window_in_config:
        return getattr(attention.config, "sliding_window", None)
    return None
