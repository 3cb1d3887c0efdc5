"""Planted-fault backends, registered through the same interface as the real ones (harness.backends.register).
Each is the reference backend with one classic bug; the harness must flag every one of them."""

from __future__ import annotations

import os
import time

import torch

from harness import data
from harness.backends import Backend, BuildSpec, Trainable
from harness.backends.chronicals import ChronicalsBackend
from harness.backends.torch import TorchBackend


class ZeroGradBackend(TorchBackend):
    """The loss is multiplied by zero before backward: every gradient is exactly zero."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        t.forward = lambda batch: t.model(**batch).loss * 0.0
        return t


class FrozenWeightsBackend(TorchBackend):
    """The optimizer steps fp32 master copies whose updates are never copied back into the model: gradients look
    healthy, the model never changes."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        masters = [p.detach().float().clone().requires_grad_(True) for p in t.params]

        def hand_over(master):
            def hook(p):
                master.grad = p.grad.float()
                p.grad = None
            return hook

        for p, m in zip(t.params, masters):
            p.register_post_accumulate_grad_hook(hand_over(m))
        t.params = masters
        return t


class PaddingAsTokensBackend(TorchBackend):
    """Its collator sets labels = input_ids, padding included: the loss (and any count of its terms) takes the
    padding as tokens."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)

        def collate(sequences):
            batch = data.collate(sequences, spec.layout)
            batch["labels"] = batch["input_ids"].clone()
            return batch

        t.collate = collate
        return t


class DivergingBackend(TorchBackend):
    """Its loss doubles every step."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        step = [0]

        def forward(batch):
            step[0] += 1
            return t.model(**batch).loss * 2.0 ** (step[0] - 1)

        t.forward = forward
        return t


class FrozenLayerBackend(TorchBackend):
    """Its last decoder layer is frozen (a forgotten requires_grad, a layer left out of the optimizer): the loss
    still falls and the other layers' gradients look healthy."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        frozen = {id(p) for p in t.model.model.layers[-1].parameters()}
        for p in t.model.model.layers[-1].parameters():
            p.requires_grad_(False)
        t.params = [p for p in t.params if id(p) not in frozen]
        return t


class GradientAscentBackend(TorchBackend):
    """Every gradient's sign is flipped before the optimizer sees it (a sign slip in a hand-written backward): the
    gradient norm is the reference's, the weights move, and on random tokens the loss on new batches hardly moves
    either way in a short run."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        for p in t.params:
            p.register_hook(torch.neg)
        return t


class NoiseUpdateBackend(TorchBackend):
    """Every gradient is replaced by noise of its own norm (a backward that reads the wrong buffer): the norms, the
    weight changes and a short run's losses all look like the reference's; nothing is learnt."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        gen = torch.Generator(device=spec.device).manual_seed(0)

        def noise(g):
            n = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
            return n * (g.norm() / n.norm().clamp_min(1e-30))

        for p in t.params:
            p.register_hook(noise)
        return t


class ShiftedLabelsBackend(TorchBackend):
    """Its loss shifts the labels one position too far (a fused cross-entropy's off-by-one): it trains the model to
    predict the token after next. On random tokens that task is as hard as the real one, so the loss, the gradient
    norm and its own loss on the first batch all fall as the reference's do; its loss on the true next tokens does
    not."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)

        def forward(batch):
            labels = torch.full_like(batch["labels"], data.IGNORE_INDEX)
            labels[:, :-1] = batch["labels"][:, 1:]
            return t.model(**{**batch, "labels": labels}).loss

        t.forward = forward
        return t


class PackedLeakBackend(ChronicalsBackend):
    """Chronicals' packed training with the sequence boundaries left out of the forward (no position_ids, no
    cu_seq_lens): the packed row's sequences attend to each other. On random tokens that trains as well."""

    def build(self, spec: BuildSpec) -> Trainable:
        t = super().build(spec)
        t.forward = lambda batch: t.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return t


class HardCrashBackend(Backend):
    """The process dies without a word (as a segfault in a peer's extension would)."""

    def build(self, spec: BuildSpec) -> Trainable:
        os._exit(3)


class HangBackend(Backend):
    """Never returns: the runner's timeout must end it."""

    def build(self, spec: BuildSpec) -> Trainable:
        time.sleep(3600)


class OutOfMemoryBackend(Backend):
    def build(self, spec: BuildSpec) -> Trainable:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


FAKES = {
    "fake_zero_grad": "ZeroGradBackend",
    "fake_frozen": "FrozenWeightsBackend",
    "fake_padding_tokens": "PaddingAsTokensBackend",
    "fake_diverging": "DivergingBackend",
    "fake_frozen_layer": "FrozenLayerBackend",
    "fake_ascent": "GradientAscentBackend",
    "fake_noise_update": "NoiseUpdateBackend",
    "fake_shifted_labels": "ShiftedLabelsBackend",
    "fake_packed_leak": "PackedLeakBackend",
    "fake_hard_crash": "HardCrashBackend",
    "fake_hang": "HangBackend",
    "fake_oom": "OutOfMemoryBackend",
}


def register_all():
    from harness.backends import register

    for name, cls in FAKES.items():
        register(name, f"{__name__}:{cls}")
