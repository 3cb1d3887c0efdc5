"""`chronicals.apply` / `apply_to_classes`: patched and unpatched tiny models agree on the loss, the logits and
every parameter gradient (kernels under the Triton interpreter, and the plain-PyTorch fallback); each flag
patches only its own part; unsupported models and bad flags give clear errors."""

import copy

import pytest
import torch

import chronicals
from chronicals.models import build_model, causal_lm, rms_norm, rope, swiglu
from chronicals.models.patch import FLAGS
from tests.autograd_graph import node_names
from tests.conftest import DEVICE

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
ALL_OFF = {flag: False for flag in FLAGS}


def needs_kernels():
    for module in ("rms_norm", "swiglu", "rope", "linear_cross_entropy"):
        pytest.importorskip(f"chronicals.kernels.{module}")


@pytest.fixture
def no_kernels(monkeypatch):
    """The patched forwards as on a CPU without TRITON_INTERPRET: plain PyTorch math."""
    for module in (rms_norm, swiglu, rope, causal_lm):
        monkeypatch.setattr(module, "kernels_usable", lambda t: False)


def pair(name, **flags):
    reference = build_model(name, seed=0).to(DEVICE)
    patched = chronicals.apply(build_model(name, seed=0).to(DEVICE), **flags)
    return reference, patched


def batch(vocab, seed=0, shape=(2, 11)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that carries no loss
    return ids, labels


def assert_same_training_step(reference, patched, rtol=1e-5, shape=(2, 11), **kwargs):
    """Training-mode loss and every parameter gradient agree; the patched model returns no logits when it
    computes the loss with the fused linear cross-entropy."""
    ids, labels = batch(reference.config.vocab_size, shape=shape)
    losses, grads = [], []
    for model in (reference, patched):
        model.train().zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, **kwargs)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=rtol, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        err = ((grads[1][name] - g).norm() / g.norm()).item()
        assert err < 10 * rtol, f"{name}: gradient relative error {err:.2e}"
    return out


def assert_same_eval_outputs(reference, patched, shape=(2, 11)):
    ids, labels = batch(reference.config.vocab_size, seed=1, shape=shape)
    ref = reference.eval()(input_ids=ids, labels=labels)
    out = patched.eval()(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


# Interpreted kernels are slow: one row of 13 tokens (more than one block of rows for no kernel, but the kernels'
# own tests cover block edges) and the evaluation path on the family that exercises every kernel (Qwen3).
KERNEL_SHAPE = (1, 13)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_flags_with_kernels_agree_with_hf(name):
    needs_kernels()
    reference, patched = pair(name)
    out = assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)
    assert out.logits is None
    if name == "tiny-qwen3":
        assert_same_eval_outputs(reference, patched, shape=KERNEL_SHAPE)


@pytest.mark.parametrize("swiglu", [True, False])
def test_decoder_layers_run_their_residual_adds_inside_the_kernels(swiglu):
    # The layer's last add goes into the MLP's last matmul (a patched MLP), the mid-layer add into the post-attention
    # norm, and the residual stream's gradient into the input norm's backward (its node, not a separate sum).
    # In bf16: in fp32 on an H100 the graph held two more AddBackward0 a layer than on CPU, from attention (fp32
    # SDPA on CUDA does not take the one-node fused kernels).
    needs_kernels()
    patched = chronicals.apply(build_model("tiny-llama", seed=0, dtype=torch.bfloat16).to(DEVICE), swiglu=swiglu)
    ids, labels = batch(patched.config.vocab_size, shape=KERNEL_SHAPE)
    names = node_names(patched(input_ids=ids, labels=labels).loss)
    layers = patched.config.num_hidden_layers
    assert names.count("RMSNormResidualFunctionBackward") == layers
    assert names.count("AddRMSNormFunctionBackward") == layers
    assert names.count("AddBackward0") == (0 if swiglu else layers)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_flags_without_kernels_agree_with_hf(name, no_kernels):
    reference, patched = pair(name)
    assert assert_same_training_step(reference, patched).logits is None
    assert_same_eval_outputs(reference, patched)


@pytest.mark.parametrize("flag", [f for f in FLAGS if f != "packed_attention"])
def test_each_flag_alone_agrees_and_patches_only_its_part(flag):
    needs_kernels()
    reference, patched = pair("tiny-qwen3", **{**ALL_OFF, flag: True})
    out = assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)
    assert (out.logits is None) == (flag == "linear_cross_entropy")
    patched_kinds = {type(m).__name__.removeprefix("Qwen3") for m in patched.modules() if "forward" in vars(m)}
    expected = {"rms_norm": {"RMSNorm", "DecoderLayer"}, "swiglu": {"MLP"}, "rope": {"Attention"},
                "linear_cross_entropy": {"ForCausalLM"}}[flag]
    assert patched_kinds == expected
    assert patched.config._attn_implementation == "sdpa"
    assert patched.chronicals_patches == {**ALL_OFF, flag: True}


def test_packed_attention_flag_alone_only_changes_the_attention_implementation():
    reference, patched = pair("tiny-llama", **{**ALL_OFF, "packed_attention": True})
    assert patched.config._attn_implementation == "chronicals_varlen"
    assert not [m for m in patched.modules() if "forward" in vars(m)]
    assert_same_training_step(reference, patched)


def test_num_items_in_batch_makes_the_loss_sum_over_that_count(no_kernels):
    reference, patched = pair("tiny-llama")
    # A micro-batch of a larger accumulated batch: HF's loss is sum / num_items_in_batch, and so is ours.
    assert_same_training_step(reference, patched, num_items_in_batch=torch.tensor(37, device=DEVICE))


def test_num_items_in_batch_with_the_fused_kernel():
    needs_kernels()
    reference, patched = pair("tiny-llama", **{**ALL_OFF, "linear_cross_entropy": True})
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE, num_items_in_batch=37)


def test_an_all_ignored_batch_gives_zero_loss_on_both_paths(no_kernels):
    # The fused kernel's convention (0, with zero gradients) holds on the fallback path too, where a plain mean
    # would be 0/0 = NaN.
    _, patched = pair("tiny-llama", **{**ALL_OFF, "linear_cross_entropy": True})
    ids = torch.randint(0, patched.config.vocab_size, (2, 7), device=DEVICE)
    loss = patched(input_ids=ids, labels=torch.full_like(ids, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in patched.parameters())


def test_tied_embeddings_stay_tied_and_train_together():
    needs_kernels()
    reference, patched = pair("tiny-qwen2", **{**ALL_OFF, "linear_cross_entropy": True})
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    # The shared weight's gradient (head + embedding) is among those compared.
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def test_return_dict_false_gives_a_tuple(no_kernels):
    _, patched = pair("tiny-llama")
    ids, labels = batch(patched.config.vocab_size)
    out = patched.train()(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0


def test_a_patched_model_survives_torch_save_and_pickle(no_kernels):
    """Whole-model torch.save / pickle round trips read back, still patched, with each forward bound to its own
    loaded module (a bound-method forward pickles as getattr(module, its function's name), which fails on load)."""
    import io
    import pickle

    reference, patched = pair("tiny-llama")
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(patched))):
        attention = loaded.model.layers[0].self_attn
        assert attention.forward.func is rope.rope_attention_forward and attention.forward.args == (attention,)
        assert loaded.chronicals_patches == patched.chronicals_patches
        assert_same_training_step(reference, loaded)


def test_generation_matches_hf(no_kernels):
    reference, patched = pair("tiny-qwen3")
    ids, _ = batch(reference.config.vocab_size, shape=(1, 6))
    gen = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(patched.eval().generate(ids, **gen), reference.eval().generate(ids, **gen))


def test_apply_to_classes_patches_models_created_afterwards(no_kernels):
    undo = chronicals.apply_to_classes("mistral", rope=False, packed_attention=False)
    try:
        model = build_model("tiny-mistral", seed=0).to(DEVICE)
    finally:
        undo()
    assert model.chronicals_patches == {**dict.fromkeys(FLAGS, True), "rope": False, "packed_attention": False}
    reference = build_model("tiny-mistral", seed=0).to(DEVICE)
    assert not hasattr(reference, "chronicals_patches")  # undone
    assert assert_same_training_step(reference, model).logits is None


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=r"cannot patch model_type 'gpt2'.*llama \(Llama 3.x\), qwen2 \(Qwen2 / "
                                         r"Qwen2.5\), qwen3 \(Qwen3\), mistral \(Mistral\)"):
        chronicals.apply(model)
    with pytest.raises(ValueError, match="cannot patch model_type 'gpt2'"):
        chronicals.apply_to_classes("gpt2")
    with pytest.raises(TypeError, match="needs a Hugging Face causal LM"):
        chronicals.apply(torch.nn.Linear(2, 2))


def test_bad_flags_give_clear_errors():
    model = build_model("tiny-llama", seed=0)
    with pytest.raises(TypeError, match="flag rope must be True or False, got 'yes'"):
        chronicals.apply(model, rope="yes")
    with pytest.raises(TypeError, match="unknown flag\\(s\\) fused_everything"):
        chronicals.apply_to_classes("llama", fused_everything=True)
    with pytest.raises(TypeError, match="apply_to_classes: flag rms_norm must be True or False, got 1"):
        chronicals.apply_to_classes("llama", rms_norm=1)
    assert not hasattr(build_model("tiny-llama", seed=0), "chronicals_patches")  # nothing was left installed
    gelu = build_model("tiny-llama", seed=0, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act is 'gelu'; pass swiglu=False"):
        chronicals.apply(gelu)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_a_bare_decoder_model_is_patched_and_takes_packed_batches(name):
    # AutoModel (no lm_head): the packed-batch step goes on the model itself, not on a `.model` it does not have.
    from transformers import AutoModel

    from chronicals.data import PackedCollator
    from chronicals.models import preset_config

    torch.manual_seed(0)
    reference = AutoModel.from_config(preset_config(name), attn_implementation="sdpa").to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference))
    assert patched.chronicals_patches["packed_attention"]
    ids, _ = batch(reference.config.vocab_size)
    torch.testing.assert_close(patched(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    seqs = [ids[0, :7].tolist(), ids[1, :4].tolist()]
    packed = PackedCollator()([{"input_ids": s} for s in seqs])
    packed = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in packed.items()
              if k not in ("labels", "num_label_tokens")}
    expected = torch.cat([reference(input_ids=torch.tensor([s], device=DEVICE)).last_hidden_state[0] for s in seqs])
    torch.testing.assert_close(patched(**packed).last_hidden_state[0], expected, rtol=1e-5, atol=1e-5)


def test_peft_wrapped_model_is_patched_and_its_lora_head_keeps_hf_loss(no_kernels):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        config = LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "lm_head"], init_lora_weights=False)
        return get_peft_model(build_model("tiny-llama", seed=0).to(DEVICE), config)

    reference, patched = lora_model(), lora_model()
    patched.load_state_dict(reference.state_dict())
    chronicals.apply(patched)
    # lm_head is LoRA-wrapped, so the loss takes HF's path (with logits) and still agrees.
    assert assert_same_training_step(reference, patched).logits is not None


def test_import_chronicals_stays_cheap():
    import subprocess
    import sys

    # `apply` / `apply_to_classes` resolve on first use; a bare import loads neither torch nor transformers.
    code = "import sys, chronicals; print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == ""


def test_gradient_checkpointing_keeps_the_patched_forwards(no_kernels):
    reference, patched = pair("tiny-qwen2")
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_training_step(reference, patched)


@pytest.mark.parametrize("name, window", [("tiny-mistral", dict(sliding_window=4)),
                                          ("tiny-qwen2", dict(sliding_window=4, use_sliding_window=True,
                                                              max_window_layers=1))])
def test_sliding_window_shorter_than_the_sequence_is_kept(name, window, no_kernels):
    # HF's SDPA path applies the window through its mask; the patched attention (rope + varlen) must pass it on
    # itself: Mistral keeps it in its config, Qwen2 on each sliding layer's module.
    reference = build_model(name, seed=0, **window).to(DEVICE)
    patched = chronicals.apply(build_model(name, seed=0, **window).to(DEVICE))
    assert_same_training_step(reference, patched, shape=(2, 11))


def test_a_sliding_window_field_that_hf_llama_ignores_is_ignored(no_kernels):
    # A Llama config may carry a `sliding_window` field (configs keep unknown fields); HF's Llama attention never reads
    # it, so the patched attention must not hand it to the packed path as a window either.
    reference = build_model("tiny-llama", seed=0, sliding_window=4).to(DEVICE)
    patched = chronicals.apply(build_model("tiny-llama", seed=0, sliding_window=4).to(DEVICE))
    assert_same_training_step(reference, patched, shape=(2, 11))


def test_a_bare_decoder_called_positionally_still_takes_packed_batches():
    # model(input_ids, attention_mask, position_ids): the packed-batch step must read positional inputs too, or the
    # packed sequences silently attend to each other (HF's own packed-sequence mask is not built on this path).
    from transformers import AutoModel

    from chronicals.models import preset_config

    torch.manual_seed(0)
    reference = AutoModel.from_config(preset_config("tiny-llama"), attn_implementation="sdpa").to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference), **{**ALL_OFF, "packed_attention": True})
    ids, _ = batch(reference.config.vocab_size, shape=(1, 9))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]], device=DEVICE)
    expected = torch.cat([reference(input_ids=ids[:, :4]).last_hidden_state,
                          reference(input_ids=ids[:, 4:]).last_hidden_state], dim=1)
    out = patched(ids, None, positions, use_cache=False).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


ROPE_TYPES = [
    None,
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rope_parameters", ROPE_TYPES, ids=lambda p: (p or {}).get("rope_type", "default"))
def test_rotary_embeddings_repeat_their_halves(name, rope_parameters):
    """The patched attention hands fused_qk_rope only the first half of cos/sin (chronicals/models/rope.py), which
    holds while each family's rotary embedding returns cat((freqs, freqs)): pinned here for every RoPE type, so a
    transformers release that changes it fails this test instead of training with a wrong rotation."""
    overrides = {"rope_parameters": rope_parameters} if rope_parameters else {}
    model = build_model(name, seed=0, **overrides)
    x = torch.zeros(2, 70, model.config.hidden_size)
    position_ids = torch.arange(70).repeat(2, 1) % 50  # beyond original_max_position_embeddings: scaled ranges
    cos, sin = model.model.rotary_emb(x, position_ids)
    half = cos.shape[-1] // 2
    for table in (cos, sin):
        assert not torch.equal(table[..., :half], torch.zeros_like(table[..., :half]))
        torch.testing.assert_close(table[..., half:], table[..., :half], rtol=0, atol=0)
