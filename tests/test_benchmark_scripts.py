"""The GPU benchmark scripts' CPU mode (correctness checks at tiny shapes under the Triton interpreter): a script
that crashes or fails its own checks here would waste a GPU call. Also the packing table when the default
backend could not run (it crashed printing, after the measurements, on the H100 run of 2026-12-06)."""

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import kernel_ops, linear_cross_entropy, packing, rms_norm_backward  # noqa: E402

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


def test_timing_rounds_interleave_and_survive_failures(monkeypatch):
    """Every implementation is timed once per round, each round starting one further along (clock drift falls on
    all alike); its time is the median of all rounds' replays; one that cannot be captured in a CUDA graph is timed
    per call; one whose backward cannot be rerun gets (forward + backward) - forward; one that raises is returned as
    its exception while the others are still timed."""
    order, replay, given = [], iter(range(1, 10_000)), {}

    def graph(f, **kw):
        name = f()
        if name == "no_graph" or (name == "no_rerun" and f.pas == "bwd"):
            raise RuntimeError("capture failed")
        times = [float(next(replay)), float(next(replay))]
        given.setdefault((name, f.pas), []).extend(times)
        return {"times_ms": times}

    def events(f, **kw):
        name = f()
        if name == "no_rerun" and f.pas == "bwd":
            raise RuntimeError("Trying to backward through the graph a second time")
        return {"ms": {"fwd": 0.5, "bwd": 0.75, "fwd_bwd": 2.0}[f.pas]}

    monkeypatch.setattr(kernel_ops, "bench_graph_ms", graph)
    monkeypatch.setattr(kernel_ops, "bench_ms", events)
    monkeypatch.setattr(kernel_ops.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(kernel_ops.torch.cuda, "Stream", lambda: None)

    def impl(name):
        def fn(x):
            order.append(name)
            if name == "broken":
                raise ValueError("bad launch")
            return name
        return fn

    def passes(fn, sets, idx, stream):
        fn(x)  # as the real one, which runs the forwards the backward pass replays
        out = {p: (lambda: fn(x)) for p in ("fwd", "bwd", "fwd_bwd")}
        for p, f in out.items():
            f.pas = p
        return out

    names = ["a", "b", "no_graph", "no_rerun", "broken"]
    x = torch.zeros(2, requires_grad=True)
    monkeypatch.setattr(kernel_ops, "_passes", passes)
    out = kernel_ops.time_impls({n: impl(n) for n in names}, [([x], [x])], [0], quick=True)
    firsts = [order[i] for i in range(len(order)) if i == 0 or order[i] != order[i - 1]]
    assert firsts[:4] == ["a", "b", "no_graph", "no_rerun"]  # round 0 in the given order, then round 1 from "b"
    assert [n for n in firsts if n != "broken"][4:8] == ["b", "no_graph", "no_rerun", "a"]
    assert isinstance(out["broken"], ValueError)
    for p, ms in (("fwd", 0.5), ("bwd", 0.75)):
        assert out["no_graph"][p]["method"] == "events" and out["no_graph"][p]["ms"] == ms
        assert "capture failed" in out["no_graph"][p]["method_errors"][0]
    for name in ("a", "b"):
        for p in ("fwd", "bwd"):
            assert out[name][p]["method"] == "cuda_graph" and "method_errors" not in out[name][p]
            assert len(given[(name, p)]) == 2 * kernel_ops.ROUNDS
            assert out[name][p]["ms"] == statistics.median(given[(name, p)])
            assert out[name][p]["events_ms"] == {"fwd": 0.5, "bwd": 0.75}[p]
    rerun = out["no_rerun"]["bwd"]
    assert rerun["method"] == "cuda_graph, (fwd + bwd) - fwd" and len(rerun["method_errors"]) == 2
    fwd_ms = statistics.median(given[("no_rerun", "fwd")])
    assert rerun["ms"] == statistics.median(given[("no_rerun", "fwd_bwd")]) - fwd_ms
    assert rerun["events_ms"] == 2.0 - 0.5


def test_backward_pass_reruns_only_the_backward():
    """The "bwd" pass replays the backward of forwards run once when the passes are made (retain_graph), cycling
    through the input sets; each replay gives the gradients of its set."""
    calls = []

    def fn(x, w):
        calls.append(1)
        return x * w

    sets = [([torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)], [torch.randn(3)])
            for _ in range(3)]
    passes = kernel_ops._passes(fn, sets, [0, 1], stream=None)
    assert len(calls) == 3  # one forward per set, when the passes are made
    for i in (1, 2, 0, 1, 2, 0):
        (x, w), (dy,) = sets[i]
        gx, gw = passes["bwd"]()
        torch.testing.assert_close(gx, dy * w)
        torch.testing.assert_close(gw, dy * x)
    assert len(calls) == 3
    passes["fwd_bwd"]()
    passes["fwd"]()
    assert len(calls) == 5


def test_step_memory_cpu_mode_measures_saved_activations(tmp_path, capsys):
    # On CPU the script measures what autograd saves (no peaks); the patched model saves less per token and layer
    # than HF's (its MLP recomputes silu(g) * u, its loss never holds the logits).
    from benchmarks import step_memory

    assert step_memory.main(["--out", str(tmp_path), "--presets", "qwen3-0.6b", "--impls", "chronicals,hf"]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "step_memory.json").read_text())["rows"]}
    assert rows["chronicals"]["status"] == rows["hf"]["status"] == "ok"
    assert rows["chronicals"]["preset"] == "tiny-qwen3" and rows["chronicals"]["overall"] is None
    assert 0 < rows["chronicals"]["saved_per_token_layer"] < rows["hf"]["saved_per_token_layer"]
    assert "wrote" in capsys.readouterr().out


def test_phase_split_times_each_phase_and_flags_a_host_sync(monkeypatch):
    # A simulated GPU: work is a queue of durations that starts no earlier than the host enqueues it; an event's time
    # is when the queue reaches it, synchronize waits for the queue. The forward enqueues 3 ms of GPU work in 1 ms of
    # host time, the backward 5 ms in 2, the update syncs (waits for the GPU): it must be flagged, the others timed,
    # and the GPU times must not include the host's launch lag (the forward's first millisecond).
    from benchmarks import step_profile

    clock = {"host": 0.0, "gpu": 0.0}

    def launch(ms):
        clock["gpu"] = max(clock["gpu"], clock["host"]) + ms

    def sync():
        clock["host"] = max(clock["host"], clock["gpu"])

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = max(clock["gpu"], clock["host"])

        def synchronize(self):
            sync()

        def elapsed_time(self, other):
            return other.t - self.t

    def host(ms):
        clock["host"] += ms

    def forward():
        host(1.0)
        launch(3.0)
        return "loss"

    def backward(loss):
        assert loss == "loss"
        host(2.0)
        launch(5.0)

    def update():
        host(0.1)
        launch(0.5)
        sync()

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: launch(100.0))
    monkeypatch.setattr(step_profile.time, "perf_counter", lambda: clock["host"] / 1e3)
    out = step_profile.phase_split(forward, backward, update, steps=3)
    assert out["gpu_ms"] == pytest.approx({"forward": 3.0, "backward": 5.0, "update": 0.5})
    assert out["sleep_ms"] == pytest.approx(100.0)
    assert out["host_enqueue_ms"]["forward"] == pytest.approx(1.0)
    assert out["host_enqueue_ms"]["backward"] == pytest.approx(2.0)
    assert out["host_enqueue_ms"]["update"] > 80
    assert out["queue_or_sync"] == ["update"]


def test_rms_norm_backward_sweep_refuses_the_cpu_and_its_grids_fit(capsys):
    with pytest.raises(SystemExit):
        rms_norm_backward.main(["--out", "/nonexistent"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
    wide = rms_norm_backward.grid("qwen2.5-0.5b", "wide")
    assert len(wide) == 54 and not any(c["_PROGRAMS_PER_SM"] >= 4 and c["_MAX_BWD_STAGES"] > 2 for c in wide)
    stages = rms_norm_backward.grid("llama-3-8b", "stages")
    assert len(stages) == 8 and {c["_TILE_ELEMENTS"] for c in stages} == {4096}
