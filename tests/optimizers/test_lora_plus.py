"""LoRA+ parameter groups: exact membership, learning rates and weight decay, for our adapters and PEFT's."""

import pytest
import torch
from peft import get_peft_model

from chronicals.lora import LoRAConfig, apply_lora, peft_config
from chronicals.models import build_model
from chronicals.optimizers import FusedAdamW, create_lora_plus_optimizer, lora_plus_param_groups


def _model(kind: str, use_dora: bool = False):
    base = build_model("tiny-qwen2", dtype=torch.float32, seed=0)  # q/k/v carry biases
    cfg = LoRAConfig(rank=4, alpha=8, use_dora=use_dora)
    model = apply_lora(base, cfg) if kind == "ours" else get_peft_model(base, peft_config(cfg, task_type="CAUSAL_LM"))
    inner = model.base_model.model.model
    inner.norm.weight.requires_grad_(True)  # a trainable norm and bias besides the adapters
    inner.layers[0].self_attn.q_proj.base_layer.bias.requires_grad_(True)
    return model


@pytest.mark.parametrize("kind", ["ours", "peft"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_learning_rates_and_decay_are_exact(kind, use_dora):
    model = _model(kind, use_dora)
    opt = create_lora_plus_optimizer(model, base_lr=2e-4, lr_ratio=16, weight_decay=0.01)
    assert isinstance(opt, FusedAdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(sum(members.values(), [])) == trainable  # every trainable parameter exactly once

    assert groups["lora_B"]["lr"] == pytest.approx(2e-4 * 16) and groups["lora_B"]["weight_decay"] == 0.01
    assert members["lora_B"] == sorted(n for n in trainable if ".lora_B." in n)
    assert groups["default"]["lr"] == pytest.approx(2e-4) and groups["default"]["weight_decay"] == 0.01
    assert members["default"] == sorted(n for n in trainable if ".lora_A." in n)
    assert groups["no_decay"]["lr"] == pytest.approx(2e-4) and groups["no_decay"]["weight_decay"] == 0.0
    expected_no_decay = ["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
                         "base_model.model.model.norm.weight"]
    if use_dora:
        expected_no_decay += [n for n in trainable if "lora_magnitude_vector" in n]
    assert members["no_decay"] == sorted(expected_no_decay)
    assert "lora_B_no_decay" not in groups


def test_ours_and_peft_give_the_same_groups():
    ours = lora_plus_param_groups(_model("ours"), base_lr=1e-4, lr_ratio=8, weight_decay=0.1)
    peft = lora_plus_param_groups(_model("peft"), base_lr=1e-4, lr_ratio=8, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in ours] == \
        [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in peft]


def test_dora_magnitudes_of_conv_layers_are_not_decayed():
    # PEFT keeps a conv layer's DoRA magnitude as (1, out_channels, 1, 1), not a vector: it went to the "default"
    # group with weight decay, where the docs put every DoRA magnitude in "no_decay".
    from peft import LoraConfig

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"])
              for g in lora_plus_param_groups(model, base_lr=1e-3, lr_ratio=16, weight_decay=0.1)}
    assert groups["no_decay"] == ["base_model.model.0.lora_magnitude_vector.default.weight",
                                  "base_model.model.2.lora_magnitude_vector.default.weight"]
    assert groups["default"] == ["base_model.model.0.lora_A.default.weight", "base_model.model.2.lora_A.default.weight"]


def test_lora_plus_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no trainable LoRA B matrices"):
        create_lora_plus_optimizer(build_model("tiny-llama", seed=0))
    model = _model("ours")
    with pytest.raises(ValueError, match="base_lr must be a finite positive number"):
        create_lora_plus_optimizer(model, base_lr=0)
    with pytest.raises(ValueError, match="lr_ratio must be a finite positive number"):
        create_lora_plus_optimizer(model, lr_ratio=-1)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        create_lora_plus_optimizer(model, weight_decay=-0.1)
    # torch.optim checks only the default lr, not each group's: an inf or NaN B-matrix rate made NaN weights.
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr_ratio must be a finite positive number"):
            create_lora_plus_optimizer(model, lr_ratio=bad)
    with pytest.raises(ValueError, match="base_lr must be a finite positive number"):
        create_lora_plus_optimizer(model, base_lr=float("inf"))
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        create_lora_plus_optimizer(model, weight_decay=float("inf"))
    with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
        create_lora_plus_optimizer(model, optimizer="sgdx")
