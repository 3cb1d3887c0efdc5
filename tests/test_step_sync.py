"""A patched model's training step (the harness loop's: forward with labels, backward, gradient clipping, fused
AdamW, zero_grad) makes no host sync, full fine-tuning and fused LoRA alike: a sync stops the host from queuing
ahead of the GPU, which then idles at every step's start while the host catches up (a step timed on its own pays
for it). A packed batch whose layout (cu_seq_lens, position_ids) is still on the host is validated there, with no
sync; one whose layout is on the device costs one read-back per forward (chronicals.attention), which is not what
is checked here. The trainer's own loop is covered by training/test_run_ahead.py."""

import pytest
import torch

import chronicals
from chronicals.data import PackedCollator
from chronicals.lora import LoRAConfig, apply_lora
from chronicals.models.presets import build_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(preset: str, mode: str):
    model = build_model(preset, dtype=torch.bfloat16, seed=0).to("cuda").train()
    model.config.use_cache = False
    model = chronicals.apply(model)
    if mode == "lora":
        model = apply_lora(model, LoRAConfig(rank=8, alpha=16.0, target_modules=TARGETS))
    return model


def _batch(vocab: int, layout: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if layout == "fixed":
        ids = torch.randint(0, vocab, (4, 96), generator=g)
        return {"input_ids": ids.cuda(), "labels": ids.cuda()}
    # The trainer's collator; its layout (cu_seq_lens, position_ids) stays on the host, as under run-ahead.
    batch = PackedCollator()([{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist()}
                              for n in (70, 33, 150, 131)])
    batch.pop("num_label_tokens")
    return {**batch, "input_ids": batch["input_ids"].cuda(), "labels": batch["labels"].cuda()}


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mode,layout", [("full", "fixed"), ("lora", "fixed"), ("lora", "packed")])
def test_a_training_step_makes_no_host_sync(preset, mode, layout):
    model = _model(preset, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    batch = _batch(model.config.vocab_size, layout)

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    losses = [step().detach() for _ in range(2)]  # compiles and autotunes the kernels, probes cuBLAS
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses.append(step().detach())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(losses)).all()
