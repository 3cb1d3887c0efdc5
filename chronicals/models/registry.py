"""The architectures `chronicals.apply` knows how to patch, and where their Hugging Face classes live.

Llama 3.x, Qwen2/2.5, Qwen3 and Mistral share Llama's module structure (RMSNorm, gated MLP, attention
with RoPE, pre-norm decoder layer, causal-LM head), so one set of patched forwards serves them all; their
differences are attributes the forwards read (Qwen3's per-head `q_norm`/`k_norm`, Qwen2/Mistral's
`sliding_window`). A family is therefore just a row in this table: the transformers module and the
class-name prefix.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str  # the published model names, for error messages
    modeling: str  # the transformers module that defines the classes
    prefix: str  # class-name prefix in that module, e.g. "Llama" for LlamaRMSNorm
    # Whether HF's attention reads its sliding window from the config (Mistral). Qwen2/Qwen3 keep it on the module;
    # Llama has none, and ignores a `sliding_window` field that its config may carry.
    window_in_config: bool = False

    def module(self):
        return importlib.import_module(self.modeling)

    def cls(self, suffix: str) -> type:
        """The family's class `<prefix><suffix>`, e.g. suffix "RMSNorm", "MLP", "Attention", "ForCausalLM"."""
        return getattr(self.module(), self.prefix + suffix)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama 3.x", "transformers.models.llama.modeling_llama", "Llama"),
        Family("qwen2", "Qwen2 / Qwen2.5", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
        Family("qwen3", "Qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3"),
        Family("mistral", "Mistral", "transformers.models.mistral.modeling_mistral", "Mistral", window_in_config=True),
    )
}


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.label})" for f in FAMILIES.values())


def family_for(model_type: str) -> Family:
    """The family of `model_type` (a config's `model_type`); a clear error listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"chronicals cannot patch model_type {model_type!r}; supported architectures: {supported()}")
    return FAMILIES[model_type]
