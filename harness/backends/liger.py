"""Liger-Kernel: its Triton RoPE, RMSNorm, SwiGLU and fused linear cross-entropy patched into the model family's HF
classes (apply_liger_kernel_to_<family>) before the model is loaded."""

from __future__ import annotations

from . import Backend, BackendUnavailable, BuildSpec, Trainable, hf, require

PATCHES = {
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


class LigerBackend(Backend):

    def build(self, spec: BuildSpec) -> Trainable:
        if spec.device != "cuda":
            raise BackendUnavailable("liger: Liger-Kernel's Triton kernels need a CUDA GPU")
        lk = require("liger_kernel.transformers", "liger")
        if spec.model_type not in PATCHES or not hasattr(lk, PATCHES[spec.model_type]):
            raise BackendUnavailable(f"liger: no Liger-Kernel patch for model_type {spec.model_type!r} "
                                     f"(known here: {', '.join(PATCHES)})")
        getattr(lk, PATCHES[spec.model_type])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                              fused_linear_cross_entropy=True)
        return hf.trainable(hf.load_model(spec), spec)
