"""Fused LoRA ops against PEFT's own forward/backward: float64 PEFT is the reference, native-dtype PEFT the bar."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_blocks import DEVICE, MLP, QKVO, InPlaceQKVO, adapted, compare_with_peft, graph_names, three_precisions
from oracle import assert_no_worse
from torch import nn

from chronicals.kernels import lora as lora_ops
from chronicals.kernels.lora import dora_linear, lora_linear, lora_projections, lora_swiglu_mlp
from chronicals.models.rms_norm import mlp_with_residual

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@given(
    tokens=st.integers(8, 40), batch=st.integers(1, 2), d=st.integers(8, 40), inter=st.integers(8, 72),
    rank=st.integers(1, 8), alpha=st.floats(0.5, 64), bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 99),
)
def test_fused_swiglu_mlp_matches_peft(tokens, batch, d, inter, rank, alpha, bias, dtype, seed):
    torch.manual_seed(seed)
    model = adapted(MLP(d, inter, bias=bias), rank, alpha, seed=seed)
    x, dy = torch.randn(batch, tokens, d), torch.randn(batch, tokens, d)
    compare_with_peft(model, x, dy, dtype, ["_LoRASwiGLUMLPBackward"])


@given(
    tokens=st.integers(8, 40), d=st.integers(8, 40), dq=st.integers(8, 40), dkv=st.integers(8, 24),
    rank=st.integers(1, 8), alpha=st.floats(0.5, 64), bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 99),
)
def test_fused_qkv_and_o_match_peft(tokens, d, dq, dkv, rank, alpha, bias, dtype, seed):
    torch.manual_seed(seed)
    model = adapted(QKVO(d, dq, dkv, bias=bias), rank, alpha, seed=seed)
    x, dy = torch.randn(tokens, d), torch.randn(tokens, d)
    compare_with_peft(model, x, dy, dtype, ["_LoRAFanOutBackward"])


@pytest.mark.parametrize("low_rank_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_orders_of_the_sums_match_peft(monkeypatch, low_rank_first, dtype):
    # The default writes the thin low-rank term first and lets the base matmul add onto it; the other order is kept
    # for A/Bs (benchmarks/step_profile.py) and must stay right too. Biases on, so the bias moves with the thin term.
    # The MLP's cuBLAS path (the one ranks above _LOW_RANK_IN_SWIGLU_MAX_RANK take), not the SwiGLU-pass kernel.
    monkeypatch.setattr(lora_ops, "_LOW_RANK_FIRST", low_rank_first)
    monkeypatch.setattr(lora_ops, "_LOW_RANK_IN_SWIGLU", False)
    torch.manual_seed(0)
    x, dy = torch.randn(2, 13, 24), torch.randn(2, 13, 24)
    compare_with_peft(adapted(MLP(24, 40, bias=True), 4, 8.0), x, dy, dtype, ["_LoRASwiGLUMLPBackward"])
    compare_with_peft(adapted(QKVO(24, 24, 8, bias=True), 4, 8.0), x, dy, dtype, ["_LoRAFanOutBackward"])


@given(
    tokens=st.integers(8, 40), d=st.integers(8, 40), inter=st.integers(8, 72),
    ranks=st.tuples(*[st.integers(1, 8)] * 3), bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 99),
)
def test_mlp_with_low_rank_terms_in_the_swiglu_kernel_matches_peft(tokens, d, inter, ranks, bias, dtype, seed):
    # chronicals.kernels.lora_swiglu: gate/up's low-rank terms, h A_d^T, dh's low-rank term and cat(G) formed inside
    # the SwiGLU pass (saving e0, g0, the base outputs); ranks drawn apart per projection.
    with pytest.MonkeyPatch.context() as patch:  # not the monkeypatch fixture: hypothesis reruns the test body
        patch.setattr(lora_ops, "_LOW_RANK_IN_SWIGLU", True)
        torch.manual_seed(seed)
        model = adapted(MLP(d, inter, bias=bias), ranks[0], 16.0, seed=seed,
                        rank_pattern={"up_proj": ranks[1], "down_proj": ranks[2]})
        x, dy = torch.randn(2, tokens, d), torch.randn(2, tokens, d)
        compare_with_peft(model, x, dy, dtype, ["_LoRASwiGLUMLPBackward"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_on_gpu_at_model_like_sizes(dtype):
    torch.manual_seed(0)
    x, dy = torch.randn(2, 700, 256), torch.randn(2, 700, 256)
    compare_with_peft(adapted(MLP(256, 688), 16, 16.0), x, dy, dtype, ["_LoRASwiGLUMLPBackward"], device="cuda")
    compare_with_peft(adapted(QKVO(256, 256, 64, bias=True), 16, 32.0), x, dy, dtype, ["_LoRAFanOutBackward"],
             device="cuda")


class ResidualMLP(nn.Module):
    """x + mlp(x) as chronicals' patched decoder layer forms it: the fused LoRA MLP is handed the residual."""

    def __init__(self, d: int, inter: int, bias: bool = False):
        super().__init__()
        self.mlp = MLP(d, inter, bias=bias)

    def forward(self, x):
        return mlp_with_residual(self.mlp, x, x)


@pytest.mark.parametrize("path", ["swiglu_kernel", "cublas", "kconcat"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_adds_the_residual_in_downs_matmul(path, bias, dtype):
    # PEFT's path forms residual + mlp(x) as a sum; ours hands the residual to the fused op (no AddBackward node).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_ops, "_LOW_RANK_IN_SWIGLU", path == "swiglu_kernel")
        torch.manual_seed(1)
        x, dy = torch.randn(2, 13, 24), torch.randn(2, 13, 24)
        op = "_LoRASwiGLUMLPKConcatBackward" if path == "kconcat" else "_LoRASwiGLUMLPBackward"
        compare_with_peft(adapted(ResidualMLP(24, 40, bias=bias), 4, 8.0), x, dy, dtype, [op],
                          kconcat=path == "kconcat", absent_names=["AddBackward0"])


@pytest.mark.gpu
def test_fp32_adapter_gradients_come_straight_from_the_matmul():
    # fp32 adapters of a bf16 model: cuBLAS writes their gradients in fp32 from its accumulator (_grad_mm), not
    # rounded to bf16 and cast by a kernel per adapter, so they are closer to the exact product than that path.
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) for shape in ((48, 700), (700, 64)))
    assert lora_ops._fp32_out_works(a.device)
    got = lora_ops._grad_mm(a, b, 0.37, torch.float32)
    exact = 0.37 * (a.double() @ b.double())
    rounded = lora_ops._scaled_mm(a, b, 0.37).double()
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < (rounded - exact).abs().max()


def test_qkv_group_computes_once_and_hands_out_siblings():
    model = adapted(QKVO(16, 16, 8), 4, 8.0)
    _, _, ours = three_precisions(model, torch.float32)
    calls = []
    group = ours.q_proj._chronicals_group
    original = group.__class__.__call__

    def spy(self, index, x, *a, **k):
        out = original(self, index, x, *a, **k)
        calls.append((index, len(self.pending)))
        return out

    group.__class__.__call__ = spy
    try:
        ours(torch.randn(5, 16, device=DEVICE))
    finally:
        group.__class__.__call__ = original
    # q computes all three and leaves k and v pending; k and v take theirs; nothing is left behind.
    assert calls == [(0, 2), (1, 1), (2, 0)]


def test_fused_path_falls_back_when_adapters_are_disabled():
    model = adapted(MLP(12, 20), 4, 8.0)
    _, native, ours = three_precisions(model, torch.float32)
    x = torch.randn(3, 12, device=DEVICE)
    for layer in (ours.gate_proj, ours.up_proj, ours.down_proj, native.gate_proj, native.up_proj, native.down_proj):
        layer.enable_adapters(False)
    names = graph_names(ours(x.requires_grad_(True)))
    assert "_LoRASwiGLUMLPBackward" not in names and "_LoRAFanOutBackward" not in names
    torch.testing.assert_close(ours(x), native(x))


def test_dropout_uses_peft_path_in_training_and_fused_path_in_eval():
    model = adapted(MLP(12, 20), 4, 8.0, dropout=0.5)
    _, native, ours = three_precisions(model, torch.float32)
    x = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    assert "_LoRASwiGLUMLPBackward" not in graph_names(ours.train()(x))
    assert "_LoRASwiGLUMLPBackward" in graph_names(ours.eval()(x))
    torch.testing.assert_close(ours(x), native.eval()(x))


def _mlp_with_bias(x, bias):
    p = (torch.randn(6, 4), bias, torch.randn(2, 4), torch.randn(6, 2), 1.0)
    return lora_swiglu_mlp(x, p, p, (torch.randn(4, 6), None, torch.randn(2, 6), torch.randn(4, 2), 1.0))


def test_wrappers_reject_bad_inputs_with_clear_errors():
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    with pytest.raises(ValueError, match="x has 5 features"):
        lora_linear(torch.randn(3, 5), w, None, a, b, 1.0)
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear(torch.randn(3, 4, dtype=torch.bfloat16), w, None, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(torch.randn(3, 4), w, None, a, torch.randn(6, 3), 1.0)
    with pytest.raises(TypeError, match=r"projections\[0\]: bias dtype torch.float16"):
        lora_linear(torch.randn(3, 4), w, torch.randn(6, dtype=torch.float16), a, b, 1.0)
    for op in (_mlp_with_bias, lambda x, bias: dora_linear(x, w, bias, a, b, 1.0, torch.ones(6))):
        with pytest.raises(TypeError, match="bias dtype torch.float16"):
            op(torch.randn(3, 4), torch.randn(6, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"projections\[0\]: weight must be a 2-D tensor, got shape \(6,\)"):
        lora_linear(torch.randn(3, 4), torch.randn(6), None, a, b, 1.0)
    with pytest.raises(TypeError, match=r"projections\[0\]: lora_B must be a 2-D tensor, got NoneType"):
        lora_linear(torch.randn(3, 4), w, None, a, None, 1.0)
    with pytest.raises(ValueError, match="0-d"):
        lora_linear(torch.tensor(1.0), w, None, a, b, 1.0)
    with pytest.raises(TypeError, match=r"projections\[0\]: scale must be a number, got 'x'"):
        lora_linear(torch.randn(3, 4), w, None, a, b, "x")
    with pytest.raises(TypeError, match="magnitude must be a tensor of shape \\(6,\\), got NoneType"):
        dora_linear(torch.randn(3, 4), w, None, a, b, 1.0, None)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(3, 4), w.requires_grad_(True), None, a, b, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        lora_projections(torch.randn(3, 4), [])
    gate = (torch.randn(6, 4), None, a, b, 1.0)
    with pytest.raises(ValueError, match="down"):
        lora_swiglu_mlp(torch.randn(3, 4), gate, gate, (torch.randn(4, 5), None, torch.randn(2, 5),
                                                          torch.randn(4, 2), 1.0))


def test_second_backward_through_fused_mlp_is_refused():
    model = adapted(MLP(8, 12), 2, 4.0)
    _, _, ours = three_precisions(model, torch.float32)
    y = ours(torch.randn(3, 8, device=DEVICE, requires_grad=True)).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.backward()


def test_swiglu_kernels_match_float64_and_reject_strided_buffers():
    from chronicals.kernels.lora import swiglu_backward_inplace, swiglu_forward

    torch.manual_seed(0)
    e, g, dh = (torch.randn(3, 1500, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))  # > one block
    e64, g64, dh64 = e.double(), g.double(), dh.double()
    sig = torch.sigmoid(e64)
    h_ref, dg_ref = e64 * sig * g64, dh64 * e64 * sig
    de_ref = dh64 * g64 * sig * (1 + e64 * (1 - sig))
    native_h = torch.nn.functional.silu(e) * g
    assert_no_worse("h", swiglu_forward(e, g), native_h, h_ref, torch.bfloat16)
    h, de, dg = swiglu_backward_inplace(dh.clone(), e.clone(), g.clone())
    e_n, g_n = e.clone().requires_grad_(True), g.clone().requires_grad_(True)
    (torch.nn.functional.silu(e_n) * g_n).backward(dh)
    assert_no_worse("h (backward)", h, native_h, h_ref, torch.bfloat16)
    assert_no_worse("de", de, e_n.grad, de_ref, torch.bfloat16)
    assert_no_worse("dg", dg, g_n.grad, dg_ref, torch.bfloat16)
    with pytest.raises(ValueError, match="must be contiguous"):
        swiglu_forward(e.t(), g.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_plain_pytorch_path_matches_float64(monkeypatch, dtype):
    # The path taken on a CPU without the Triton interpreter: for fp32 its .float() views alias the buffers it
    # overwrites, which once gave gradients off by orders of magnitude.
    import chronicals.kernels.lora as lora_kernels

    monkeypatch.setattr(lora_kernels, "_use_triton", lambda t: False)
    torch.manual_seed(1)
    e, g, dh = (torch.randn(5, 37, dtype=dtype) for _ in range(3))
    e64, g64, dh64 = e.double(), g.double(), dh.double()
    sig = torch.sigmoid(e64)
    refs = {"h": e64 * sig * g64, "de": dh64 * g64 * sig * (1 + e64 * (1 - sig)), "dg": dh64 * e64 * sig}
    e_n, g_n = e.clone().requires_grad_(True), g.clone().requires_grad_(True)
    native_h = torch.nn.functional.silu(e_n) * g_n
    native_h.backward(dh)
    natives = {"h": native_h.detach(), "de": e_n.grad, "dg": g_n.grad}
    outs = dict(zip(("h", "de", "dg"), lora_kernels.swiglu_backward_inplace(dh.clone(), e.clone(), g.clone())))
    for name in refs:
        assert_no_worse(name, outs[name], natives[name], refs[name], dtype)


@pytest.mark.parametrize("where", ["act_fn", "gate_proj", "down_proj.base_layer", "q_proj.base_layer"])
def test_hooked_modules_the_fused_ops_would_skip_are_called(where):
    # The fused MLP op stands in for act_fn and the three adapted layers, and every fused op reads its base layer's
    # weight without calling it: a hook there was skipped silently (outputs off by ~0.5 on a tiny Llama).
    torch.manual_seed(0)
    block = QKVO(12, 12, 6) if where.startswith("q_proj") else MLP(12, 20)
    _, native, ours = three_precisions(adapted(block, 4, 8.0), torch.float32)
    for model in (native, ours):
        model.get_submodule(where).register_forward_hook(lambda module, args, out: out * 1.5 + 0.25)
    x = torch.randn(3, 12, device=DEVICE)
    torch.testing.assert_close(ours(x), native(x))
    names = graph_names(ours(x.requires_grad_(True)))
    assert "_LoRASwiGLUMLPBackward" not in names


@pytest.mark.parametrize("kconcat", [False, True])
@pytest.mark.parametrize("shape", [(9, 12), (2, 5, 12)])
def test_projection_outputs_can_be_changed_in_place_as_pefts(kconcat, shape):
    # The outputs were [N, o] results viewed to x's shape inside the autograd.Function, so q.mul_(s) or
    # out += residual raised "Output 0 of _LoRAFanOut is a view and is being modified inplace" (PEFT's layers allow it).
    torch.manual_seed(3)
    model = adapted(InPlaceQKVO(12, 12, 6, bias=True, qkv=not kconcat), 3, 6.0)
    x, dy = torch.randn(*shape), torch.randn(*shape)
    compare_with_peft(model, x, dy, torch.float32, ["_LoRAFanOutKConcatBackward" if kconcat else "_LoRAFanOutBackward"],
                      kconcat=kconcat)


class InPlaceMLP(nn.Module):
    """A decoder layer's MLP half: the residual is added onto the MLP's output in place."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.mlp = MLP(*args, **kwargs)

    def forward(self, x):
        out = self.mlp(x)
        out += x
        return out


@pytest.mark.parametrize("kconcat", [False, True])
@pytest.mark.parametrize("shape", [(9, 12), (2, 5, 12)])
def test_mlp_output_can_be_changed_in_place_as_pefts(kconcat, shape):
    # The output was an [N, d] result viewed to x's shape inside the autograd.Function: out += residual raised
    # "Output 0 of _LoRASwiGLUMLP is a view and is being modified inplace" (PEFT's unfused MLP allows it).
    torch.manual_seed(4)
    model = adapted(InPlaceMLP(12, 20, bias=True), 3, 6.0)
    x, dy = torch.randn(*shape), torch.randn(*shape)
    compare_with_peft(model, x, dy, torch.float32, ["_LoRASwiGLUMLPKConcatBackward" if kconcat
                                                    else "_LoRASwiGLUMLPBackward"], kconcat=kconcat)


class CrossAttention(nn.Module):
    """q from x, k and v from encoder states of another width (T5Gemma's cross-attention)."""

    def __init__(self, d=12, d_enc=20, inner=8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, inner), nn.Linear(d_enc, inner), nn.Linear(d_enc, inner)

    def forward(self, x, enc):
        q, k, v = self.q_proj(x), self.k_proj(enc), self.v_proj(enc)
        return (q @ k.t()).softmax(-1) @ v


def test_cross_attention_with_another_key_width_matches_peft():
    # q, k, v were grouped whatever their input widths: q's call computed k and v from q's input too and raised
    # "projections[1]: x has 12 features but the weight takes 20", where PEFT's layers run.
    _, native, ours = three_precisions(adapted(CrossAttention(), 2, 4.0), torch.float32)
    x, enc = torch.randn(5, 12, device=DEVICE), torch.randn(7, 20, device=DEVICE)
    outs = []
    for model in (native, ours):
        y = model(x, enc)
        outs.append((y, *torch.autograd.grad(y.square().sum(), [p for p in model.parameters() if p.requires_grad])))
    assert "_LoRAFanOutBackward" in graph_names(outs[1][0])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want)
