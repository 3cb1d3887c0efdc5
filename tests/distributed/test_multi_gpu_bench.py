"""The multi-GPU benchmark's driver logic on fabricated runs: scaling against the smallest world size, the
harness verification of each run's losses against it, and the table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import multi_gpu  # noqa: E402


def run(world, tok_s, losses, weights_changed=0.9):
    steps = [{"loss": v, "grad_norm": 1.0 + 0.1 * i, "label_tokens": 100 * world, "real_tokens": 100 * world}
             for i, v in enumerate(losses)]
    return {"status": "ok", "world_size": world, "strategy": "fsdp2" if world > 1 else "none", "steps": steps,
            "tokens_per_s_per_gpu": tok_s, "median_step_ms": 10.0, "peak_mem_gib_per_gpu": [1.0] * world,
            "weights_changed": weights_changed}


def test_scaling_and_verification_against_the_smallest_run(capsys):
    runs = [run(1, 1000.0, [11.8, 11.7, 11.6]), run(2, 950.0, [11.81, 11.69, 11.62]),
            run(4, 900.0, [11.8, 12.4, 11.6]), {"status": "timeout 200s", "world_size": 8}]
    multi_gpu._verify_and_scale(runs)
    assert [r.get("scaling_efficiency") for r in runs] == [1.0, 0.95, 0.9, None]
    assert runs[0]["failures"] == [] and runs[1]["failures"] == []
    assert runs[2]["failures"] and "loss 12.4 vs reference 11.7" in runs[2]["failures"][0]
    multi_gpu._print_table("llama-3.2-1b", runs)
    table = capsys.readouterr().out
    assert "95.0%" in table and "FAILED: step 1: loss" in table and "timeout 200s" in table


def test_unmoved_weights_fail_verification():
    runs = [run(1, 1000.0, [11.8, 11.7]), run(2, 990.0, [11.8, 11.7], weights_changed=0.0)]
    multi_gpu._verify_and_scale(runs)
    assert any("weights did not change" in f for f in runs[1]["failures"])
