"""Report rendering from the small results fixture: every figure, its table and REPORT.md (issue 9)."""

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from harness.__main__ import main as harness_main  # noqa: E402
from harness.report import figures, style, tables, units  # noqa: E402
from harness.report.render import render  # noqa: E402
from harness.report.rows import latest, load  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "fixtures" / "results"
ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("h200-full", "h200-lora", "ablation", "packing")
FIGURES = (
    [f"{kind}_{sc}" for kind in ("throughput", "memory", "mfu") for sc in SCENARIOS]
    + [f"loss_{sc}" for sc in ("h200-full", "h200-lora", "ablation")]
    + ["waterfall_ablation", "packing_packing", "speedup_overview"]
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    render([RESULTS], out, scenario_dir=out / "no-scenarios")
    return out


@pytest.fixture(scope="module")
def rows():
    return latest(load(RESULTS))


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_is_written_as_png_and_svg_with_its_table(rendered, name):
    png, svg = rendered / "figures" / f"{name}.png", rendered / "figures" / f"{name}.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "<svg" in svg.read_text()[:2000]
    table = (rendered / "tables" / f"{'headline' if name == 'speedup_overview' else name}.md").read_text()
    assert table.count("\n|") >= 2  # caption, header, separator, at least one line of numbers


def test_report_embeds_every_figure_and_states_the_method(rendered):
    text = (rendered / "REPORT.md").read_text()
    for name in FIGURES:
        assert f"](figures/{name}.png)" in text
    for needle in ("## Method", "ignore_index", "6N", "4N", "train.warmup", "median", "NVIDIA H200", "torch 2.11.0",
                   "570.124.06", "## Headline", "Chronicals 34,500 tokens/s, x1.64 PyTorch/HF (eager) and x1.16"):
        assert needle in text, needle


def test_report_lists_every_failed_or_unavailable_run_with_its_reason(rendered, rows):
    failures = (rendered / "REPORT.md").read_text().split("## Failed and unavailable runs")[1]
    expected = {(r.scenario, r.backend, r.status, r.reason) for r in rows if not r.ok}
    assert len(expected) == 4  # oom, unavailable, and a failed verification whose rows give two reasons
    for scenario, backend, status, reason in expected:
        assert any(all(x in line for x in (scenario, backend, status, reason)) for line in failures.splitlines())


def test_speed_tables_use_ok_rows_only(rows):
    table = tables.metrics_table(rows, "h200-lora", ("tokens_per_s",))
    liger = next(line for line in table.splitlines() if "| liger |" in line)
    assert "failed-verification" in liger and any(c.isdigit() for c in table) and "30,500" in table
    assert "47,800" in table and "x1.57" in table  # chronicals over the torch reference


def test_ablation_steps_follow_flag_count_not_file_order(rows, tmp_path):
    shuffled = [json.loads(line) for line in (RESULTS / "ablation.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(shuffled)
    path = tmp_path / "ablation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    steps = figures.ablation_steps(latest(load(path)), "ablation")
    assert [v for v, *_ in steps] == ["baseline", "+rms_norm", "+swiglu", "+rope", "+linear_cross_entropy",
                                      "+packed_attention"]
    assert [d for _, _, d, _ in steps] == [0.0, 600.0, 800.0, 400.0, 6600.0, 600.0]
    assert steps[4][3] == {"linear_cross_entropy"}
    table = tables.ablation_table(latest(load(path)), "ablation")
    assert "+6,600" in table and "+24.2%" in table and "x1.353" in table


def test_loss_table_measures_distance_from_the_reference(rows):
    table = tables.loss_table(rows, "h200-lora")
    liger = next(line for line in table.splitlines() if "| liger |" in line)
    assert "failed verification" in liger and "3.3" in liger  # 11 steps x 0.003 drift = 3.3e-02
    assert "reference" in next(line for line in table.splitlines() if "| torch |" in line)


def test_ratios_are_shown_in_percent_whatever_unit_the_row_states(rows):
    mfu = next(r for r in rows if r.metric == "mfu_datasheet" and r.backend == "chronicals")
    assert units.shown(mfu) == pytest.approx(100 * mfu.value)
    from dataclasses import replace

    assert units.shown(replace(mfu, value=45.0, unit="%")) == 45.0


def test_backend_colours_are_fixed_and_distinct():
    known = ["torch", "torch_compile", "liger", "unsloth", "chronicals"]
    assert len({style.colour(b) for b in known}) == 5
    assert style.backend_order(["chronicals", "newpeer", "torch"]) == ["torch", "chronicals", "newpeer"]
    assert style.colour("newpeer", ["newpeer"]) not in {style.colour(b) for b in known}


def test_cli_renders_and_refuses_a_missing_results_path(tmp_path, capsys):
    assert harness_main(["report", "--results", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    packing = RESULTS / "packing.jsonl"
    assert harness_main(["report", "--results", str(packing), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "figures" / "packing_packing.png").is_file() and (tmp_path / "REPORT.md").is_file()


def test_report_quotes_the_scenario_files_settings(tmp_path):
    from harness.report.document import _scenario_settings

    (tmp_path / "packing.toml").write_text('device = "cuda"\nbackends = ["torch", "chronicals"]\n'
                                            '[train]\nwarmup = 5\nsteps = 25\n[[variants]]\nbackend = "chronicals"\n')
    text = _scenario_settings(load(RESULTS / "packing.jsonl"), tmp_path)
    assert "| packing | - | device=cuda, backends=[torch, chronicals], train.warmup=5, train.steps=25 |" in text
    smoke = load(RESULTS.parent / "smoke-cpu.jsonl")
    steps = {r.step for r in smoke if r.metric == "loss"}
    assert f"| smoke-cpu | {max(steps) + 1} | description=" in _scenario_settings(smoke, ROOT / "scenarios")


def test_runs_the_scenario_names_but_that_left_no_row_are_listed_as_not_run(tmp_path):
    from harness.report.render import _not_run

    rows = [r for r in load(RESULTS.parent / "smoke-cpu.jsonl")]
    names = sorted({(r.backend, r.variant) for r in rows})
    dropped = names[-1]
    kept = [r for r in rows if (r.backend, r.variant) != dropped]
    recorded = rows[0].provenance.get("scenario_file")
    assert _not_run(rows, ROOT / "scenarios") == []
    missing = _not_run(kept, ROOT / "scenarios")
    assert missing == [("smoke-cpu", dropped[1], dropped[0])], (recorded, missing)
    table = tables.failures_table(kept, missing)
    assert f"| smoke-cpu | {dropped[1]} | {dropped[0]} | not run |" in table


def test_runs_left_out_by_bench_only_are_not_listed_as_stopped(tmp_path, monkeypatch):
    """`bench --only torch` ran what it was asked to; the report said the bench "was stopped before it finished"
    of every other run of the scenario. The bench records what --only kept; the report lists only runs of a
    backend some bench of the scenario was asked to run."""
    import dataclasses

    from harness import bench, runner
    from harness.report.render import _not_run

    called = {}
    monkeypatch.setattr(runner, "run_scenario", lambda sc, out, **kw: called.update(kw) or [])
    assert bench.main(["--scenario", str(ROOT / "scenarios" / "smoke-cpu.toml"), "--only", "torch", "--out",
                       str(tmp_path / "r.jsonl")]) == 0
    assert called["only"] == ["torch"]
    assert bench.main(["--scenario", str(ROOT / "scenarios" / "smoke-cpu.toml"), "--out",
                       str(tmp_path / "r.jsonl")]) == 0
    assert called["only"] is None

    torch_only = [r for r in load(RESULTS.parent / "smoke-cpu.jsonl") if r.backend == "torch"]
    narrowed = [dataclasses.replace(r, provenance={**r.provenance, "only": ["torch"]}) for r in torch_only]
    assert _not_run(narrowed, ROOT / "scenarios") == []
    assert [b for _, _, b in _not_run(torch_only, ROOT / "scenarios")] == ["chronicals"]  # a stopped bench


def test_variable_length_data_alone_does_not_make_a_backend_comparison_a_packing_study(rows):
    """Every run on varlen or text data records packing_efficiency. A scenario whose runs were all padded compares
    backends, but it was taken for a padded-against-packed study: left out of the headline, its findings and the
    speedup overview, and drawn as "padded against packed batches". Only layouts that differ are a packing study."""
    padded = [r for r in rows if not (r.scenario == "packing" and r.variant == "packed")]
    assert figures.is_packing(rows, "packing")
    assert not figures.is_packing(padded, "packing")
    assert "| packing | padded |" in tables.headline_table(padded)


def test_a_rerun_replaces_the_whole_earlier_run(tmp_path):
    first = [json.loads(line) for line in (RESULTS / "packing.jsonl").read_text().splitlines()]
    for r in first:
        r["provenance"] = {**r["provenance"], "run_id": "first"}
    crashed = {**first[0], "metric": None, "value": None, "unit": "", "p20": None, "p80": None, "step": None,
               "status": "crashed", "reason": "exit code -9", "provenance": {**first[0]["provenance"], "run_id": "2nd"}}
    path = tmp_path / "packing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*first, crashed]))
    torch_rows = [r for r in latest(load(path)) if r.backend == "torch"]
    assert [(r.status, r.reason) for r in torch_rows] == [("crashed", "exit code -9")]
    assert len([r for r in latest(load(path)) if r.backend == "chronicals"]) == len(first) - len(
        [r for r in first if r["backend"] == "torch"])


def test_headline_compares_backends_and_leaves_out_self_comparisons(rows):
    table = tables.headline_table(rows)
    assert "| h200-full | default |" in table and "| h200-lora | default |" in table
    assert "ablation" not in table and "packing" not in table
    full = next(line for line in table.splitlines() if "h200-full" in line)
    assert "x1.64" in full and "x1.16" in full  # over PyTorch eager; over the fastest other (Liger, 29.8k)
    assert "| oom |" in full  # Unsloth ran out of memory there: its column says so rather than a blank
    lora = next(line for line in table.splitlines() if "h200-lora" in line)
    assert "| failed-verification | unavailable |" in lora and "x1.32" in lora


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_harness_help_goes_to_stdout_and_exits_zero(flag, capsys):
    assert harness_main([flag]) == 0
    out = capsys.readouterr().out
    assert "usage: python -m harness" in out and "bench" in out and "gate" in out
    assert harness_main([]) == 2  # no subcommand is still a usage error


def test_a_scenario_file_that_no_longer_loads_does_not_stop_the_report(tmp_path):
    """The recorded scenario file may have been edited since (or name a checkpoint folder that is gone): the report
    is still rendered from the rows, without the settings and the not-run list it cannot know."""
    rows = [json.loads(line) for line in (RESULTS.parent / "smoke-cpu.jsonl").read_text().splitlines()]
    for broken, text in (("invalid.toml", 'device = "cpu"\nbackends = ["torch"]\n[model]\npreset = "tiny-llama"\n'
                                          '[train]\nbatch_size = 0\n'),
                         ("not-toml.toml", "backends = [\n")):
        (tmp_path / broken).write_text(text)
        path = tmp_path / f"{broken}.jsonl"
        path.write_text("".join(json.dumps({**r, "provenance": {**r["provenance"], "scenario_file":
                                                                 str(tmp_path / broken)}}) + "\n" for r in rows))
        written = render([path], tmp_path / broken.replace(".", "-"), scenario_dir=tmp_path)
        assert (tmp_path / broken.replace(".", "-") / "REPORT.md") in written


def test_loss_table_names_a_loss_that_went_non_finite(rows):
    from dataclasses import replace

    nan_at = {("h200-lora", "liger", 5), ("h200-lora", "liger", 6)}
    planted = [replace(r, value=None) if (r.scenario, r.backend, r.step) in nan_at and r.metric == "loss" else r
               for r in rows]
    table = tables.loss_table(planted, "h200-lora")
    liger = next(line for line in table.splitlines() if "| liger |" in line)
    cells = [c.strip() for c in liger.strip("|").split("|")]
    full = next(line for line in tables.loss_table(rows, "h200-lora").splitlines() if "| liger |" in line)
    assert cells[2] == [c.strip() for c in full.strip("|").split("|")][2]  # every step counted
    assert "non-finite loss at step 5 (and 1 more)" in liger, liger


def test_the_newest_run_by_time_is_reported_whatever_order_the_files_are_given_in(tmp_path):
    """`--results new.jsonl old.jsonl` (or a folder whose names sort the older file last) showed the older run: the
    latest was the last in file order, not the newest by provenance.time."""
    rows = [json.loads(line) for line in (RESULTS / "packing.jsonl").read_text().splitlines()]
    newer_speed = {("torch", "default"): 9900.0, ("chronicals", "packed"): 41200.0}

    def run(run_id: str, time: str | None, faster: bool = False) -> str:
        lines = []
        for r in rows:
            provenance = {k: v for k, v in r["provenance"].items() if k != "time"}
            provenance.update(run_id=run_id, **({"time": time} if time else {}))
            value = r["value"]
            if faster and r["metric"] == "tokens_per_s":
                value = newer_speed.get((r["backend"], r["variant"]), value)
            lines.append(json.dumps({**r, "value": value, "provenance": provenance}) + "\n")
        return "".join(lines)

    folder = tmp_path / "results"
    folder.mkdir()
    new, old = folder / "a-new.jsonl", folder / "b-old.jsonl"  # the folder lists the older file last
    new.write_text(run("new", "2026-11-29T09:30:00+00:00", faster=True))
    old.write_text(run("old", "2026-11-28T20:00:00Z"))
    for name, results in (("new-old", [new, old]), ("old-new", [old, new]), ("folder", [folder])):
        assert {r.provenance["run_id"] for r in latest(load(results))} == {"new"}, name
        out = tmp_path / name
        render(results, out, scenario_dir=tmp_path / "no-scenarios")
        for shown in (out / "tables" / "throughput_packing.md", out / "REPORT.md"):
            text = shown.read_text()
            assert "41,200" in text and "9,900" in text, (name, shown)
            assert "32,600" not in text and "9,100" not in text, (name, shown)

    # Equal times, and rows written without a time, keep file order: the run last in the files is the latest.
    for first, second in ((None, None), ("2026-11-28T20:00:00Z", "2026-11-28T20:00:00+00:00"),
                          ("2026-11-29T09:30:00Z", None), (None, "2026-11-28T20:00:00Z")):
        path = tmp_path / "same-file.jsonl"
        path.write_text(run("first", first) + run("second", second))
        assert {r.provenance["run_id"] for r in latest(load(path))} == {"second"}, (first, second)


def test_a_scenario_measured_on_two_gpus_is_compared_within_each_gpu(tmp_path):
    """A later `bench --only liger` of h200-full on an H100, appended to the H200 results: the newest run per backend
    took torch and liger from the H100 and the rest from the H200, and the headline put Chronicals (H200) at x3.29
    PyTorch (H100) under the one device the report named. Each GPU's runs are now a scenario of their own."""
    first = [json.loads(line) for line in (RESULTS / "h200-full.jsonl").read_text().splitlines()]
    later = []
    for r in first:
        if r["backend"] in ("torch", "liger"):
            x = json.loads(json.dumps(r))
            x["provenance"].update(gpu="NVIDIA H100 80GB HBM3", run_id="b", time="2026-12-01T00:00:00Z")
            if x["metric"] == "tokens_per_s" and x["step"] is None:
                x.update(value=x["value"] / 2, p20=x["p20"] / 2, p80=x["p80"] / 2)
            later.append(x)
    path = tmp_path / "h200-full.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*first, *later]))
    render([path], tmp_path / "out", scenario_dir=tmp_path / "no-scenarios")
    lines = (tmp_path / "out" / "tables" / "headline.md").read_text().splitlines()
    h200 = next(line for line in lines if line.startswith("| h200-full@nvidia-h200 |"))
    h100 = next(line for line in lines if line.startswith("| h200-full |"))
    assert "x1.64" in h200 and "21,000" in h200  # Chronicals against PyTorch on the same H200, as before
    assert "x3.29" not in h100 and "10,500" in h100 and h100.endswith("| - | - |")  # no Chronicals run on the H100
    assert "| h200-full | NVIDIA H100 80GB HBM3 |" in (tmp_path / "out" / "REPORT.md").read_text()


def test_runs_made_at_several_commits_name_each_commit_with_its_backends(tmp_path):
    """A scenario re-run for some backends at a later commit: the hardware table named the first row's commit (or
    None) for every run. It names each commit with the backends measured there, and a package at another version."""
    rows = [json.loads(line) for line in (RESULTS / "h200-full.jsonl").read_text().splitlines()]
    for r in rows:
        if r["backend"] == "chronicals":
            r["provenance"] = {**r["provenance"], "commit": "later",
                               "versions": {**r["provenance"]["versions"], "triton": "3.7.0"}}
    path = tmp_path / "h200-full.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    render([path], tmp_path / "out", scenario_dir=tmp_path / "no-scenarios")
    line = next(x for x in (tmp_path / "out" / "REPORT.md").read_text().splitlines()
                if x.startswith("| h200-full | NVIDIA H200 |"))
    assert "55edbab (PyTorch/HF (eager), PyTorch/HF + torch.compile, Liger-Kernel, Unsloth); later (Chronicals)" in line
    assert "other versions: triton 3.7.0 (Chronicals)" in line
