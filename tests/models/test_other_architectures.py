"""Architectures without kernels here (Phi-3, GPT-2, Gemma, ...): packed attention alone patches them, and the trainer
trains them with their own modules; what packed attention cannot stand in for is refused, never run wrong."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import chronicals
from chronicals.attention import packed_attention_forward
from chronicals.training import ChronicalsTrainer, SetupError
from tests.training.helpers import config, rows, tokenizer

KERNELS_OFF = dict(rms_norm=False, swiglu=False, rope=False, linear_cross_entropy=False)
SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=1)
# Each with something the Llama family lacks: Phi-3's fused qkv/gate_up projections and partial rotary, GPT-2's
# learnt absolute positions, Gemma-3's alternating sliding-window layers (a window of 6 inside 19-token sequences).
OTHERS = {
    "phi3": dict(partial_rotary_factor=0.5),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gemma3_text": dict(head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
}


def other_model(model_type: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**SHAPE, **OTHERS.get(model_type, {}), **changes})
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg)
    # Sharper attention than the init's near-uniform weights, so a leak across sequences would show.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()  # GPT-2's attention dropout is on by default


@pytest.mark.parametrize("model_type", OTHERS)
def test_packed_attention_alone_keeps_each_sequence_to_itself(model_type):
    reference = other_model(model_type)
    packed = chronicals.apply(other_model(model_type), **KERNELS_OFF, packed_attention=True)
    assert packed.config._attn_implementation == "chronicals_varlen"
    g = torch.Generator().manual_seed(1)
    lengths = (19, 7, 11)
    seqs = [torch.randint(2, 96, (1, n), generator=g) for n in lengths]
    ids = torch.cat(seqs, 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = packed(input_ids=ids, position_ids=positions).logits
    start = 0
    for seq, n in zip(seqs, lengths):
        torch.testing.assert_close(logits[:, start:start + n], reference(input_ids=seq).logits, rtol=1e-4, atol=1e-4)
        start += n


def test_packed_gradients_match_the_sequences_run_one_by_one():
    reference, packed = other_model("phi3"), chronicals.apply(other_model("phi3"), **KERNELS_OFF)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(2, 96, (1, n), generator=g) for n in (13, 9)]
    sum(reference(input_ids=s, labels=s).loss * (s.shape[1] - 1) for s in seqs).backward()
    ids = torch.cat(seqs, 1)
    labels = ids.clone()
    labels[0, 13] = -100  # no prediction across the boundary: HF's shift has token 12 predict token 13
    positions = torch.cat([torch.arange(13), torch.arange(9)])[None]
    (packed(input_ids=ids, position_ids=positions, labels=labels).loss * 20).backward()
    for (name, p), q in zip(reference.named_parameters(), packed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)


def test_kernel_flags_on_another_architecture_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"cannot patch model_type 'phi3'.*rms_norm=False, swiglu=False, rope=False, "
                                         r"linear_cross_entropy=False, packed_attention alone"):
        chronicals.apply(other_model("phi3"))


@pytest.mark.parametrize("model_type, changes, match", [
    ("gemma2", dict(head_dim=8, attn_logit_softcapping=30.0), r"soft-caps its attention logits"),
    ("falcon", dict(), r"does not go through transformers' attention interface"),
])
def test_packed_attention_refuses_what_it_cannot_stand_in_for(model_type, changes, match):
    model = other_model(model_type, **changes)
    with pytest.raises(ValueError, match=match):
        chronicals.apply(model, **KERNELS_OFF)
    assert model.config._attn_implementation == "sdpa"  # refused before anything was patched


@pytest.mark.parametrize("extra, match", [
    (dict(softcap=30.0), "softcap"), (dict(s_aux=torch.zeros(2)), "s_aux"), (dict(is_causal=False), "is_causal"),
])
def test_the_attention_refuses_keywords_it_would_drop(extra, match):
    # Whoever sets the implementation by hand on such a model gets an error, not an attention without the feature.
    q = k = v = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        packed_attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=3, **extra)


def test_the_trainer_trains_another_architecture_with_its_own_modules_on_packed_rows(tmp_path):
    cfg = config(tmp_path, use_fused_kernels=True, use_sequence_packing=True, max_steps=6, learning_rate=3e-3)
    with pytest.warns(UserWarning, match="no fused kernels for model_type 'phi3'.*use_fused_kernels: false"):
        result = ChronicalsTrainer(other_model("phi3"), tokenizer(), cfg).train(rows(24))
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_the_trainer_names_the_field_when_packing_cannot_apply(tmp_path):
    with pytest.raises(SetupError, match="attention interface.*use_sequence_packing: false"):
        ChronicalsTrainer(other_model("falcon"), tokenizer(), config(tmp_path, use_sequence_packing=True)).train(rows())
    result = ChronicalsTrainer(other_model("falcon"), tokenizer(), config(tmp_path, max_steps=2)).train(rows())
    assert len(result.losses) == 2


def test_gpt2_with_its_default_attention_dropout_trains_on_packed_batches(tmp_path):
    # GPT-2's attn_pdrop (0.1 by default) was refused with packing on; packed attention now applies it per sequence.
    model = other_model("gpt2", attn_pdrop=0.1)
    cfg = config(tmp_path, use_sequence_packing=True, max_steps=2)
    result = ChronicalsTrainer(model, tokenizer(), cfg).train(rows())
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_lora_with_the_default_targets_adapts_every_linear_layer_of_a_model_that_names_them_otherwise(tmp_path):
    # Phi-3 has qkv_proj and gate_up_proj where Llama has q/k/v_proj and gate/up_proj: the default target names
    # matched only o_proj and down_proj, and the first missing one (q_proj) stopped the run.
    cfg = config(tmp_path, use_lora=True, lora_rank=4, max_steps=2)
    with pytest.warns(UserWarning, match="no module named q_proj, k_proj, v_proj, gate_proj, up_proj.*all-linear"):
        trainer = ChronicalsTrainer(other_model("phi3"), tokenizer(), cfg)
        trainer.train(rows())
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    named = config(tmp_path, use_lora=True, lora_rank=4, lora_target_modules=["q_proj"])
    with pytest.raises(SetupError, match="'q_proj' matches no module of Phi3ForCausalLM"):
        ChronicalsTrainer(other_model("phi3"), tokenizer(), named).train(rows())
