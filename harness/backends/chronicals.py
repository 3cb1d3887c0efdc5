"""Chronicals: `chronicals.apply` patches the loaded HF model in place, each optimization switched by its own flag
(an ablation lists flag sets); LoRA through `chronicals.lora.apply_lora` (flag fused_lora: its fused adapter
paths; LoRA mode only); cuda_graphs replays the decoder layers as CUDA graphs (full mode only: a LoRA run's rows
say cuda_graphs true, but its layers run without). It alone trains the packed layout: its varlen attention isolates
a packed row's sequences."""

from __future__ import annotations

from . import Backend, BackendUnavailable, BuildSpec, Trainable, hf, require


class ChronicalsBackend(Backend):
    FLAGS = {"rms_norm": True, "swiglu": True, "rope": True, "linear_cross_entropy": True, "packed_attention": True,
             "cuda_graphs": True, "fused_lora": True}
    LAYOUTS = ("padded", "packed")

    def build(self, spec: BuildSpec) -> Trainable:
        chronicals = require("chronicals", "chronicals")
        if not hasattr(chronicals, "apply"):
            raise BackendUnavailable("chronicals: chronicals.apply is not in this checkout yet")
        flags = dict(spec.flags)
        fused_lora = flags.pop("fused_lora")
        # Graphs for full fine-tuning only: its step waits on the host's launches, LoRA's is GPU-bound (H100,
        # Llama-3.2-1B r16: 190.7 ms a step with graphs against 189.5 without) and would only pay their buffers.
        flags["cuda_graphs"] = flags["cuda_graphs"] and spec.mode == "full"
        model = chronicals.apply(hf.load_model(spec), **flags)
        if spec.mode == "lora":  # after apply: the fused LoRA MLP replaces the patched MLP forward
            lora = require("chronicals.lora", "chronicals")
            import torch

            torch.manual_seed(spec.seed)
            model = lora.apply_lora(model, lora.LoRAConfig(rank=spec.lora_rank, alpha=spec.lora_alpha,
                                                           target_modules=hf.LORA_TARGETS, fused=fused_lora))
        return Trainable(model=model, params=[p for p in model.parameters() if p.requires_grad])
