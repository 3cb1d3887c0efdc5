"""Shapes and config fields of real Llama / Qwen2 / Qwen3 / Mistral checkpoints, scaled down: the fully patched model
(`chronicals.apply` with every flag) agrees with the unpatched HF model built from the same config and weights on
the training loss, every parameter's gradient and the evaluation logits, for plain, padded and packed batches.

Covered: head_dim not a power of two and not hidden / heads (40, 80, 96, 112, 24), one kv head and as many kv heads
as query heads, odd intermediate and vocab sizes, tied and untied heads, q/k/v/o and MLP biases, every RoPE type of
these families (the scaled ones past their original context), Qwen2's max_window_layers, Qwen3's mixed layer_types,
Mistral's window, eps 1e-5, float64 (which the kernels leave to PyTorch). The plain-PyTorch path (no kernels) runs
every case; the Triton interpreter runs the shapes that reach the kernels' block edges.
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import chronicals
from tests.conftest import DEVICE
from tests.models.test_patch import needs_kernels, no_kernels  # noqa: F401 (fixture)

SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=509, max_position_embeddings=2048, rms_norm_eps=1e-6)

SHAPES = {
    "head_dim 80, one kv head": dict(hidden_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=80),
    "head_dim 40 != hidden / heads, kv = heads": dict(num_key_value_heads=4, head_dim=40),
    "head_dim 96, 3 heads, one kv head": dict(hidden_size=288, num_attention_heads=3, num_key_value_heads=1,
                                              head_dim=96),
    "head_dim 112, two heads": dict(hidden_size=112, num_attention_heads=2, num_key_value_heads=2, head_dim=112),
    "hidden 72, head_dim 24, intermediate 101": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1,
                                                      head_dim=24, intermediate_size=101),
    "tied head": dict(tie_word_embeddings=True),
    "untied head, eps 1e-5": dict(tie_word_embeddings=False, rms_norm_eps=1e-5),
}

ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                 "long_factor": [2.0] * 8, "original_max_position_embeddings": 8},
}

WINDOWS = {
    "qwen2": dict(sliding_window=4, use_sliding_window=True, max_window_layers=1),
    "qwen3": dict(sliding_window=4, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"]),
    "mistral": dict(sliding_window=4),
}

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def make_pair(model_type, dtype=None, **overrides):
    fields = {**SMALL, **({"head_dim": 16} if model_type == "qwen3" else {}), **overrides}
    if model_type == "mistral":
        fields.setdefault("sliding_window", None)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(DEVICE)
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a dropped weight or bias shows
        for name, p in reference.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return reference, chronicals.apply(copy.deepcopy(reference))


def make_batch(vocab, kind, seq=13):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    kwargs = dict(input_ids=ids, labels=labels)
    if kind == "padded":  # row 0 right-padded, row 1 left-padded
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        mask[1, :4] = 0
        labels[mask == 0] = -100
        kwargs["attention_mask"] = mask
    elif kind == "packed":  # two sequences per row: positions restart at 0
        kwargs["position_ids"] = torch.tensor([list(range(5)) + list(range(seq - 5))] * 2)
    return {k: v.to(DEVICE) for k, v in kwargs.items()}


def assert_agree(reference, patched, kind="plain", seq=13, rtol=1e-5):
    inputs = make_batch(reference.config.vocab_size, kind, seq)
    losses, grads = [], []
    for model in (reference, patched):
        model.train().zero_grad(set_to_none=True)
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=rtol, atol=1e-6)
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        err = ((grads[1][name] - g).norm() / g.norm()).item()
        assert err < 10 * rtol, f"{name}: gradient relative error {err:.2e}"
    with torch.no_grad():
        logits = [model.eval()(**inputs, use_cache=False).logits for model in (reference, patched)]
    keep = inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)
    torch.testing.assert_close(logits[1][keep], logits[0][keep], rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("kind", ["plain", "packed"])  # padded batches take HF's own SDPA mask: below, with windows
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_checkpoint_shapes_without_kernels(model_type, shape, kind, no_kernels):  # noqa: F811
    assert_agree(*make_pair(model_type, **SHAPES[shape]), kind)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_rope_types_past_their_original_context_without_kernels(model_type, rope, no_kernels):  # noqa: F811
    # Packed rows of 40 tokens (sequences of 5 and 35) against max_position_embeddings 16 and an original context of
    # 8: dynamic, yarn, llama3 and longrope take their scaled branches.
    pair = make_pair(model_type, rope_parameters=ROPES[rope], max_position_embeddings=16)
    assert_agree(*pair, "packed", seq=40)


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_biases_without_kernels(model_type, kind, no_kernels):  # noqa: F811
    # Llama / Qwen3 / Mistral take attention_bias (q, k, v and o) and mlp_bias; Qwen2 has q/k/v biases of its own.
    assert_agree(*make_pair(model_type, attention_bias=True, mlp_bias=True), kind)


@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("model_type", WINDOWS)
def test_sliding_windows_without_kernels(model_type, kind, no_kernels):  # noqa: F811
    assert_agree(*make_pair(model_type, **WINDOWS[model_type]), kind)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_float64_keeps_pytorch_math(model_type):
    # The kernels take fp32 / bf16 / fp16: a float64 model computes HF's math in PyTorch, also under the interpreter.
    assert_agree(*make_pair(model_type, dtype=torch.float64), "packed", rtol=1e-9)


# With the kernels (the Triton interpreter on CPU): the shapes whose widths are not powers of two, one row each.
KERNEL_CASES = [
    ("llama", "head_dim 80, one kv head", "plain"),
    ("qwen2", "head_dim 96, 3 heads, one kv head", "packed"),
    ("qwen3", "head_dim 40 != hidden / heads, kv = heads", "padded"),
    ("qwen3", "hidden 72, head_dim 24, intermediate 101", "packed"),
    ("mistral", "head_dim 112, two heads", "plain"),
]


@pytest.mark.parametrize("model_type, shape, kind", KERNEL_CASES)
def test_checkpoint_shapes_with_kernels(model_type, shape, kind):
    needs_kernels()
    assert_agree(*make_pair(model_type, **SHAPES[shape]), kind, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3", "mistral"])
def test_sliding_window_and_biases_with_kernels(model_type):
    needs_kernels()
    pair = make_pair(model_type, attention_bias=True, mlp_bias=True, **WINDOWS[model_type])
    assert_agree(*pair, "packed", rtol=1e-4)
