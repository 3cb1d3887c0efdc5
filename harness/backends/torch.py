"""The reference: Hugging Face eager with SDPA attention, nothing patched."""

from __future__ import annotations

from . import Backend, BuildSpec, Trainable, hf


class TorchBackend(Backend):

    def build(self, spec: BuildSpec) -> Trainable:
        return hf.trainable(hf.load_model(spec), spec)
