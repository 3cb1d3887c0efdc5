"""Saving in PEFT's format, loading in PEFT with identical logits, and merging into the base weights."""

import json

import pytest
import torch
from lora_blocks import graph_names
from peft import PeftModel
from safetensors.torch import load_file

from chronicals.lora import LoRAConfig, apply_lora, load_lora, merge_lora, save_lora
from chronicals.models import build_model

IDS = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))


def _trained(cfg):
    model = apply_lora(build_model("tiny-llama", dtype=torch.float32, seed=0), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # as if trained: B nonzero, magnitudes moved
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_saved_adapters_load_in_peft_with_identical_logits(tmp_path, use_dora):
    model = _trained(LoRAConfig(rank=4, alpha=8, use_dora=use_dora))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    save_lora(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"] is use_dora
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert use_dora == ("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in keys)

    peft_model = PeftModel.from_pretrained(build_model("tiny-llama", dtype=torch.float32, seed=0), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-5)
        reloaded = load_lora(build_model("tiny-llama", dtype=torch.float32, seed=0), tmp_path).eval()
        assert torch.equal(reloaded(input_ids=IDS).logits, logits)
        kconcat = load_lora(build_model("tiny-llama", dtype=torch.float32, seed=0), tmp_path, fused_kconcat=True)
        torch.testing.assert_close(kconcat.eval()(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-5)
    assert any(m.__dict__.get("_chronicals_kconcat") for m in kconcat.modules())
    assert not any(m.__dict__.get("_chronicals_kconcat") for m in reloaded.modules())
    assert any(p.requires_grad for p in reloaded.parameters())


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_gives_identical_logits_and_a_plain_model(use_dora):
    model = _trained(LoRAConfig(rank=4, alpha=8, use_dora=use_dora))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        merged = merge_lora(model)
        assert not any("lora" in n for n, _ in merged.named_modules())
        assert not any(k.startswith("_chronicals") for m in merged.modules() for k in m.__dict__)
        out = merged(input_ids=IDS).logits
    torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    assert type(merged).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_merge_and_unload_of_a_fused_model_gives_identical_logits(use_dora):
    """PEFT's own merge_and_unload (not merge_lora) puts plain nn.Linear layers back under the MLP whose forward
    install_fused replaced: that forward must fall back instead of reading adapter state off them."""
    model = _trained(LoRAConfig(rank=4, alpha=8, use_dora=use_dora))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        merged = model.merge_and_unload()
        assert type(merged.model.layers[0].mlp.gate_proj) is torch.nn.Linear
        torch.testing.assert_close(merged(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_fused_lora_model_survives_torch_save(tmp_path):
    model = _trained(LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    mlp = loaded.base_model.model.model.layers[0].mlp
    assert mlp.forward.args == (mlp,) and "_LoRASwiGLUMLPBackward" in graph_names(loaded(input_ids=IDS).logits)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, logits)


def test_load_and_save_reject_wrong_inputs(tmp_path):
    with pytest.raises(TypeError, match="apply_lora"):
        save_lora(build_model("tiny-llama", seed=0), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(build_model("tiny-llama", seed=0), tmp_path / "missing")
    with pytest.raises(ValueError, match=r"fused_kconcat=True\) .* needs fused=True"):
        load_lora(build_model("tiny-llama", seed=0), tmp_path, fused=False, fused_kconcat=True)


def test_fused_forward_is_used_after_loading(tmp_path):
    save_lora(_trained(LoRAConfig(rank=4, alpha=8)), tmp_path)
    model = load_lora(build_model("tiny-llama", dtype=torch.float32, seed=0), tmp_path).train()
    assert "_LoRASwiGLUMLPBackward" in graph_names(model(input_ids=IDS).logits)


def test_load_onto_a_model_that_already_carries_adapters_is_refused(tmp_path):
    # The PeftModel from apply_lora (or its base, which holds PEFT's layers) was wrapped in a second PeftModel whose
    # key names matched none of the saved ones: the saved weights were silently not loaded (logits off by ~0.8).
    save_lora(_trained(LoRAConfig(rank=4, alpha=8)), tmp_path)
    adapted = apply_lora(build_model("tiny-llama", dtype=torch.float32, seed=0), LoRAConfig(rank=4, alpha=8))
    for model in (adapted, adapted.base_model.model):
        with pytest.raises(ValueError, match="already carries LoRA adapters.*plain base model"):
            load_lora(model, tmp_path)


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens", "q_proj"]])
def test_merge_refuses_an_adapter_on_a_tied_weight(targets):
    # With tied embeddings (Llama-3.2-1B/3B, small Qwen2.5/Qwen3, Gemma) lm_head and embed_tokens hold one matrix:
    # PEFT's merge folded the head's (or the embedding's) adapter into it, changing the other layer too, and the
    # merged model's logits were off by ~3 with only a warning. The unmerged adapters stay usable.
    model = apply_lora(build_model("tiny-llama", dtype=torch.float32, seed=0, tie_word_embeddings=True),
                       LoRAConfig(rank=4, alpha=8, target_modules=targets))
    head, embed = model.get_base_model().lm_head, model.get_base_model().model.embed_tokens
    assert getattr(head, "base_layer", head).weight is getattr(embed, "base_layer", embed).weight
    with pytest.raises(ValueError, match=r"merge_lora: .*(lm_head|embed_tokens).* tied .*save_lora"):
        merge_lora(model)
    assert model(input_ids=IDS).logits.isfinite().all()  # untouched: still the adapted model


def test_merge_of_untied_layers_of_a_tied_model_is_allowed():
    model = apply_lora(build_model("tiny-llama", dtype=torch.float32, seed=0, tie_word_embeddings=True),
                       LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        logits = model.eval()(input_ids=IDS).logits
        torch.testing.assert_close(merge_lora(model)(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-5)
