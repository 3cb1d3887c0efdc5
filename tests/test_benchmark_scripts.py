"""The GPU benchmark scripts' CPU mode (correctness checks at tiny shapes under the Triton interpreter): a script
that crashes or fails its own checks here would waste a GPU call. Also the packing table when the default
backend could not run (it crashed printing, after the measurements, on the H100 run of 2026-12-06)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import kernel_ops, linear_cross_entropy, packing  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU the scripts time for real")


@pytest.mark.parametrize("script, result", [(kernel_ops, "kernels.json"), (packing, "packing.json"),
                                            (linear_cross_entropy, "linear_cross_entropy.json")])
def test_cpu_mode_runs_its_checks_and_writes_its_results(tmp_path, script, result, capsys):
    assert script.main(["--out", str(tmp_path), "--quick"]) in (0, None)
    rows = json.loads((tmp_path / result).read_text())
    assert rows["provenance"]["argv"] is not None
    checks = rows.get("checks") or rows.get("rows")
    assert checks, f"{result} holds no checks"
    assert "wrote" in capsys.readouterr().out


def test_packing_table_when_the_default_backend_failed(capsys):
    res = {"facts": {"default_backend": "flash_attn_cute"}, "checks": [
        {"check": "varlen flash_attn_cute", "error": float("nan"), "bound": float("nan"), "ok": False, "gate": True,
         "reason": "ModuleNotFoundError: No module named 'cutlass.cute'"}],
        "attention": {"tokens": 4096, "sequences": 3, "min_len": 32, "max_len": 2048, "default_vs_dense": None,
                      "meets_target": False, "rows": [
                          {"variant": "dense causal SDPA (GQA native)", "status": "ok", "ms": 0.8, "vs_dense": 1.0},
                          {"variant": "packed flash_attn_cute", "status": "unavailable", "reason": "no cutlass"},
                          {"variant": "packed torch_varlen", "status": "ok", "ms": 1.1, "vs_dense": 1.375,
                           "first_call_new_layout_ms": 1.9}]}}
    packing.print_table(res)
    out = capsys.readouterr().out
    assert "flash_attn_cute, xnan of dense -> target <= 1.10: MISS" in out
    assert "first call, new layout 1.9 ms" in out


@pytest.mark.parametrize("op", ["rmsnorm", "add_rmsnorm", "swiglu", "rope"])
def test_launch_variants_compute_what_the_default_computes(op):
    """The GPU run A/Bs these launch settings and may make one the default: each must give the default's outputs
    and gradients (to rounding), forward and backward, and leave the module's settings as they were."""
    m = kernel_ops.TINY["tiny"]
    inputs, grad_idx = kernel_ops._make_inputs(op, m, torch.float32, "cpu", seed=0)
    outs = kernel_ops._tuple(kernel_ops._eager(op, m["eps"])(*inputs))
    upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for o in outs]
    ours = kernel_ops._ours(op, m["eps"])
    reference = kernel_ops._outputs_and_grads(ours, inputs, grad_idx, upstream)
    variants = kernel_ops._launch_variants(op, m["eps"])
    assert variants
    for name, variant in variants.items():
        before = {k: getattr(variant.module, k) for k in variant.values}
        with kernel_ops._settings_of(variant):
            assert all(getattr(variant.module, k) == v for k, v in variant.values.items()), name
            got = kernel_ops._outputs_and_grads(variant, inputs, grad_idx, upstream)
        assert {k: getattr(variant.module, k) for k in variant.values} == before, name
        for g, r in zip(got, reference):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
