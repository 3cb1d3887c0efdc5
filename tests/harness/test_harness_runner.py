"""The runner with a stand-in launcher (no subprocess): rows are on disk the moment each run ends, speed only for
verified runs, a failed reference fails the runs compared with it; the worker turns an unavailable backend into its
status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import scenario, worker
from harness.runner import Launched, run_scenario

RAW = {
    "device": "cpu", "backends": ["torch", "liger", "unsloth"], "model": {"preset": "tiny-llama"},
    "train": {"batch_size": 2, "seq_len": 16, "steps": 3, "warmup": 1},
}


def good_result(loss=(5.0, 4.9, 4.8), time_ms=(10.0, 10.0, 10.0)):
    return {"status": "ok", "reason": "", "weights_changed": 0.5, "peak_mem_alloc_gib": None,
            "steps": [{"loss": x, "grad_norm": 1.0, "time_ms": t, "label_tokens": 30, "real_tokens": 30,
                       "processed_tokens": 32} for x, t in zip(loss, time_ms)]}


class Launcher:
    """Hands out canned results; on each call it records which runs' rows are already in the results file."""

    def __init__(self, out, results):
        self.out, self.results, self.seen = out, list(results), []

    def __call__(self, module, args, timeout_s, env, log_path, result_path):
        lines = self.out.read_text().splitlines() if self.out.exists() else []
        self.seen.append(sorted({json.loads(x)["backend"] for x in lines}))
        res = self.results.pop(0)
        if isinstance(res, BaseException):
            raise res
        return Launched(result=res, timed_out=False, returncode=0, log_tail="")


def test_rows_are_appended_as_each_run_ends(tmp_path):
    out = tmp_path / "r.jsonl"
    launcher = Launcher(out, [good_result(), good_result((5.0, 4.9, 6.0)), KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):  # the matrix dies in the third run ...
        run_scenario(scenario.parse(RAW, "s.toml"), out, log=lambda m: None, launcher=launcher)
    assert launcher.seen == [[], ["torch"], ["liger", "torch"]]  # ... and what ran before is on disk
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    by = {b: [r for r in rows if r["backend"] == b] for b in ("torch", "liger")}
    assert {r["status"] for r in by["torch"]} == {"ok"}
    assert {"tokens_per_s", "step_time_ms", "tflops", "loss", "grad_norm"} <= {r["metric"] for r in by["torch"]}
    assert {r["status"] for r in by["liger"]} == {"failed-verification"}
    assert "step 2: loss 6 vs reference 4.8" in by["liger"][0]["reason"]
    assert {r["metric"] for r in by["liger"]} == {"loss", "grad_norm"}  # no speed for a failed run


def test_every_step_time_is_recorded_beside_the_median(tmp_path):
    """The median hides a run whose steps come in two speeds; each step's time is a row of its own (step set), the
    median the one row without a step, which is what the report and the gate read."""
    from harness.report.rows import load, measured

    out = tmp_path / "r.jsonl"
    raw = {**RAW, "backends": ["torch"]}
    launcher = Launcher(out, [good_result(time_ms=(50.0, 10.0, 30.0))])
    run_scenario(scenario.parse(raw, "s.toml"), out, log=lambda m: None, launcher=launcher)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    per_step = {r["step"]: r["value"] for r in rows if r["metric"] == "step_time_ms" and r["step"] is not None}
    assert per_step == {0: 50.0, 1: 10.0, 2: 30.0}
    medians = [r for r in rows if r["metric"] == "step_time_ms" and r["step"] is None]
    assert [r["value"] for r in medians] == [20.0]  # the timed steps (after 1 warm-up): 10 and 30
    assert [r.value for r in measured(load(out), "step_time_ms").values()] == [20.0]


def test_a_failed_reference_fails_the_runs_compared_with_it(tmp_path):
    out = tmp_path / "r.jsonl"
    zero = good_result()
    zero["steps"][1]["grad_norm"] = 0.0
    outcomes = run_scenario(scenario.parse(RAW, "s.toml"), out, log=lambda m: None,
                            launcher=Launcher(out, [zero, good_result(), {"status": "unavailable", "reason": "x",
                                                                          "steps": []}]))
    assert [o.status for o in outcomes] == ["failed-verification", "failed-verification", "unavailable"]
    assert "reference run (torch, default) did not pass" in outcomes[1].reason
    assert [r["metric"] for r in json.loads("[" + ",".join(out.read_text().splitlines()) + "]")
            if r["backend"] == "unsloth"] == [None]


def test_worker_reports_an_unavailable_backend(tmp_path):
    job = {"target": "harness.backends.liger:LigerBackend", "data": "unused", "optimizer": {},
           "build": {"checkpoint": "unused", "model_type": "llama", "device": "cpu", "dtype": "float32",
                     "mode": "full", "lora_rank": 8, "lora_alpha": 16, "seq_len": 16, "seed": 0, "layout": "padded",
                     "flags": {}}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert worker.main([str(tmp_path / "job.json"), str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["status"] == "unavailable" and "CUDA GPU" in res["reason"] and res["device"]["gpu"] is None


def test_gpu_rows_carry_the_probe_mfu_and_memory(tmp_path):
    out = tmp_path / "r.jsonl"
    probe = {"gpu": "NVIDIA H200", "driver": "580.1", "cuda": "13.0", "matmul_ceiling_tflops": 780.0}
    res = {**good_result(), "peak_mem_alloc_gib": 12.5, "peak_mem_nvml_gib": 14.0}
    raw = {**RAW, "device": "cuda", "backends": ["torch"]}
    outcomes = run_scenario(scenario.parse(raw, "s.toml"), out, log=lambda m: None,
                            launcher=Launcher(out, [probe, res]))
    rows = {r["metric"]: r for r in map(json.loads, out.read_text().splitlines()) if r["step"] is None}
    assert outcomes[0].status == "ok"
    assert rows["matmul_ceiling_tflops"]["value"] == 780.0
    assert rows["mfu_measured"]["value"] == pytest.approx(rows["tflops"]["value"] / 780.0)
    assert rows["mfu_datasheet"]["value"] == pytest.approx(rows["tflops"]["value"] / 989.0)
    assert (rows["peak_mem_alloc_gib"]["value"], rows["peak_mem_nvml_gib"]["value"]) == (12.5, 14.0)
    assert rows["tokens_per_s"]["value"] == pytest.approx(30 / 0.010)  # real tokens over step time
    assert {k: rows["tflops"]["provenance"][k] for k in ("gpu", "driver", "cuda")} == {
        "gpu": "NVIDIA H200", "driver": "580.1", "cuda": "13.0"}


def test_a_run_compared_with_a_failed_reference_still_names_its_own_faults(tmp_path):
    out = tmp_path / "r.jsonl"
    zero, frozen = good_result(), good_result()
    zero["steps"][1]["grad_norm"] = 0.0
    frozen["weights_changed"] = 0.0
    outcomes = run_scenario(scenario.parse(RAW, "s.toml"), out, log=lambda m: None,
                            launcher=Launcher(out, [zero, frozen, good_result()]))
    assert [o.status for o in outcomes] == ["failed-verification"] * 3
    assert "reference run (torch, default) did not pass" in outcomes[1].reason
    assert "weights did not change" in outcomes[1].reason  # its own fault is not hidden behind the reference's
    assert "weights did not change" not in outcomes[2].reason


def test_a_blank_or_torn_line_in_the_results_file_neither_stops_the_matrix_nor_eats_a_row(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"scenario": "earlier"}\n\n{"scenario": "killed mid-wri')  # a hand-edited, then a torn file
    outcomes = run_scenario(scenario.parse(RAW, "s.toml"), out, log=lambda m: None,
                            launcher=lambda *a: Launched(good_result(), False, 0, ""))
    assert [o.status for o in outcomes] == ["ok"] * 3  # the reference was read back past the bad lines
    lines = out.read_text().splitlines()
    assert lines[2] == '{"scenario": "killed mid-wri'  # the torn line stays alone on its line
    assert {json.loads(x)["scenario"] for x in lines[3:]} == {"s"}


def test_resume_runs_only_what_the_stopped_bench_did_not_record(tmp_path, capsys):
    """A matrix stopped in its third run, resumed: only that run is made, under the first bench's run_id, verified
    against the first bench's reference."""
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario.parse(RAW, "s.toml"), out, log=lambda m: None,
                     launcher=Launcher(out, [good_result(), good_result(), KeyboardInterrupt()]))
    launcher = Launcher(out, [good_result((5.0, 4.9, 9.0))])
    outcomes = run_scenario(scenario.parse(RAW, "s.toml"), out, log=print, launcher=launcher, resume=True)
    assert launcher.seen == [["liger", "torch"]]  # one launch: unsloth's
    assert [(o.run.backend, o.status) for o in outcomes] == [("unsloth", "failed-verification")]
    assert "loss 9 vs reference 4.8" in outcomes[0].reason  # checked against the stopped bench's torch run
    assert "torch (default): recorded by the bench resumed, kept" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({r["provenance"]["run_id"] for r in rows}) == 1
    assert {r["backend"] for r in rows} == {"torch", "liger", "unsloth"}
    # resumed again: every run is recorded, so nothing is built or launched
    assert run_scenario(scenario.parse(RAW, "s.toml"), out, log=print, launcher=Launcher(out, []), resume=True) == []
    assert "nothing left to run" in capsys.readouterr().out


def test_resume_refuses_nothing_to_continue_and_another_number_of_steps_or_settings(tmp_path):
    from harness.runner import ResumeError

    out = tmp_path / "r.jsonl"
    with pytest.raises(ResumeError, match="holds no bench of scenario 's'"):
        run_scenario(scenario.parse(RAW, "s.toml"), out, log=lambda m: None, launcher=Launcher(out, []), resume=True)
    run_scenario(scenario.parse({**RAW, "backends": ["torch"]}, "s.toml"), out, log=lambda m: None,
                 launcher=Launcher(out, [good_result()]))
    longer = {**RAW, "train": {**RAW["train"], "steps": 4}}
    with pytest.raises(ResumeError, match="number of steps .*train_steps 3 there, 4 now"):
        run_scenario(scenario.parse(longer, "s.toml"), out, log=lambda m: None, launcher=Launcher(out, []),
                     resume=True)
    wider = {**RAW, "train": {**RAW["train"], "batch_size": 4}}  # the scenario file edited between the two benches
    with pytest.raises(ResumeError, match="ran other settings .*'batch_size': 2.* there, .*'batch_size': 4"):
        run_scenario(scenario.parse(wider, "s.toml"), out, log=lambda m: None, launcher=Launcher(out, []),
                     resume=True)


def test_bench_resume_with_nothing_to_continue_is_a_plain_error(tmp_path, capsys):
    from harness import bench

    smoke = Path(__file__).resolve().parents[2] / "scenarios" / "smoke-cpu.toml"
    assert bench.main(["--scenario", str(smoke), "--out", str(tmp_path / "none.jsonl"), "--resume"]) == 2
    assert "holds no bench of scenario 'smoke-cpu'" in capsys.readouterr().err
