"""Chronicals: `chronicals.apply` patches the loaded HF model in place, each optimization switched by its own flag
(an ablation lists flag sets); LoRA through `chronicals.lora.apply_lora` (flag fused_lora: its fused adapter
paths; LoRA mode only); cuda_graphs (off unless a scenario turns it on) replays the decoder layers as CUDA graphs,
which pays where the host's launches bound the step (small models: Qwen2.5-0.5B full fine-tuning) and costs their
static buffers everywhere (~2 GiB there, more for wider models). It alone trains the packed layout: its varlen
attention isolates a packed row's sequences."""

from __future__ import annotations

from . import Backend, BackendUnavailable, BuildSpec, Trainable, hf, require


class ChronicalsBackend(Backend):
    FLAGS = {"rms_norm": True, "swiglu": True, "rope": True, "linear_cross_entropy": True, "packed_attention": True,
             "cuda_graphs": False, "fused_lora": True}
    LAYOUTS = ("padded", "packed")

    def build(self, spec: BuildSpec) -> Trainable:
        chronicals = require("chronicals", "chronicals")
        if not hasattr(chronicals, "apply"):
            raise BackendUnavailable("chronicals: chronicals.apply is not in this checkout yet")
        flags = dict(spec.flags)
        fused_lora = flags.pop("fused_lora")
        model = chronicals.apply(hf.load_model(spec), **flags)
        if spec.mode == "lora":  # after apply: the fused LoRA MLP replaces the patched MLP forward
            lora = require("chronicals.lora", "chronicals")
            import torch

            torch.manual_seed(spec.seed)
            model = lora.apply_lora(model, lora.LoRAConfig(rank=spec.lora_rank, alpha=spec.lora_alpha,
                                                           target_modules=hf.LORA_TARGETS, fused=fused_lora))
        return Trainable(model=model, params=[p for p in model.parameters() if p.requires_grad])
