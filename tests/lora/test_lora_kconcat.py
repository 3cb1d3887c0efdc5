"""The K-concatenated fused LoRA forwards (LoRAConfig.fused_kconcat): Y = [X | X A^T] @ [W | s B]^T, all outputs of
a fan-out in one matmul. Against PEFT as in test_lora_fused.py (float64 PEFT the reference, native-dtype PEFT the
bar), with a rank and a scale per projection (so the block-diagonal low-rank part of W_ext is exercised), and the
saved bytes against the addmm path's."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_blocks import DEVICE, MLP, QKVO, adapted, compare_with_peft, graph_names, three_precisions
from test_lora_memory import _saved_activation_bytes

from chronicals.kernels.lora import lora_projections, swiglu_backward_inplace, swiglu_forward
from chronicals.lora import LoRAConfig, apply_lora, merge_lora

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
RANKS = st.integers(1, 8)
ALPHAS = st.floats(0.5, 64)


@given(
    tokens=st.integers(8, 40), d=st.integers(8, 40), dq=st.integers(8, 40), dkv=st.integers(8, 24),
    ranks=st.tuples(RANKS, RANKS, RANKS, RANKS), alphas=st.tuples(ALPHAS, ALPHAS, ALPHAS, ALPHAS),
    bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 99),
)
def test_kconcat_qkv_and_o_match_peft(tokens, d, dq, dkv, ranks, alphas, bias, dtype, seed):
    torch.manual_seed(seed)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = adapted(QKVO(d, dq, dkv, bias=bias), ranks[0], alphas[0], seed=seed,
                    rank_pattern=dict(zip(names, ranks)), alpha_pattern=dict(zip(names, alphas)))
    x, dy = torch.randn(tokens, d), torch.randn(tokens, d)
    compare_with_peft(model, x, dy, dtype, ["_LoRAFanOutKConcatBackward"], kconcat=True,
                      absent_names=["_LoRAFanOutBackward"])


@given(
    tokens=st.integers(8, 40), batch=st.integers(1, 2), d=st.integers(8, 40), inter=st.integers(8, 72),
    ranks=st.tuples(RANKS, RANKS, RANKS), alphas=st.tuples(ALPHAS, ALPHAS, ALPHAS), bias=st.booleans(),
    dtype=DTYPES, seed=st.integers(0, 99),
)
def test_kconcat_swiglu_mlp_matches_peft(tokens, batch, d, inter, ranks, alphas, bias, dtype, seed):
    torch.manual_seed(seed)
    names = ("gate_proj", "up_proj", "down_proj")
    model = adapted(MLP(d, inter, bias=bias), ranks[0], alphas[0], seed=seed,
                    rank_pattern=dict(zip(names, ranks)), alpha_pattern=dict(zip(names, alphas)))
    x, dy = torch.randn(batch, tokens, d), torch.randn(batch, tokens, d)
    compare_with_peft(model, x, dy, dtype, ["_LoRASwiGLUMLPKConcatBackward"], kconcat=True,
                      absent_names=["_LoRASwiGLUMLPBackward", "_LoRAFanOutKConcatBackward"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kconcat_on_gpu_at_model_like_sizes(dtype):
    torch.manual_seed(0)
    x, dy = torch.randn(2, 700, 256), torch.randn(2, 700, 256)
    compare_with_peft(adapted(MLP(256, 688), 16, 16.0), x, dy, dtype, ["_LoRASwiGLUMLPKConcatBackward"],
                      device="cuda", kconcat=True)
    compare_with_peft(adapted(QKVO(256, 256, 64, bias=True), 16, 32.0, rank_pattern={"k_proj": 8}), x, dy, dtype,
                      ["_LoRAFanOutKConcatBackward"], device="cuda", kconcat=True)


def test_kconcat_qkv_outputs_are_views_of_one_matmul_output():
    _, _, ours = three_precisions(adapted(QKVO(16, 16, 8), 4, 8.0), torch.float32, kconcat=True)
    x = torch.randn(2, 5, 16, device=DEVICE)
    group = ours.q_proj._chronicals_group
    q, k, v = (group(i, x) for i in range(3))
    assert q._base is not None and q._base is k._base is v._base
    assert q._base.shape == (2, 5, 16 + 8 + 8)  # allocated in x's leading shape, not viewed to it
    assert q.stride() == (5 * 32, 32, 1)


def test_kconcat_saves_the_same_bytes_as_the_addmm_path():
    for block, ranks in ((MLP(32, 96, bias=True), {"up_proj": 3}), (QKVO(32, 32, 16, bias=True), {"k_proj": 2})):
        model = adapted(block, 4, 8.0, rank_pattern=ranks)
        x = torch.randn(48, 32, requires_grad=True)
        _, _, plain = three_precisions(model, torch.bfloat16, "cpu")
        _, _, kconcat = three_precisions(model, torch.bfloat16, "cpu", kconcat=True)
        xb = x.detach().bfloat16().requires_grad_(True)
        assert _saved_activation_bytes(kconcat, xb) == _saved_activation_bytes(plain, xb), type(block).__name__


def test_kconcat_fanout_mixed_biases_and_strided_output_grads():
    # One projection with a bias, one without (the bias of W_ext's rows is zero there); output gradients that are
    # transposed views (non-contiguous) reach the backward as they are.
    torch.manual_seed(0)
    x = torch.randn(12, 10, requires_grad=True)
    projs = [(torch.randn(6, 10), torch.randn(6), torch.randn(3, 10, requires_grad=True),
              torch.randn(6, 3, requires_grad=True), 2.0),
             (torch.randn(4, 10), None, torch.randn(2, 10, requires_grad=True),
              torch.randn(4, 2, requires_grad=True), 0.5)]
    dys = [torch.randn(o, 12).t() for o in (6, 4)]
    results = []
    for kconcat in (False, True):
        outs = lora_projections(x, projs, kconcat=kconcat)
        leaves = [x] + [t for p in projs for t in p[2:4]]
        results.append((outs, torch.autograd.grad(outs, leaves, dys)))
    (outs0, grads0), (outs1, grads1) = results
    for a, b in zip(outs0 + grads0, outs1 + grads1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_swiglu_kernels_take_row_strided_column_halves():
    torch.manual_seed(0)
    rows, inter = 5, 1100  # > one block per row
    full = torch.randn(rows, 2 * inter + 3, dtype=torch.bfloat16, device=DEVICE)
    eg = full[:, 1:2 * inter + 1]  # the halves have row stride 2I + 3 and start one column in
    e, g = eg[:, :inter], eg[:, inter:]
    h_ext = torch.full((rows, inter + 7), 7.0, dtype=torch.bfloat16, device=DEVICE)
    h = swiglu_forward(e, g, out=h_ext[:, :inter])
    torch.testing.assert_close(h, swiglu_forward(e.contiguous(), g.contiguous()), rtol=0, atol=0)
    assert (h_ext[:, inter:] == 7).all()
    dh = torch.randn(rows, inter, dtype=torch.bfloat16, device=DEVICE)
    expected = swiglu_backward_inplace(dh.clone(), e.contiguous(), g.contiguous())
    before = full.clone()
    got = swiglu_backward_inplace(dh.clone(), e, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[1].data_ptr() == e.data_ptr() and got[2].data_ptr() == g.data_ptr()  # written in place
    untouched = [0, 2 * inter + 1, 2 * inter + 2]
    assert torch.equal(full[:, untouched], before[:, untouched])
    with pytest.raises(ValueError, match="unit column stride"):
        swiglu_forward(e.t(), g.t())


def test_lora_config_fused_kconcat_is_validated_and_reaches_the_modules():
    assert LoRAConfig().fused_kconcat is False
    with pytest.raises(TypeError, match="fused_kconcat must be True or False"):
        LoRAConfig(fused_kconcat=1)
    with pytest.raises(ValueError, match="needs fused=True"):
        LoRAConfig(fused=False, fused_kconcat=True)
    from test_lora_apply import _randomize_b, _tiny

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kconcat in (False, True):
        model = apply_lora(_tiny(), LoRAConfig(rank=4, alpha=8, fused_kconcat=kconcat))
        _randomize_b(model)
        layer = model.base_model.model.model.layers[0]
        assert layer.mlp._chronicals_kconcat is kconcat and layer.self_attn.q_proj._chronicals_group.kconcat is kconcat
        out = model(input_ids=ids)
        expected = "_LoRASwiGLUMLPKConcatBackward" if kconcat else "_LoRASwiGLUMLPBackward"
        assert expected in graph_names(out.logits)
        logits[kconcat] = out.logits.detach()
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    # Merging (the parameters are PEFT's, unchanged) removes the flag with the fused forwards.
    merged = merge_lora(model)
    assert not any("_chronicals_kconcat" in vars(m) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, logits[True], rtol=1e-4, atol=1e-4)
