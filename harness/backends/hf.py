"""Loading shared by the Hugging Face-based backends: the scenario's checkpoint in its dtype on its device, and
LoRA through PEFT on all seven projections, seeded so every backend starts from the same adapter weights. Adapters
stay in fp32 (PEFT's default, and chronicals.lora's) over the bf16 base weights."""

from __future__ import annotations

import torch

from . import BuildSpec, Trainable

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(spec: BuildSpec, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.checkpoint, dtype=getattr(torch, spec.dtype),
                                                 attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.to(spec.device).train()


def add_lora(model, spec: BuildSpec):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    cfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, bias="none",
                     target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def trainable(model, spec: BuildSpec) -> Trainable:
    """The model (with LoRA adapters in LoRA mode) and its parameters that require grad."""
    if spec.mode == "lora":
        model = add_lora(model, spec)
    return Trainable(model=model, params=[p for p in model.parameters() if p.requires_grad])
