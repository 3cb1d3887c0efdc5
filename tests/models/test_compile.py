"""torch.compile over a patched model: the kernels' public entry points are opaque to dynamo
(torch.compiler.disable), so a compiled region breaks its graph around them and the compiled model trains like the
uncompiled one."""

import pytest
import torch

import chronicals
import chronicals.kernels
from chronicals.models import build_model
from tests.conftest import DEVICE
from tests.models.test_patch import KERNEL_SHAPE, batch, needs_kernels

LORA_OPS = ("lora_projections", "lora_linear", "lora_swiglu_mlp", "dora_linear", "swiglu_forward",
            "swiglu_backward_inplace")


def dynamo_disabled(fn) -> bool:
    return getattr(fn, "_torchdynamo_disable", False)


@pytest.mark.parametrize("name", [
    *(n for n in chronicals.kernels.__all__ if n != "FusedRMSNorm"),
    *(f"lora.{n}" for n in LORA_OPS),
])
def test_public_kernel_ops_are_opaque_to_dynamo(name):
    needs_kernels()
    pytest.importorskip("chronicals.kernels.lora")
    if name.startswith("lora."):
        from chronicals.kernels import lora

        fn = getattr(lora, name.removeprefix("lora."))
    else:
        fn = getattr(chronicals.kernels, name)
    assert dynamo_disabled(fn)


# Each decoder layer compiled (Qwen3: q/k norms), and the whole model as the trainer's use_torch_compile does
# (Qwen2: q/k/v biases, the fused linear cross-entropy inside the compiled forward).
@pytest.mark.parametrize("name, whole_model", [("tiny-qwen3", False), ("tiny-qwen2", True)])
def test_compiled_patched_model_trains_like_the_uncompiled(name, whole_model):
    needs_kernels()
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = chronicals.apply(build_model(name, seed=0).to(DEVICE))
    patched = chronicals.apply(build_model(name, seed=0).to(DEVICE))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = patched
    if whole_model:
        compiled = torch.compile(patched, backend=counter)
    else:
        for layer in patched.model.layers:
            layer.compile(backend=counter)
    ids, labels = batch(eager.config.vocab_size, shape=KERNEL_SHAPE)
    losses, grads = [], []
    try:
        for model, run in ((eager, eager), (patched, compiled)):
            model.train()
            loss = run(input_ids=ids, labels=labels).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters()})
    finally:
        torch._dynamo.reset()
    assert counter.frame_count > 0  # dynamo compiled graphs between the kernel calls
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)
