"""The fused LoRA ops' backwards build no graph (no_grad matmuls, the MLP's in-place Triton SwiGLU step), so a double
backward through them (a gradient penalty: create_graph=True, then a backward through that gradient) must raise,
naming the op and the unfused path, not return gradients that silently lack the ops' second-order terms (before:
lora_A's gradient off by 37-54% on q/k/v, DoRA's magnitude gradient by 42-58%, the MLP's lora_A gradients
missing). A single backward, also under create_graph=True, is unchanged."""

import copy

import pytest
import torch
from lora_blocks import DEVICE, MLP, QKVO, adapted, graph_names

from chronicals.lora import install_fused

# (block, PEFT options, install_fused's kconcat, the fused op whose backward node must be in the graph)
CASES = {
    "fanout": (lambda: QKVO(8, 8, 4, bias=True), {}, False, "_LoRAFanOutBackward"),
    "fanout_kconcat": (lambda: QKVO(8, 8, 4, bias=True), {}, True, "_LoRAFanOutKConcatBackward"),
    "swiglu_mlp": (lambda: MLP(8, 12), {}, False, "_LoRASwiGLUMLPBackward"),
    "swiglu_mlp_kconcat": (lambda: MLP(8, 12), {}, True, "_LoRASwiGLUMLPKConcatBackward"),
    "dora": (lambda: QKVO(8, 8, 4), {"dora": True}, False, "_DoRALinearBackward"),
}


def _models(case):
    block, options, kconcat, node = CASES[case]
    plain = adapted(block(), 2, 4.0, seed=0, **options).to(DEVICE)
    fused = copy.deepcopy(plain)
    install_fused(fused, kconcat=kconcat)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert node in graph_names(fused(x.clone().requires_grad_(True)))
    return plain, fused, x


def _adapters(model):
    return [p for p in model.parameters() if p.requires_grad]


def _input_penalty(model, x):
    """x.grad of ||d loss / dx||^2 (the penalty alone: the first backward's nodes are not revisited)."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).pow(2).sum() + x.pow(3).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    return x.grad


def _adapter_penalty(model, x):
    """Adapter gradients of sum ||p.grad||^2 after loss.backward(create_graph=True); the loss is linear in the
    output, so the op's incoming gradient does not require grad (once_differentiable would not have caught it)."""
    model(x.clone().requires_grad_(True)).sum().backward(create_graph=True)
    penalty = sum(p.grad.pow(2).sum() for p in _adapters(model))
    for p in _adapters(model):
        p.grad = None
    penalty.backward()
    return [p.grad for p in _adapters(model)]


# loss.backward(create_graph=True) is the pattern under test; torch warns of its parameter <-> .grad cycle.
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("penalty", [_input_penalty, _adapter_penalty], ids=["input", "adapters"])
@pytest.mark.parametrize("case", CASES)
def test_double_backward_through_fused_lora_raises(case, penalty):
    plain, fused, x = _models(case)
    penalty(plain, x)  # PEFT's own layers (LoRAConfig(fused=False)) take it
    with pytest.raises(RuntimeError, match=r"(?s)no double backward.*fused=False"):
        penalty(fused, x)


@pytest.mark.parametrize("case", CASES)
def test_single_backward_under_create_graph_is_unchanged(case):
    plain, fused, x = _models(case)

    def grads(model, create_graph):
        x_ = x.clone().requires_grad_(True)
        loss = model(x_).pow(2).sum()
        return torch.autograd.grad(loss, [x_, *_adapters(model)], create_graph=create_graph)

    with_graph, without, reference = grads(fused, True), grads(fused, False), grads(plain, False)
    assert all(g.grad_fn is not None for g in with_graph)  # on the graph (a second backward through it raises)
    for g, g0, ref in zip(with_graph, without, reference):
        torch.testing.assert_close(g, g0, rtol=0, atol=0)
        torch.testing.assert_close(g, ref)
