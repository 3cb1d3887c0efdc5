"""Data (deterministic from the seed, both layouts counting the same real tokens) and metrics (the FLOP convention
by hand, quantiles against numpy, MFU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chronicals.training import flops
from harness import data, metrics


def test_steps_are_a_pure_function_of_the_seed():
    a = data.make_steps("varlen", 3, 4, 50, 5, 100, seed=7)
    b = data.make_steps("varlen", 3, 4, 50, 5, 100, seed=7)
    c = data.make_steps("varlen", 3, 4, 50, 5, 100, seed=8)
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    assert any(not torch.equal(x, y) for sa, sc in zip(a, c) for x, y in zip(sa, sc))
    lengths = [s.numel() for step in a for s in step]
    assert min(lengths) >= 5 and max(lengths) <= 50 and len(set(lengths)) > 1
    assert all(int(s.min()) >= 1 and int(s.max()) < 100 for step in a for s in step)  # never the pad id
    fixed = data.make_steps("fixed", 2, 3, 17, 5, 100, seed=0)
    assert {s.numel() for step in fixed for s in step} == {17}


def test_text_kind_is_real_text_at_random_lengths():
    steps = data.make_steps("text", 2, 3, 64, 8, 4096, seed=0)
    from chronicals.data import default_tokenizer

    text = default_tokenizer().decode(steps[0][0])
    assert sum(c.isalpha() for c in text) > len(text) / 3
    with pytest.raises(ValueError, match="vocab_size is 512"):
        data.make_steps("text", 1, 1, 64, 8, 512, seed=0)


def test_layouts_count_the_same_real_tokens():
    seqs = [torch.arange(1, 6), torch.arange(1, 4), torch.arange(1, 10)]
    padded, packed = data.collate(seqs, "padded"), data.collate(seqs, "packed")
    assert data.label_tokens(padded) == data.label_tokens(packed) == data.real_tokens(seqs) == 4 + 2 + 8
    assert padded["input_ids"].shape == (3, 9) and padded["attention_mask"].sum() == 17
    assert packed["input_ids"].shape == (1, 17)
    assert packed["cu_seq_lens_q"].tolist() == [0, 5, 8, 17] and packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert packed["labels"][0, [0, 5, 8]].tolist() == [-100] * 3 and packed["max_length_q"] == 9
    same = data.collate([torch.arange(1, 5)] * 2, "padded")
    assert "attention_mask" not in same and data.label_tokens(same) == 6


SHAPE = metrics.Shape(hidden=8, intermediate=20, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=50)


def test_flop_convention_by_hand():
    # per layer: q 8*8, k 8*4, v 8*4, o 8*8, gate/up 8*20 each, down 20*8 -> 64+32+32+64+480 = 672; x2 layers + lm_head
    n = 2 * 672 + 50 * 8
    assert SHAPE.linear_params() == n
    attention = 2 * 6 * (10**2 + 3**2) * 2 * 4  # layers * 6 L^2 H d, per sequence
    assert metrics.step_flops(SHAPE, [10, 3], "full") == 6 * n * 13 + attention
    lora = 2 * 4 * sum(a + b for a, b in [(8, 8), (8, 4), (8, 4), (8, 8), (8, 20), (8, 20), (20, 8)])
    assert SHAPE.lora_params(4) == lora
    assert metrics.step_flops(SHAPE, [10, 3], "lora", 4) == (4 * n + 6 * lora) * 13 + attention


def test_shape_from_a_real_preset_config():
    from chronicals.models.presets import preset_config

    shape = metrics.Shape.from_config(preset_config("qwen2.5-0.5b").to_dict())
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (14, 2, 64)
    assert 490e6 < shape.linear_params() < 500e6  # 494M parameters, the lm_head tied to the embedding


def test_quantiles_match_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 10.0, 3.0]
    for q in (0.2, 0.5, 0.8):
        assert metrics.quantile(xs, q) == pytest.approx(np.quantile(xs, q))


def test_speed_uses_real_tokens_and_both_peaks():
    timed = [{"time_ms": 100.0, "real_tokens": 1000, "label_tokens": 5000}] * 3
    s = metrics.speed(timed, [1e14] * 3, "NVIDIA H200", ceiling_tflops=800.0)
    assert s["tokens_per_s"].median == pytest.approx(10000.0)
    assert s["tflops"].median == pytest.approx(1000.0)
    assert s["mfu_datasheet"].median == pytest.approx(1000.0 / 989.0)
    assert s["mfu_measured"].median == pytest.approx(1000.0 / 800.0)
    assert "mfu_datasheet" not in metrics.speed(timed, [1e14] * 3, None, None)


@pytest.mark.parametrize("gpu, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA B300", None), ("", None), (None, None),
])
def test_datasheet_peak_is_the_most_specific_match(gpu, peak, monkeypatch):
    """'NVIDIA H100 NVL' and 'NVIDIA H200 NVL' matched the SXM parts' 989 TFLOP/s, overstating their peak (835) and
    so understating their datasheet MFU; the longest fragment a name contains wins, whatever the table's order."""
    assert metrics.datasheet_peak(gpu) == peak
    monkeypatch.setattr(flops, "DATASHEET_BF16", dict(reversed(flops.DATASHEET_BF16.items())))
    assert metrics.datasheet_peak(gpu) == peak
    timed = [{"time_ms": 100.0, "real_tokens": 1000}] * 3
    s = metrics.speed(timed, [1e14] * 3, gpu, None)
    assert (s["mfu_datasheet"].median == pytest.approx(1000.0 / peak)) if peak else ("mfu_datasheet" not in s)
