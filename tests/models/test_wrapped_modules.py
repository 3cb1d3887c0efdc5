"""Modules the patched forwards read directly (weights, eps) or compute in place of calling: the post-attention
RMSNorm (fused into the residual add), the lm_head (fused into the loss) and the MLP's act_fn and projections (one
fused SwiGLU op). A hooked or wrapped one (a user's hook, PEFT's LN tuning, DeepSpeed ZeRO-3 or accelerate
offloading) is called as HF calls it, so the loss and gradients stay HF's; plain ones still take the fused kernels."""

import copy

import pytest
import torch

import chronicals
import chronicals.kernels
from chronicals.models import build_model
from tests.conftest import DEVICE
from tests.models.test_patch import KERNEL_SHAPE, assert_same_training_step, needs_kernels


def count_calls(monkeypatch, name, module=chronicals.kernels):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def scale_output(module, args, output):
    return output * 2.0


def halve_input(module, args):
    return (args[0] * 0.5,)


HOOKS = {
    "post_attention_layernorm forward hook":
        lambda m: m.model.layers[0].post_attention_layernorm.register_forward_hook(scale_output),
    "post_attention_layernorm pre-hook":
        lambda m: m.model.layers[1].post_attention_layernorm.register_forward_pre_hook(halve_input),
    "lm_head forward hook": lambda m: m.lm_head.register_forward_hook(scale_output),
    "lm_head pre-hook": lambda m: m.lm_head.register_forward_pre_hook(halve_input),
    "mlp.act_fn forward hook": lambda m: m.model.layers[0].mlp.act_fn.register_forward_hook(scale_output),
    "mlp.act_fn pre-hook": lambda m: m.model.layers[1].mlp.act_fn.register_forward_pre_hook(halve_input),
    "mlp.gate_proj pre-hook": lambda m: m.model.layers[0].mlp.gate_proj.register_forward_pre_hook(halve_input),
    "mlp.up_proj forward hook": lambda m: m.model.layers[1].mlp.up_proj.register_forward_hook(scale_output),
    "mlp.down_proj forward hook": lambda m: m.model.layers[0].mlp.down_proj.register_forward_hook(scale_output),
}


@pytest.mark.parametrize("hook", HOOKS)
def test_a_hooked_module_read_by_a_fused_kernel_keeps_its_hook(hook):
    needs_kernels()
    reference = build_model("tiny-llama", seed=0).to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference))
    HOOKS[hook](reference)
    HOOKS[hook](patched)
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def test_plain_modules_still_take_the_fused_add_norm_and_loss(monkeypatch):
    needs_kernels()
    add_norm = count_calls(monkeypatch, "fused_add_rmsnorm")
    loss = count_calls(monkeypatch, "fused_linear_cross_entropy")
    reference = build_model("tiny-qwen3", seed=0).to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference))
    out = assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)
    assert out.logits is None
    assert len(add_norm) == patched.config.num_hidden_layers and len(loss) == 1


def test_layers_whose_class_fsdp2_swapped_still_take_the_fused_add_norm(monkeypatch):
    # fully_shard gives each sharded decoder layer a class of its own, defined in torch (FSDP<LayerClass>); the check
    # for a plain norm compared the norm's module with that class's, so under FSDP2 no layer took the fused add + norm.
    needs_kernels()
    add_norm = count_calls(monkeypatch, "fused_add_rmsnorm")
    reference = build_model("tiny-qwen3", seed=0).to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference))
    for layer in patched.model.layers:
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),),
                               {"__module__": "torch.distributed.fsdp._fully_shard._fully_shard"})
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)
    assert len(add_norm) == patched.config.num_hidden_layers


class DoubledSiLU(torch.nn.SiLU):
    """A wrapper of HF's activation, as a user's module (subclassing nn.SiLU, with a forward of its own)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


ACT_FNS = {
    "a subclass of nn.SiLU": DoubledSiLU,
    "another activation (GELU) put in its place": lambda: torch.nn.GELU(approximate="tanh"),
    "a replaced forward (accelerate's hook)": lambda: _with_own_forward(torch.nn.SiLU()),
}


def _with_own_forward(act):
    act.forward = lambda x: torch.nn.functional.silu(x) * 0.5
    return act


@pytest.mark.parametrize("act", ACT_FNS)
def test_a_replaced_act_fn_is_called_as_hf_calls_it(act):
    # The fused SwiGLU computed silu itself, whatever module mlp.act_fn held.
    needs_kernels()
    reference = build_model("tiny-llama", seed=0).to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference))
    for model in (reference, patched):
        model.model.layers[1].mlp.act_fn = ACT_FNS[act]()
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def test_a_hooked_act_fn_between_lora_wrapped_projections_keeps_its_hook():
    # LoRA on gate/up (PEFT's layers, no chronicals.lora fusion): the projections stay module calls and
    # silu(gate) * up was one kernel that skipped act_fn's hook.
    needs_kernels()
    from peft import LoraConfig, get_peft_model

    def lora_model():
        config = LoraConfig(r=4, target_modules=["gate_proj", "up_proj"], init_lora_weights=False)
        model = get_peft_model(build_model("tiny-llama", seed=0).to(DEVICE), config)
        model.get_base_model().model.layers[0].mlp.act_fn.register_forward_hook(scale_output)
        return model

    reference, patched = lora_model(), lora_model()
    patched.load_state_dict(reference.state_dict())
    chronicals.apply(patched)
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def test_plain_mlps_still_take_the_fused_swiglu_also_under_fsdp2s_classes(monkeypatch):
    # The check looks at the act_fn module alone: fully_shard's FSDP<Class> swap of a layer (or of an MLP) keeps it.
    needs_kernels()
    import chronicals.kernels.swiglu_mlp

    mlp_calls = count_calls(monkeypatch, "fused_swiglu_mlp", chronicals.kernels.swiglu_mlp)
    swiglu_calls = count_calls(monkeypatch, "fused_swiglu")
    reference = build_model("tiny-qwen3", seed=0).to(DEVICE)
    patched = chronicals.apply(copy.deepcopy(reference))
    for layer in patched.model.layers:
        for module in (layer, layer.mlp):
            module.__class__ = type(f"FSDP{type(module).__name__}", (type(module),),
                                    {"__module__": "torch.distributed.fsdp._fully_shard._fully_shard"})
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)
    assert len(mlp_calls) == patched.config.num_hidden_layers and swiglu_calls == []


def test_peft_ln_tuning_of_the_post_attention_norm_trains_as_in_hf():
    # PEFT's LN tuning wraps each norm in a layer with a trainable copy (no `variance_epsilon`): the fused add + norm
    # failed on it with an AttributeError.
    needs_kernels()
    from peft import LNTuningConfig, get_peft_model

    def ln_tuned():
        model = get_peft_model(build_model("tiny-llama", seed=0).to(DEVICE),
                               LNTuningConfig(target_modules=["post_attention_layernorm"]))
        with torch.no_grad():  # the trained copies differ from the frozen base norms
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        return model

    with pytest.warns(UserWarning, match="Unsupported layer type"):  # PEFT's own note on RMSNorm
        reference, patched = ln_tuned(), ln_tuned()
    chronicals.apply(patched)
    assert_same_training_step(reference, patched, shape=KERNEL_SHAPE)


def test_a_model_dispatched_by_accelerate_keeps_its_hooks(tmp_path):
    # from_pretrained(device_map=...) wraps each module's forward in accelerate's hook (move inputs, load offloaded
    # weights, then `_old_forward`). `apply` replaced that forward, so an offloaded layer ran on meta weights:
    # "weight is on meta but hidden_states is on cpu". The patched forwards now go inside the hook.
    needs_kernels()
    from transformers import AutoModelForCausalLM

    reference = build_model("tiny-llama", seed=0)
    reference.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                      offload_folder=tmp_path / "offload")
    chronicals.apply(dispatched)
    ids = torch.randint(0, reference.config.vocab_size, KERNEL_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(dispatched.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    attention = dispatched.model.layers[1].self_attn  # patched, inside the hook
    assert attention._old_forward.func is chronicals.models.rope.rope_attention_forward
