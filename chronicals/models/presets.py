"""Built-in model shapes: the real architectures' configs, built with `AutoModelForCausalLM.from_config`
(no machine here reaches a model hub). A user with a checkpoint passes its name or path instead."""

from __future__ import annotations

from typing import Any

# Fields beyond these come from the transformers config class defaults for the model_type.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        sliding_window=None,
    ),
    # Tiny shapes for CPU tests and the demo: same architectures, a few layers.
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "tiny-qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "tiny-mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=None,
    ),
}


def preset_config(name: str, **overrides):
    """A transformers config for preset `name`; `overrides` replace fields (e.g. vocab_size)."""
    from transformers import AutoConfig

    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    fields = {**PRESETS[key], **overrides}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def build_model(name_or_path: str, *, dtype=None, seed: int | None = None, attn_implementation: str = "sdpa",
                **overrides):
    """A causal LM from a preset shape (random init, seeded) or from a local checkpoint / hub name."""
    import torch
    from transformers import AutoModelForCausalLM

    if name_or_path.lower() in PRESETS:
        cfg = preset_config(name_or_path, **overrides)
        if seed is not None:
            torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
