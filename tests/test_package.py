import pytest

import chronicals
from chronicals.models import PRESETS, build_model, preset_config


def test_version_is_set():
    assert isinstance(chronicals.__version__, str) and chronicals.__version__.count(".") == 2


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny-")])
def test_tiny_presets_build_and_run(name):
    import torch

    model = build_model(name, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 7, model.config.vocab_size)
    assert torch.isfinite(out.loss)


def test_real_shapes_have_their_published_sizes():
    # Parameter counts from the configs alone (no weights): these are the published model sizes.
    def n_params(cfg):
        h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if cfg.model_type == "qwen2":
            attn += q + 2 * kv  # q/k/v biases
        per_layer = attn + 3 * h * i + 2 * h
        emb = v * h * (1 if cfg.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    assert abs(n_params(preset_config("qwen2.5-0.5b")) / 1e6 - 494) < 2
    assert abs(n_params(preset_config("llama-3.2-1b")) / 1e6 - 1236) < 2
    assert abs(n_params(preset_config("llama-3.1-8b")) / 1e9 - 8.03) < 0.01


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-9'.*qwen2.5-0.5b"):
        preset_config("gpt-9")
