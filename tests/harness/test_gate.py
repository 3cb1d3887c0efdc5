"""The regression gate fails on planted regressions and passes on unchanged results (issue 9)."""

import json
from pathlib import Path

import pytest

from harness import gate
from harness.__main__ import main as harness_main
from harness.report.rows import ResultsError, load

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GPU_RESULTS = FIXTURES / "results" / "h200-full.jsonl"
CPU_RESULTS = FIXTURES / "smoke-cpu.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _planted(tmp_path: Path, source: Path, change) -> Path:
    """A copy of `source` with `change(row)` applied to every row (it edits in place or returns None to drop)."""
    out = tmp_path / f"planted-{source.name}"
    kept = []
    for row in _rows(source):
        if change(row) is not False:
            kept.append(row)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


def _is(row, backend, metric=None):
    return row["backend"] == backend and (metric is None or row["metric"] == metric)


@pytest.fixture
def baseline(tmp_path) -> Path:
    folder = tmp_path / "baselines"
    assert gate.main(["--results", str(GPU_RESULTS), "--baseline", str(folder), "--update-baseline"]) == 0
    return folder


@pytest.fixture
def golden(tmp_path) -> Path:
    folder = tmp_path / "golden"
    assert gate.main(["--results", str(CPU_RESULTS), "--golden", str(folder), "--update-baseline"]) == 0
    return folder


def _gpu_gate(results: Path, baseline: Path, capsys) -> tuple[int, str]:
    rc = gate.main(["--results", str(results), "--baseline", str(baseline)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_unchanged_gpu_results_pass(baseline, capsys):
    rc, out = _gpu_gate(GPU_RESULTS, baseline, capsys)
    assert rc == 0, out
    assert "gate: PASS" in out
    # The peer that ran out of memory is not in the baseline either: reported, not gated.
    assert "unsloth: oom" in out


def test_slower_run_fails(baseline, tmp_path, capsys):
    def slower(row):
        if _is(row, "chronicals", "tokens_per_s"):
            row["value"], row["p20"], row["p80"] = row["value"] * 0.85, row["p20"] * 0.85, row["p80"] * 0.85

    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, slower), baseline, capsys)
    assert rc == 1
    failing = [line for line in out.splitlines() if "FAIL" in line and "gate:" not in line]
    assert len(failing) == 1 and "chronicals" in failing[0] and "tokens_per_s" in failing[0] and "-15.0%" in failing[0]


def test_drop_within_threshold_passes_and_is_listed(baseline, tmp_path, capsys):
    def slightly_slower(row):
        if _is(row, "liger", "tokens_per_s"):
            row["value"] *= 0.96

    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, slightly_slower), baseline, capsys)
    assert rc == 0, out
    assert any("liger" in line and "-4.0%" in line and "PASS" in line for line in out.splitlines())


def test_noisy_run_widens_the_allowance(baseline, tmp_path, capsys):
    # A 10% drop is past the 7% threshold, but this run's own p20-p80 spread is 20%: not evidence of a regression.
    def slower_and_noisy(row):
        if _is(row, "torch", "tokens_per_s"):
            v = row["value"] * 0.90
            row["value"], row["p20"], row["p80"] = v, v * 0.9, v * 1.1

    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, slower_and_noisy), baseline, capsys)
    assert rc == 0, out
    assert "widened by run noise" in out


def test_heavier_run_fails(baseline, tmp_path, capsys):
    def heavier(row):
        if _is(row, "liger", "peak_mem_alloc_gib"):
            row["value"] *= 1.15

    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, heavier), baseline, capsys)
    assert rc == 1
    assert any("liger" in line and "peak_mem_alloc_gib" in line and "FAIL" in line for line in out.splitlines())


def test_failed_verification_fails(baseline, tmp_path, capsys):
    def wrong(row):
        if _is(row, "chronicals"):
            row["status"], row["reason"] = "failed-verification", "grad of lm_head differs from reference"

    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, wrong), baseline, capsys)
    assert rc == 1
    assert "grad of lm_head differs from reference" in out


def test_run_missing_from_results_fails_with_its_reason(baseline, tmp_path, capsys):
    def crashed(row):
        if _is(row, "torch_compile"):
            if row["metric"] != "tokens_per_s":
                return False
            row.update(status="crashed", reason="InductorError: out of shared memory", value=None, metric=None)

    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, crashed), baseline, capsys)
    assert rc == 1
    assert "missing" in out and "InductorError: out of shared memory" in out


def test_results_from_another_gpu_are_refused(baseline, tmp_path, capsys):
    def other_gpu(row):
        row["provenance"]["gpu"] = "NVIDIA A100-SXM4-80GB"

    planted = _planted(tmp_path, GPU_RESULTS, other_gpu)
    rc, out = _gpu_gate(planted, baseline, capsys)
    assert rc == 2
    assert "NVIDIA A100-SXM4-80GB" in out and "nvidia-h200.json" in out and "not comparable" in out
    # Naming the H200 baseline file explicitly is refused too, with both GPU models in the reason.
    rc, out = _gpu_gate(planted, baseline / "nvidia-h200.json", capsys)
    assert rc == 2
    assert "measured on NVIDIA A100-SXM4-80GB" in out and "baseline for NVIDIA H200" in out


def test_results_of_another_workload_than_the_baseline_s_are_refused(tmp_path, capsys):
    """The baseline is matched by scenario name: a scenario file edited since (another batch size, say) was compared
    with it as if nothing had changed."""
    def workload(batch_size):
        def change(row):
            row["provenance"]["workload"] = {"model": "qwen2.5-0.5b", "batch_size": batch_size, "seq_len": 2048}
        return change

    folder = tmp_path / "baselines"
    (tmp_path / "a").mkdir()
    recorded = _planted(tmp_path / "a", GPU_RESULTS, workload(8))
    assert gate.main(["--results", str(recorded), "--baseline", str(folder), "--update-baseline"]) == 0
    rc, out = _gpu_gate(recorded, folder, capsys)
    assert rc == 0, out
    rc, out = _gpu_gate(_planted(tmp_path, GPU_RESULTS, workload(4)), folder, capsys)
    assert rc == 2 and "batch_size 8 -> 4" in out and "--update-baseline" in out


def test_baseline_update_keeps_other_scenarios(baseline):
    lora = FIXTURES / "results" / "packing.jsonl"
    assert gate.main(["--results", str(lora), "--baseline", str(baseline), "--update-baseline"]) == 0
    data = json.loads((baseline / "nvidia-h200.json").read_text())
    assert set(data["scenarios"]) == {"h200-full", "packing"}
    assert data["scenarios"]["h200-full"]["runs"]["default"]["chronicals"]["tokens_per_s"]["value"] == 34500.0


def test_results_with_failed_verification_cannot_become_the_baseline(tmp_path, capsys):
    lora = FIXTURES / "results" / "h200-lora.jsonl"
    assert gate.main(["--results", str(lora), "--baseline", str(tmp_path), "--update-baseline"]) == 2
    assert "liger" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_unchanged_cpu_losses_pass(golden, capsys):
    assert harness_main(["gate", "--results", str(CPU_RESULTS), "--golden", str(golden)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") >= 2  # one check per golden curve (torch, chronicals)


@pytest.mark.parametrize("shift, expected", [(1e-3, 1), (2e-5, 0)])
def test_drifted_loss_curve_fails(golden, tmp_path, capsys, shift, expected):
    def drift(row):
        if _is(row, "chronicals", "loss") and row["step"] >= 2:
            row["value"] += shift

    planted = _planted(tmp_path, CPU_RESULTS, drift)
    assert gate.main(["--results", str(planted), "--golden", str(golden)]) == expected
    if expected:
        line = next(x for x in capsys.readouterr().out.splitlines() if "FAIL" in x and "gate:" not in x)
        assert "smoke-cpu/default/chronicals" in line and "loss" in line


def test_missing_loss_steps_fail(golden, tmp_path, capsys):
    planted = _planted(tmp_path, CPU_RESULTS, lambda r: False if _is(r, "torch", "loss") and r["step"] == 3 else None)
    assert gate.main(["--results", str(planted), "--golden", str(golden)]) == 1
    assert "steps 3 missing" in capsys.readouterr().out


def test_extra_loss_steps_fail(golden, tmp_path, capsys):
    extra = {**_rows(CPU_RESULTS)[0], "step": 8}
    planted = tmp_path / "longer.jsonl"
    planted.write_text(CPU_RESULTS.read_text() + json.dumps(extra) + "\n")
    assert gate.main(["--results", str(planted), "--golden", str(golden)]) == 1
    assert "steps 8 not in the golden curve" in capsys.readouterr().out


def test_missing_golden_is_refused_with_the_fix(tmp_path, capsys):
    assert gate.main(["--results", str(CPU_RESULTS), "--golden", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "smoke-cpu.json" in err and "--update-baseline" in err


def test_mixed_devices_are_refused(tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(GPU_RESULTS.read_text() + CPU_RESULTS.read_text())
    assert gate.main(["--results", str(mixed)]) == 2
    assert "several devices" in capsys.readouterr().err


def test_bad_row_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = _rows(CPU_RESULTS)[:2]
    rows[1]["status"] = "fine"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ResultsError, match=r"bad\.jsonl:2: field 'status' is 'fine'"):
        load(bad)


def test_a_changed_scenario_file_is_named_as_the_likely_cause(tmp_path, capsys):
    scenario = tmp_path / "smoke-cpu.toml"
    scenario.write_text("[train]\nsteps = 8\n")
    results = _planted(tmp_path, CPU_RESULTS, lambda r: r["provenance"].update(scenario_file=str(scenario)))
    golden = tmp_path / "golden"
    assert gate.main(["--results", str(results), "--golden", str(golden), "--update-baseline"]) == 0
    assert gate.main(["--results", str(results), "--golden", str(golden)]) == 0
    assert "changed since" not in capsys.readouterr().out
    scenario.write_text("[train]\nsteps = 4\n")
    assert gate.main(["--results", str(results), "--golden", str(golden)]) == 0
    assert f"{scenario} changed since the golden losses were recorded" in capsys.readouterr().out


def test_the_committed_golden_file_is_what_ci_gates_against():
    golden = gate._read(gate.ROOT / "reports" / "golden" / "smoke-cpu.json", "golden losses")
    assert golden["scenario"] == "smoke-cpu" and golden["provenance"]["gpu"] is None
    assert {"torch", "chronicals"} <= set(golden["losses"]["default"])


@pytest.mark.parametrize("flag, value", [("--throughput-drop", "7"), ("--memory-rise", "1.5"),
                                         ("--throughput-drop", "nan"), ("--loss-atol", "-1e-4")])
def test_a_tolerance_the_gate_could_never_fail_or_never_pass_with_is_refused(baseline, tmp_path, capsys, flag, value):
    def halve(row):
        if _is(row, "chronicals", "tokens_per_s"):
            row.update(value=row["value"] / 2, p20=row["p20"] / 2, p80=row["p80"] / 2)
    slower = _planted(tmp_path, GPU_RESULTS, halve)
    with pytest.raises(SystemExit) as e:
        gate.main(["--results", str(slower), "--baseline", str(baseline), f"{flag}={value}"])
    assert e.value.code == 2
    assert f"argument {flag}: '{value}'" in capsys.readouterr().err
