"""Planted faults are each flagged (the matrix runs its worker in this process, to keep the suite quick); through
real subprocesses, a hard crash, an out-of-memory error and a timeout each become a row and the matrix goes on."""

from __future__ import annotations

import json

import fake_backends
import pytest

from chronicals.models.presets import build_model
from harness import scenario, worker
from harness.runner import Launched, run_scenario

fake_backends.register_all()

BASE = {
    "device": "cpu", "seed": 3, "timeout_s": 120,
    "model": {"preset": "tiny-llama", "dtype": "float32"},
    "train": {"batch_size": 3, "seq_len": 40, "steps": 3, "warmup": 1, "lr": 1e-3},
    "data": {"kind": "varlen", "min_len": 8},
}
FAULTS = ["fake_zero_grad", "fake_frozen", "fake_padding_tokens", "fake_diverging", "fake_frozen_layer", "fake_ascent",
          "fake_noise_update", "fake_shifted_labels"]


def in_process(module, args, timeout_s, env, log_path, result_path):
    assert module == "harness.worker"
    worker.main(args)
    return Launched(result=json.loads(result_path.read_text()), timed_out=False, returncode=0, log_tail="")


def rows_of(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "faults.jsonl"
    sc = scenario.parse({**BASE, "name": "faults", "backends": ["torch", *FAULTS]})
    outcomes = run_scenario(sc, out, log=lambda m: None, launcher=in_process)
    return {o.run.backend: o for o in outcomes}, rows_of(out)


def test_reference_passes_and_reports_speed(matrix):
    outcomes, rows = matrix
    assert outcomes["torch"].status == "ok", outcomes["torch"].reason
    metrics = {r["metric"] for r in rows if r["backend"] == "torch"}
    assert {"tokens_per_s", "step_time_ms", "tflops", "loss", "grad_norm", "packing_efficiency",
            "trainable_params"} <= metrics
    counted = next(r["value"] for r in rows if r["backend"] == "torch" and r["metric"] == "trainable_params")
    model = build_model("tiny-llama", seed=0)
    assert counted == sum(p.numel() for p in model.parameters())  # the reference trains every weight


@pytest.mark.parametrize("backend, why", [
    ("fake_zero_grad", "gradient norm is 0"),
    ("fake_frozen", "weights did not change"),
    ("fake_padding_tokens", "label tokens but the batch has"),
    ("fake_diverging", "loss"),
    ("fake_frozen_layer", "parameters, the reference"),
    ("fake_ascent", "the loss on the first batch went from"),
    ("fake_noise_update", "the loss on the first batch went from"),
    ("fake_shifted_labels", "the loss on the first batch went from"),
])
def test_planted_fault_is_flagged_and_its_speed_never_reported(matrix, backend, why):
    outcomes, rows = matrix
    o = outcomes[backend]
    assert o.status == "failed-verification", (backend, o.status, o.reason)
    assert why in o.reason
    mine = [r for r in rows if r["backend"] == backend]
    assert mine and all(r["status"] == "failed-verification" and r["reason"] == o.reason for r in mine)
    assert not {r["metric"] for r in mine} & {"tokens_per_s", "step_time_ms", "tflops", "mfu_measured"}


def test_packed_sequences_that_attend_to_each_other_are_flagged(tmp_path):
    """Chronicals' packed run passes; the same with its sequence boundaries left out of the forward trained as well
    on random tokens and passed every other check."""
    out = tmp_path / "packed.jsonl"
    sc = scenario.parse({**BASE, "name": "packed", "backends": ["torch", "chronicals", "fake_packed_leak"],
                         "variants": [{"backend": "chronicals", "name": "packed", "layout": "packed"},
                                      {"backend": "fake_packed_leak", "name": "packed", "layout": "packed"}]})
    outcomes = {o.run.backend: o for o in run_scenario(sc, out, log=lambda m: None, launcher=in_process)}
    assert outcomes["chronicals"].status == "ok", outcomes["chronicals"].reason
    leak = outcomes["fake_packed_leak"]
    assert leak.status == "failed-verification" and "packed sequences are not kept apart" in leak.reason, leak.reason


def test_diverging_loss_is_caught_against_the_reference(matrix):
    reason = matrix[0]["fake_diverging"].reason
    assert "vs reference" in reason and "relative difference" in reason


def test_hard_crash_and_oom_are_rows_and_the_matrix_goes_on(tmp_path):
    out = tmp_path / "c.jsonl"
    sc = scenario.parse({**BASE, "name": "crash", "backends": ["fake_hard_crash", "fake_oom"],
                         "reference": "fake_hard_crash"})
    run_scenario(sc, out, log=lambda m: None)
    rows = rows_of(out)
    assert [(r["backend"], r["status"], r["metric"]) for r in rows] == [("fake_hard_crash", "crashed", None),
                                                                         ("fake_oom", "oom", None)]
    assert "exited with code 3" in rows[0]["reason"]
    assert "out of memory" in rows[1]["reason"]


def test_rows_follow_the_contract(matrix):
    for r in matrix[1]:
        assert list(r) == ["scenario", "backend", "variant", "flags", "status", "reason", "metric", "value", "unit",
                           "p20", "p80", "step", "provenance"]
        assert {"versions", "commit", "time", "gpu", "run_id"} <= set(r["provenance"])


def test_timeout_is_a_row(tmp_path):
    out = tmp_path / "t.jsonl"
    sc = scenario.parse({**BASE, "name": "hang", "timeout_s": 3, "backends": ["fake_hang"], "reference": "fake_hang"})
    outcomes = run_scenario(sc, out, log=lambda m: None)
    assert [o.status for o in outcomes] == ["timeout"]
    assert [(r["status"], r["reason"]) for r in rows_of(out)] == [("timeout", "no result within timeout_s = 3 s")]


def test_bench_cli_writes_into_a_folder_and_prints_the_table_last(tmp_path, capsys):
    from harness import bench

    toml = tmp_path / "cli.toml"
    toml.write_text('device = "cpu"\nbackends = ["fake_oom"]\nreference = "fake_oom"\n[model]\npreset = "tiny-llama"\n'
                    "[train]\nbatch_size = 1\nseq_len = 8\nsteps = 2\nwarmup = 1\n")
    assert bench.main(["--scenario", str(toml), "--out", f"{tmp_path}/"]) == 0
    rows = rows_of(tmp_path / "cli.jsonl")
    assert [(r["backend"], r["status"]) for r in rows] == [("fake_oom", "oom")]
    last = capsys.readouterr().out.strip().splitlines()
    assert last[-2].split()[:3] == ["backend", "variant", "status"] and last[-1].split()[:3] == [
        "fake_oom", "default", "oom"]
    assert (tmp_path / "cli-logs" / "01-fake_oom-default.log").is_file()
