"""On a CUDA host: every backend trains a small model through the real runner (a subprocess each) and passes
verification against the reference, in full fine-tuning and LoRA. A peer library that is not installed may be
'unavailable', nothing else. Run: CHRONICALS_TEST_DEVICE=cuda pytest -q -m gpu tests/harness"""

from __future__ import annotations

import pytest
import torch

from harness import scenario
from harness.runner import run_scenario

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from chronicals.data import default_tokenizer
    from chronicals.models.presets import build_model

    path = tmp_path_factory.mktemp("ckpt")
    # vocab as large as the shipped tokenizer's, so no loader resizes the embedding
    build_model("tiny-qwen2", dtype=torch.bfloat16, seed=0, vocab_size=4096, hidden_size=128,
                intermediate_size=352).save_pretrained(path)
    default_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_every_backend_passes_verification_on_the_gpu(checkpoint, tmp_path, mode):
    sc = scenario.parse({
        "name": f"gpu-{mode}", "device": "cuda", "timeout_s": 300,
        "backends": ["torch", "torch_compile", "liger", "unsloth", "chronicals"],
        "model": {"path": checkpoint},
        "train": {"mode": mode, "lora_rank": 8, "lora_alpha": 16, "batch_size": 4, "seq_len": 256, "steps": 8,
                  "warmup": 2, "lr": 3e-4},
    })
    outcomes = run_scenario(sc, tmp_path / "gpu.jsonl", log=print)
    for o in outcomes:
        if o.run.backend in ("liger", "unsloth") and o.status == "unavailable" and "cannot import" in o.reason:
            continue
        assert o.status == "ok", (o.run.backend, o.status, o.reason)
        assert o.speed["tokens_per_s"].median > 0 and "mfu_measured" in o.speed
