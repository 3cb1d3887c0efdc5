"""apply_lora on a real (tiny) Llama: the fused model matches PEFT's own, bad configs fail before training."""

import copy
from dataclasses import replace

import pytest
import torch
from lora_blocks import BF16_GRAD_FACTOR, BF16_OUT_FACTOR, graph_names
from oracle import assert_no_worse
from peft import get_peft_model

from chronicals.lora import DEFAULT_TARGET_MODULES, LoRAConfig, apply_lora, check_targets, peft_config
from chronicals.models import build_model


def _tiny(dtype=torch.float32):
    return build_model("tiny-llama", dtype=dtype, seed=0)


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fused_model_matches_peft_logits_and_gradients(use_rslora):
    cfg = LoRAConfig(rank=8, alpha=16, use_rslora=use_rslora)
    base = _tiny()
    ours = apply_lora(copy.deepcopy(base), cfg)
    _randomize_b(ours)
    ref = get_peft_model(base, peft_config(cfg, task_type="CAUSAL_LM"))
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    logits, grads = _loss_and_grads(ours, ids)
    ref_logits, ref_grads = _loss_and_grads(ref, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    names = graph_names(ours(input_ids=ids).logits)
    assert {"_LoRASwiGLUMLPBackward", "_LoRAFanOutBackward"} <= names
    expected = 16 / 8 ** 0.5 if use_rslora else 16 / 8
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(expected)
    assert cfg.scale == pytest.approx(expected)


def test_documented_use_with_dropout_trains_on_the_plain_path():
    targets = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = apply_lora(_tiny(), LoRAConfig(rank=64, alpha=16, dropout=0.05, target_modules=targets))
    ids = torch.randint(0, 512, (2, 11))
    out = model(input_ids=ids, labels=ids)
    assert "_LoRASwiGLUMLPBackward" not in graph_names(out.loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = LoRAConfig(rank=4, alpha=8)
    plain = apply_lora(_tiny(), cfg)
    _randomize_b(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    ckpt.train()
    ids = torch.randint(0, 512, (2, 13))
    _, g1 = _loss_and_grads(plain, ids)
    _, g2 = _loss_and_grads(ckpt, ids)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)


def test_default_targets_are_every_linear_layer_of_the_block():
    model = apply_lora(_tiny(), LoRAConfig())
    layer = model.base_model.model.model.layers[1]
    for name in DEFAULT_TARGET_MODULES:
        owner = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
        assert hasattr(getattr(owner, name), "lora_A"), name
    assert not hasattr(model.base_model.model.lm_head, "lora_A")


def test_all_linear_shorthand_adapts_every_linear_layer_but_the_head_as_peft_does(tmp_path):
    from peft import PeftModel

    from chronicals.lora import save_lora

    model = apply_lora(_tiny(), LoRAConfig(rank=4, target_modules="all-linear"))
    layer = model.base_model.model.model.layers[1]
    for name in DEFAULT_TARGET_MODULES:
        owner = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
        assert hasattr(getattr(owner, name), "lora_A"), name
    assert not hasattr(model.base_model.model.lm_head, "lora_A")
    ref = get_peft_model(_tiny(), peft_config(LoRAConfig(rank=4), task_type="CAUSAL_LM"))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in ref.named_parameters() if p.requires_grad)
    _randomize_b(model)
    save_lora(model, tmp_path)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(_tiny(), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert LoRAConfig(target_modules=["ALL-LINEAR"]).target_modules == ["all-linear"]
    with pytest.raises(ValueError, match="'all-linear' already names every linear layer.*pass it alone"):
        LoRAConfig(target_modules=["all-linear", "lm_head"])


def test_bad_configs_fail_before_training_with_clear_errors():
    with pytest.raises(ValueError, match=r"target_modules entry 'qkv' matches no module.*q_proj"):
        apply_lora(_tiny(), LoRAConfig(target_modules=["q_proj", "qkv"]))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"rank=40 is larger than layer .*k_proj.*at most 32"):
        apply_lora(_tiny(), LoRAConfig(rank=40))
    with pytest.raises(ValueError, match="Embedding: DoRA supports only torch.nn.Linear"):
        apply_lora(_tiny(), LoRAConfig(rank=4, use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        LoRAConfig(target_modules=[])
    with pytest.raises(TypeError, match="LoRAConfig"):
        apply_lora(_tiny(), {"rank": 8})
    # peft.LoraConfig's keywords: the field meant here, not the generated __init__'s bare "unexpected keyword".
    with pytest.raises(TypeError, match="peft.LoraConfig's 'r' is 'rank' here"):
        LoRAConfig(r=8, lora_alpha=16)
    with pytest.raises(TypeError, match=r"LoRAConfig has no field 'bias' \(fields: alpha, dropout"):
        LoRAConfig(rank=8, bias="none")
    model = apply_lora(_tiny(), LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        apply_lora(model.base_model.model, LoRAConfig(rank=4))


def test_autocast_with_frozen_bf16_base_and_fp32_adapters_uses_the_fused_path():
    # The trainer's setup: frozen weights cast to the compute dtype, adapters fp32, forward under autocast.
    cfg = LoRAConfig(rank=4, alpha=8)
    ours = apply_lora(_tiny(), cfg)
    _randomize_b(ours)
    native = get_peft_model(_tiny(), peft_config(cfg, task_type="CAUSAL_LM"))
    native.load_state_dict(ours.state_dict())
    ref = copy.deepcopy(native).double()
    for model in (ours, native):
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {"_LoRASwiGLUMLPBackward", "_LoRAFanOutBackward"} <= graph_names(ours(input_ids=ids).logits)
        logits, grads = _loss_and_grads(ours, ids)
        nat_logits, nat_grads = _loss_and_grads(native, ids)
    ref_logits, ref_grads = _loss_and_grads(ref, ids)
    assert_no_worse("logits", logits, nat_logits, ref_logits, torch.bfloat16, factor=BF16_OUT_FACTOR)
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        assert_no_worse(name, grads[name], nat_grads[name], ref_grads[name], torch.bfloat16, factor=BF16_GRAD_FACTOR)


def test_composes_with_chronicals_apply_patches():
    import chronicals

    cfg = LoRAConfig(rank=4, alpha=8)
    base = _tiny()
    ref = get_peft_model(copy.deepcopy(base), peft_config(cfg, task_type="CAUSAL_LM"))
    ours = apply_lora(chronicals.apply(base, packed_attention=False), cfg)
    _randomize_b(ours)
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(2))
    out = ours(input_ids=ids, labels=ids)
    names = graph_names(out.loss)
    # The fused LoRA MLP replaced the patched MLP forward; the patched attention got q/k/v from the fused op.
    assert {"_LoRASwiGLUMLPBackward", "_LoRAFanOutBackward"} <= names
    out.loss.backward()
    expected = ref(input_ids=ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_install_fused_again_reinstalls_instead_of_stacking():
    """A second install_fused (here to switch to kconcat) kept the first install's fused MLP forward as the one to
    fall back to: with the adapters disabled the MLP called itself until RecursionError, and remove_fused left the
    attention's q/k/v rerouted to a group it had removed (AttributeError)."""
    from chronicals.lora import install_fused, remove_fused

    cfg = LoRAConfig(rank=4, alpha=8)
    ours = apply_lora(_tiny(), cfg)
    _randomize_b(ours)
    ref = get_peft_model(_tiny(), peft_config(cfg, task_type="CAUSAL_LM"))
    ref.load_state_dict(ours.state_dict())
    assert install_fused(ours, kconcat=True) == install_fused(apply_lora(_tiny(), cfg))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    assert "_LoRASwiGLUMLPKConcatBackward" in graph_names(ours(input_ids=ids).logits)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
        remove_fused(ours)
        assert not any("forward" in vars(m) for m in ours.modules())
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_alpha_must_be_finite(alpha):
    # A NaN or infinite alpha passed (NaN fails every comparison) and made every adapted output NaN or inf.
    with pytest.raises(ValueError, match="LoRAConfig.alpha must be a finite positive number"):
        LoRAConfig(alpha=alpha)


def test_target_modules_none_names_the_field():
    # None (PEFT's "pick defaults for this model type") failed with "'NoneType' object is not iterable".
    with pytest.raises(ValueError, match="LoRAConfig.target_modules must be a non-empty list"):
        LoRAConfig(target_modules=None)


class _HeadedBlock(torch.nn.Module):
    """Not a transformers PreTrainedModel, but with get_output_embeddings() (PEFT's all-linear adapts its head)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.lm_head(self.body(x))

    def get_output_embeddings(self):
        return self.lm_head


def test_all_linear_checks_the_layers_peft_adapts():
    # check_targets left out the head of any model with get_output_embeddings(), while PEFT leaves it out of a
    # PreTrainedModel only: the head was adapted unchecked (rank 4 on a 3-output layer went through).
    config = LoRAConfig(rank=2, target_modules="all-linear")
    adapted = {n.removeprefix("base_model.model.") for n, m in apply_lora(_HeadedBlock(), config).named_modules()
               if hasattr(m, "lora_A")}
    assert sorted(check_targets(_HeadedBlock(), config)) == sorted(adapted) == ["body", "lm_head"]
    with pytest.raises(ValueError, match=r"rank=4 is larger than layer 'lm_head' \(8 x 3\)"):
        apply_lora(_HeadedBlock(), LoRAConfig(rank=4, target_modules="all-linear"))



class _ClampedMLP(torch.nn.Module):
    """DeepSeek-V4's / Step3p7's MLP shape: HF's layer names and SiLU, with the gate and up outputs clamped."""

    def __init__(self, d, inter, limit=0.05):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(d, inter), torch.nn.Linear(d, inter)
        self.down_proj, self.act_fn, self.limit = torch.nn.Linear(inter, d), torch.nn.SiLU(), limit

    def forward(self, x):
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(self.act_fn(gate) * up)


def _falcon_h1_mlp():
    from transformers import FalconH1Config
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1MLP

    return FalconH1MLP(FalconH1Config(hidden_size=16, intermediate_size=24, mlp_multipliers=[0.5, 2.0]))


@pytest.mark.parametrize("make", [_falcon_h1_mlp, lambda: _ClampedMLP(16, 24)], ids=["falcon_h1", "clamped"])
def test_an_mlp_whose_forward_does_more_keeps_it(make):
    # Any module with gate/up/down LoRA layers and a SiLU act_fn had its forward replaced by the fused
    # down(silu(gate(x)) * up(x)): Falcon-H1's multipliers or the clamps were silently dropped (outputs off by ~0.1
    # at PEFT's initialisation, B = 0, where the adapted model must equal the base one).
    torch.manual_seed(0)
    base = make().requires_grad_(False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    lora = LoRAConfig(rank=2, target_modules=["gate_proj", "up_proj", "down_proj"])

    def adapted(cfg):
        torch.manual_seed(1)  # the same random A in both
        return apply_lora(copy.deepcopy(base), cfg)

    ours, peft = adapted(lora), adapted(replace(lora, fused=False))
    torch.testing.assert_close(ours(x), base(x))
    for model in (ours, peft):
        _randomize_b(model)
    y, y_peft = ours(x), peft(x)
    torch.testing.assert_close(y, y_peft)
    assert "_LoRAFanOutBackward" in graph_names(y)  # gate|up still one fused op, only the MLP op is not used
    grads = [torch.autograd.grad(out.square().sum(), [x, *(p for p in m.parameters() if p.requires_grad)])
             for out, m in ((y, ours), (y_peft, peft))]
    for g, g_peft in zip(*grads):
        torch.testing.assert_close(g, g_peft)
