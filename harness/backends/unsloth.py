"""Unsloth: FastLanguageModel, full fine-tuning (full_finetuning=True) or 16-bit LoRA on the seven projections.
Unsloth patches transformers at import, so it is imported first in its run's subprocess (the worker imports no
transformers before build). Its gradient checkpointing is switched off, as for every backend: recomputation would
change what is measured."""

from __future__ import annotations

from . import Backend, BackendUnavailable, BuildSpec, Trainable, hf, require


class UnslothBackend(Backend):

    def build(self, spec: BuildSpec) -> Trainable:
        if spec.device != "cuda":
            raise BackendUnavailable("unsloth: Unsloth needs a CUDA GPU")
        unsloth = require("unsloth", "unsloth")
        import torch

        fast = unsloth.FastLanguageModel
        full = spec.mode == "full"
        model, _tokenizer = fast.from_pretrained(
            model_name=spec.checkpoint, max_seq_length=spec.seq_len, dtype=getattr(torch, spec.dtype),
            load_in_4bit=False, load_in_16bit=not full, full_finetuning=full, use_gradient_checkpointing=False,
            random_state=spec.seed,
        )
        if not full:
            model = fast.get_peft_model(
                model, r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=hf.LORA_TARGETS,
                lora_dropout=0.0, bias="none", use_gradient_checkpointing=False, random_state=spec.seed,
            )
        model.config.use_cache = False
        model.train()
        return Trainable(model=model, params=[p for p in model.parameters() if p.requires_grad])
