"""On the GPU: bf16 training with every switch on, overlapped activation offload, and the FP8 and fp16 paths."""

import contextlib

import pytest
import torch

from chronicals.training import ChronicalsTrainer
from chronicals.training.offload import OffloadActivations

from .helpers import config, rows, tiny_model, tokenizer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("param_dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("packing", [False, True])
def test_bf16_fused_training_runs_and_learns(tmp_path, param_dtype, packing):
    cfg = config(tmp_path, device="cuda", mixed_precision="bf16", param_dtype=param_dtype, use_fused_kernels=True,
                 use_sequence_packing=packing, max_steps=12, batch_size=4, learning_rate=3e-3)
    result = ChronicalsTrainer(tiny_model(), tokenizer(), cfg).train(rows(48))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_cuda_offload_overlaps_and_matches(tmp_path):
    def grads(offload):
        model = tiny_model().cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(2, 96, (4, 257), generator=torch.Generator().manual_seed(0)).cuda()
        ctx = OffloadActivations(model, device=torch.device("cuda"), min_bytes=0) if offload else None
        with ctx if ctx is not None else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ctx

    loss, ref, _ = grads(False)
    loss_off, got, ctx = grads(True)
    assert ctx.offloaded_bytes > 0 and all(h.host.is_pinned() for h in ctx.handles)
    torch.testing.assert_close(loss_off, loss, rtol=0, atol=0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_fp16_uses_a_grad_scaler(tmp_path):
    cfg = config(tmp_path, device="cuda", mixed_precision="fp16", max_steps=3)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), cfg)
    assert trainer.scaler is not None
    assert all(torch.isfinite(torch.tensor(trainer.train(rows(16)).losses)))


def test_fp8_is_refused_clearly_where_it_cannot_run(tmp_path):
    from chronicals.training import SetupError

    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.importorskip("torchao")
        cfg = config(tmp_path, device="cuda", mixed_precision="bf16", use_fp8=True, max_steps=2)
        ChronicalsTrainer(tiny_model(), tokenizer(), cfg)  # converts without error on Hopper/Ada
    else:
        with pytest.raises(SetupError, match="use_fp8"):
            ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, device="cuda", use_fp8=True))
