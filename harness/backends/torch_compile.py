"""Hugging Face eager with SDPA, its forward (loss included) compiled by torch.compile with default options.
The compile happens in the warm-up steps, which are not timed."""

from __future__ import annotations

from . import Backend, BuildSpec, Trainable, hf


class TorchCompileBackend(Backend):

    def build(self, spec: BuildSpec) -> Trainable:
        import torch

        t = hf.trainable(hf.load_model(spec), spec)
        compiled = torch.compile(t.model)
        t.forward = lambda batch: compiled(**batch).loss
        return t
