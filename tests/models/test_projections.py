"""The patched attention's q/k/v projections as one matmul (chronicals.models.projections): taken for plain
`nn.Linear`s (patched and HF models agree on loss, logits and every gradient, q/k/v biases and fp32 master weights
under autocast included), not taken for LoRA-wrapped, hooked or mismatched projections; the RoPE kernel takes the
strided views of the fused output and writes HF's layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chronicals
from chronicals.models import build_model, projections
from chronicals.models.patch import FLAGS
from tests.conftest import DEVICE
from tests.models.test_patch import KERNEL_SHAPE, assert_same_training_step, batch, needs_kernels, pair

ALL_OFF = {flag: False for flag in FLAGS}
ROPE_ONLY = {**ALL_OFF, "rope": True}


def qkv_rows(model) -> int:
    attn = model.model.layers[0].self_attn
    return sum(getattr(attn, n).weight.shape[0] for n in ("q_proj", "k_proj", "v_proj"))


@pytest.fixture
def linear_calls(monkeypatch):
    """The weights passed to F.linear (nn.Linear calls it too), as (rows, the weight object)."""
    calls = []
    original = F.linear

    def counting(x, weight, bias=None):
        calls.append(weight)
        return original(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting)
    return calls


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_fused_projection_is_taken_for_plain_linears(name, linear_calls):
    _, patched = pair(name, **ROPE_ONLY)
    ids, _ = batch(patched.config.vocab_size, shape=(1, 5))
    patched(input_ids=ids)
    attns = [layer.self_attn for layer in patched.model.layers]
    assert all(projections.qkv_fusable(a) for a in attns)
    separate = {id(getattr(a, n).weight) for a in attns for n in ("q_proj", "k_proj", "v_proj")}
    assert not [w for w in linear_calls if id(w) in separate]
    assert sum(w.shape[0] == qkv_rows(patched) for w in linear_calls) == len(attns)


def test_qwen2_biases_are_fused_and_get_their_gradients():
    needs_kernels()
    reference, patched = pair("tiny-qwen2", **ROPE_ONLY)
    attn = patched.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    assert projections.qkv_fusable(attn)
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)  # compares every bias gradient too


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(16384, 1152), (1000, 896), (3, 7)])
def test_the_bias_gradients_column_sums_are_as_accurate_as_torchs(rows, cols):
    # bf16 on CUDA sums the columns with cuBLAS (a product with ones), not torch's reduction; no less accurate.
    dy = torch.randn(rows, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    exact = dy.double().sum(0)
    got, reference = projections._column_sums(dy), dy.sum(0)
    assert got.dtype == torch.bfloat16 and got.shape == (cols,)
    # Both are rounded to bf16 once; fp32 sums in another order may round to the other neighbour: one bf16 step.
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().max())).item() - 7)
    assert (got.double() - exact).abs().max() <= (reference.double() - exact).abs().max() + step


def test_fused_projection_under_autocast_gives_fp32_weights_their_gradients():
    needs_kernels()
    reference, patched = pair("tiny-qwen2", **ROPE_ONLY)
    ids, labels = batch(reference.config.vocab_size, shape=KERNEL_SHAPE)
    losses, grads = [], []
    for model in (reference, patched):
        model.train().zero_grad(set_to_none=True)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    for name, g in grads[0].items():
        if "self_attn" in name and "o_proj" not in name:
            assert grads[1][name].dtype == torch.float32, name
        err = ((grads[1][name] - g).norm() / g.norm()).item()
        assert err < 5e-2, f"{name}: gradient relative error {err:.2e}"


def lora_pair(name, targets, **flags):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        return get_peft_model(build_model(name, seed=0).to(DEVICE), config)

    reference, patched = lora_model(), lora_model()
    patched.load_state_dict(reference.state_dict())
    return reference, chronicals.apply(patched, **flags)


def test_lora_wrapped_projections_keep_the_module_calls():
    needs_kernels()
    reference, patched = lora_pair("tiny-qwen2", ["q_proj", "v_proj"], **ROPE_ONLY)
    attn = patched.get_base_model().model.layers[0].self_attn
    assert not projections.qkv_fusable(attn)
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def test_frozen_plain_projections_of_a_lora_model_are_fused():
    # LoRA on the MLP only: q/k/v stay frozen plain linears, fused; the adapters get the same gradients.
    needs_kernels()
    reference, patched = lora_pair("tiny-llama", ["gate_proj", "down_proj"], **ROPE_ONLY)
    assert projections.qkv_fusable(patched.get_base_model().model.layers[0].self_attn)
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def attention_with(**changes):
    attn = build_model("tiny-qwen2", seed=0).model.layers[0].self_attn
    for name, fn in changes.items():
        fn(getattr(attn, name))
    return attn


class SubLinear(nn.Linear):
    pass


@pytest.mark.parametrize("case, attn", [
    ("plain", lambda: attention_with()),
    ("no bias anywhere", lambda: attention_with(**{n: lambda m: setattr(m, "bias", None)
                                                  for n in ("q_proj", "k_proj", "v_proj")})),
    ("bias on q only", lambda: attention_with(k_proj=lambda m: setattr(m, "bias", None),
                                              v_proj=lambda m: setattr(m, "bias", None))),
    ("a forward hook", lambda: attention_with(k_proj=lambda m: m.register_forward_hook(lambda *a: None))),
    ("a replaced forward", lambda: attention_with(v_proj=lambda m: setattr(m, "forward", m.forward))),
    ("a Linear subclass", lambda: attention_with(q_proj=lambda m: setattr(m, "__class__", SubLinear))),
    ("another dtype", lambda: attention_with(v_proj=lambda m: m.to(torch.bfloat16))),
])
def test_which_projections_are_fusable(case, attn):
    expected = case in ("plain", "no bias anywhere")
    attention = attn()
    assert projections.qkv_fusable(attention) == expected
    x = torch.randn(2, 3, attention.q_proj.in_features)
    if attention.v_proj.weight.dtype != attention.q_proj.weight.dtype:
        return
    got = projections.qkv_projections(attention, x)
    for out, proj in zip(got, (attention.q_proj, attention.k_proj, attention.v_proj)):
        torch.testing.assert_close(out, proj(x), rtol=1e-5, atol=1e-6)


def test_rope_kernel_takes_the_fused_views_and_keeps_hf_layout():
    needs_kernels()
    from chronicals.kernels import fused_qk_rope

    b, s, hq, hkv, d = 2, 5, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, (hq + 2 * hkv) * d, generator=gen).to(DEVICE).requires_grad_()
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(b, s, hq, d).transpose(1, 2), k.view(b, s, hkv, d).transpose(1, 2)
    angle = torch.randn(1, s, d // 2, generator=gen).to(DEVICE)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    q_rot, k_rot = fused_qk_rope(q, k, cos, sin)
    q_ref, k_ref = fused_qk_rope(q.contiguous(), k.contiguous(), cos, sin)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    # HF's layout: [B, H, S, D] as a transposed dense [B, S, H, D].
    assert q_rot.transpose(1, 2).is_contiguous() and k_rot.transpose(1, 2).is_contiguous()
    dq, dk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    ((q_rot * dq).sum() + (k_rot * dk).sum()).backward()
    grad = qkv.grad.split([hq * d, hkv * d, hkv * d], dim=-1)
    q_back, k_back = fused_qk_rope(dq, dk, cos, -sin)  # HF's halves are equal: the inverse rotation
    torch.testing.assert_close(grad[0].view(b, s, hq, d).transpose(1, 2), q_back, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[1].view(b, s, hkv, d).transpose(1, 2), k_back, rtol=1e-5, atol=1e-6)
    assert not grad[2].any()


def test_generation_with_kernels_matches_hf():
    needs_kernels()
    reference, patched = pair("tiny-qwen3", **ROPE_ONLY)
    ids, _ = batch(reference.config.vocab_size, shape=(1, 6))
    gen = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(patched.eval().generate(ids, **gen), reference.eval().generate(ids, **gen))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_attention_saves_v_on_its_own_not_the_fused_output(name):
    # Attention saves v for its backward. As a view it kept the whole [tokens, (Hq + 2 Hkv) D] q/k/v output alive,
    # (Hq + Hkv) D per token per layer more than v itself: at Qwen3-0.6B's shape, 8 x 2048, 2.6 GiB of peak.
    needs_kernels()
    _, patched = pair(name, **{**ALL_OFF, "rope": True, "rms_norm": True})
    patched.config.use_cache = False
    ids, labels = batch(patched.config.vocab_size, shape=KERNEL_SHAPE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        patched(input_ids=ids, labels=labels)
    qkv_bytes = ids.numel() * qkv_rows(patched) * patched.dtype.itemsize
    assert qkv_bytes not in saved


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_fused_projection_saves_the_weights_not_their_concatenation(name):
    # F.linear on the concatenated [Wq; Wk; Wv] saved that copy for its backward, alive from each layer's forward to
    # its backward: (Hq + 2 Hkv) D * d elements per layer, 192 MiB at Llama-3.2-1B bf16, 1.5 GiB at Llama-3-8B.
    _, patched = pair(name, **ROPE_ONLY)
    patched.config.use_cache = False
    params = {p.untyped_storage().data_ptr() for p in patched.parameters()}
    ids, labels = batch(patched.config.vocab_size, shape=KERNEL_SHAPE)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = patched(input_ids=ids, labels=labels).loss
    weight_copy = qkv_rows(patched) * patched.config.hidden_size * patched.dtype.itemsize
    assert weight_copy not in saved
    loss.backward()
    attn = patched.model.layers[0].self_attn
    assert all(getattr(attn, n).weight.grad is not None for n in ("q_proj", "k_proj", "v_proj"))
