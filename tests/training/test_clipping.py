"""Gradient clipping left to fused AdamW's step (its grad_scale divisor) trains as clip_grad_norm_ before the step
does: same weights after several clipped steps, and without max_grad_norm the gradients reach the step untouched."""

import pytest
import torch

from chronicals.training import ChronicalsTrainer

from .helpers import config, rows, tiny_model, tokenizer


def _train(tmp_path, clip_in_step: bool, monkeypatch, **changes):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=3, **changes))
    assert trainer._clips_in_step()  # CPU AdamW with PyTorch's fused kernel: the path under test is available
    if not clip_in_step:
        monkeypatch.setattr(trainer, "_clips_in_step", lambda: False)
    result = trainer.train(rows(12))
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, result.losses


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e4], ids=["clipped", "below-the-limit"])
def test_clipping_in_the_step_trains_as_clip_grad_norm(tmp_path, monkeypatch, max_grad_norm):
    folded, losses_f = _train(tmp_path / "a", True, monkeypatch, max_grad_norm=max_grad_norm)
    separate, losses_s = _train(tmp_path / "b", False, monkeypatch, max_grad_norm=max_grad_norm)
    assert losses_f == pytest.approx(losses_s, rel=1e-5)
    for name, w in separate.items():
        torch.testing.assert_close(folded[name], w, rtol=1e-5, atol=1e-6, msg=name)
    if max_grad_norm < 1:  # the control: this limit does clip, so a step that skipped the clipping would differ
        unclipped, _ = _train(tmp_path / "c", True, monkeypatch, max_grad_norm=0.0)
        assert any(not torch.allclose(unclipped[n], w, rtol=1e-3, atol=1e-5) for n, w in separate.items())


def test_without_max_grad_norm_the_step_gets_the_gradients_untouched(tmp_path):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=1, max_grad_norm=0.0))
    seen = {}

    def capture(optimizer, args, kwargs):
        seen["grad_scale"] = getattr(optimizer, "grad_scale", None)
        seen["grads"] = [p.grad.clone() for p in trainer.trainable]

    trainer.optimizer.register_step_pre_hook(capture)
    trainer.train(rows(4))
    assert seen["grad_scale"] is None and all(torch.isfinite(g).all() for g in seen["grads"])
    assert not hasattr(trainer.optimizer, "grad_scale")  # set for the step alone
