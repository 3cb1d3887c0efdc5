"""Fused DoRA against PEFT's DoRA (outputs, dX, dA, dB and d magnitude), float64 PEFT as the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_blocks import MLP, QKVO, InPlaceQKVO, adapted, compare_with_peft

from chronicals.kernels.lora import dora_linear


@given(
    tokens=st.integers(8, 40), d=st.integers(8, 40), dq=st.integers(8, 40), dkv=st.integers(8, 24),
    rank=st.integers(1, 8), alpha=st.floats(0.5, 64), bias=st.booleans(), rslora=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99),
)
def test_fused_dora_matches_peft_dora(tokens, d, dq, dkv, rank, alpha, bias, rslora, dtype, seed):
    torch.manual_seed(seed)
    model = adapted(QKVO(d, dq, dkv, bias=bias), rank, alpha, dora=True, rslora=rslora, seed=seed)
    assert all("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.ndim == 1 and p.requires_grad)
    x, dy = torch.randn(tokens, d), torch.randn(tokens, d)
    compare_with_peft(model, x, dy, dtype, ["_DoRALinearBackward"])


def test_dora_in_an_mlp_runs_per_projection():
    model = adapted(MLP(12, 20), 3, 6.0, dora=True)
    compare_with_peft(model, torch.randn(2, 5, 12), torch.randn(2, 5, 12), torch.bfloat16, ["_DoRALinearBackward"])


def test_dora_linear_rejects_a_magnitude_of_the_wrong_size():
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    with pytest.raises(ValueError, match="magnitude shape"):
        dora_linear(torch.randn(3, 4), w, None, a, b, 1.0, torch.ones(4))


@pytest.mark.parametrize("shape", [(9, 12), (2, 5, 12)])
def test_dora_outputs_can_be_changed_in_place_as_pefts(shape):
    # The output was an [N, o] result viewed to x's shape inside the autograd.Function: q.mul_(s) or
    # out += residual raised "Output 0 of _DoRALinear is a view and is being modified inplace" (PEFT's DoRA allows it).
    torch.manual_seed(6)
    model = adapted(InPlaceQKVO(12, 12, 6, bias=True), 3, 6.0, dora=True)
    compare_with_peft(model, torch.randn(*shape), torch.randn(*shape), torch.float32, ["_DoRALinearBackward"])
