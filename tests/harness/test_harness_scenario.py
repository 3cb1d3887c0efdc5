"""Scenario files: every shipped one loads; a bad backend, model, field or value is an error naming the file, the
field and the valid choices; `bench` exits non-zero on a bad scenario and says plainly when it needs a GPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from harness import bench, scenario
from harness.scenario import ScenarioError

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "device": "cpu",
    "backends": ["torch", "chronicals"],
    "model": {"preset": "tiny-llama"},
    "train": {"batch_size": 2, "seq_len": 32, "steps": 3, "warmup": 1},
    "data": {"kind": "varlen"},
    "variants": [{"backend": "chronicals", "name": "none", "flags": {"rms_norm": False}},
                 {"backend": "chronicals", "name": "packed", "layout": "packed"}],
}


def bad(**changes):
    raw = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        table = raw
        for p in path:
            table = table[p]
        table[key] = value
    return raw


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_scenarios_load(path):
    sc = scenario.load(path)
    assert sc.runs and sc.reference_run.backend == sc.reference
    assert sc.ordered_runs()[0] is sc.reference_run


def test_required_scenarios_exist():
    names = {p.stem for p in (ROOT / "scenarios").glob("*.toml")}
    assert {"smoke-cpu", "h200-full", "h200-lora", "ablation", "packing"} <= names


def test_good_scenario_parses_runs_and_flags():
    sc = scenario.parse(GOOD, "x.toml")
    assert [(r.backend, r.variant, r.layout) for r in sc.runs] == [
        ("torch", "default", "padded"), ("chronicals", "none", "padded"), ("chronicals", "packed", "packed")]
    assert sc.runs[1].flags["rms_norm"] is False and sc.runs[1].flags["swiglu"] is True  # defaults filled in
    assert sc.name == "x"


@pytest.mark.parametrize("raw, words", [
    (bad(backends=["torch", "tensorflow"]), ["'backends'", "'tensorflow'", "torch_compile", "unsloth"]),
    (bad(model__preset="gpt-5"), ["'model.preset'", "'gpt-5'", "qwen2.5-0.5b", "llama-3.2-1b"]),
    (bad(batchsize=8), ["'batchsize'", "valid fields", "train"]),
    (bad(train__learning_rate=1.0), ["'train.learning_rate'", "valid fields", "lr"]),
    (bad(train__mode="qlora"), ["'train.mode'", "'qlora'", "full, lora"]),
    (bad(train__steps=0), ["'train.steps'", "integer >= 1"]),
    (bad(train__warmup=3), ["'train.warmup'", "less than 'train.steps'"]),
    (bad(data__kind="webtext"), ["'data.kind'", "fixed, varlen, text"]),
    (bad(device="tpu"), ["'device'", "cuda, cpu"]),
    (bad(reference="liger"), ["'reference'", "not in 'backends'"]),
    (bad(variants=[{"backend": "chronicals", "flags": {"flash": True}}]), ["'flash'", "rms_norm", "valid flags"]),
    (bad(variants=[{"backend": "torch", "flags": {"rms_norm": True}}]), ["'rms_norm'", "no switchable"]),
    (bad(variants=[{"backend": "torch", "layout": "packed"}]), ["layout", "'packed'", "padded"]),
    (bad(variants=[{"backend": "liger"}]), ["'variants[0].backend'", "not in 'backends'"]),
    (bad(model={"preset": "tiny-llama", "path": "/x"}), ["exactly one of 'preset'", "'path'"]),
    # non-finite numbers: a NaN learning rate trains nothing, a NaN tolerance fails every comparison
    (bad(train__lr=float("nan")), ["'train.lr'", "finite positive number", "nan"]),
    (bad(timeout_s=float("inf")), ["'timeout_s'", "finite positive number", "inf"]),
    (bad(verify={"loss_rtol": float("nan")}), ["'verify.loss_rtol'", "finite"]),
    (bad(verify={"min_weights_changed": 2.0}), ["'verify.min_weights_changed'", "between 0 and 1"]),
    # the name is the results file's and the golden file's name
    (bad(name=""), ["'name'", "non-empty file name"]),
    (bad(name="a/b"), ["'name'", "'a/b'", "without '/'"]),
    (bad(variants=[{"name": "x"}]), ["'variants[0].backend'", "is missing", "torch, chronicals"]),
    # a variant's name names its job, result and log files: 'rope/off' stopped the bench after the reference ran
    # (FileNotFoundError), and an empty one read back as 'default'
    (bad(variants=[{"backend": "chronicals", "name": "rope/off"}]), ["'variants[0].name'", "'rope/off'",
                                                                      "without '/'"]),
    (bad(variants=[{"backend": "chronicals", "name": ""}]), ["'variants[0].name'", "non-empty"]),
])
def test_bad_input_names_file_field_and_choices(raw, words):
    with pytest.raises(ScenarioError) as e:
        scenario.parse(raw, "scenarios/bad.toml")
    assert str(e.value).startswith("scenarios/bad.toml: ")
    for w in words:
        assert w in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ScenarioError, match="nope.toml: no such scenario file"):
        scenario.load(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("backends = [\n")
    with pytest.raises(ScenarioError, match="broken.toml: not valid TOML"):
        scenario.load(broken)


def test_a_checkpoint_folder_without_config_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ScenarioError, match=r"'model.path' is .* which has no config.json; .*save_pretrained"):
        scenario.parse(bad(model={"path": str(tmp_path)}), "scenarios/bad.toml")


def test_bench_exits_nonzero_naming_file_and_field(tmp_path, capsys):
    assert bench.main(["--scenario", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such scenario file" in capsys.readouterr().err
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text('device = "cpu"\nbackends = ["torch", "jax"]\n[model]\npreset = "tiny-llama"\n[train]\n')
    assert bench.main(["--scenario", str(bad_file)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "'backends'" in err and "'jax'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_says_plainly_when_a_gpu_scenario_has_no_gpu(capsys):
    assert bench.main(["--scenario", str(ROOT / "scenarios" / "h200-full.toml")]) == 2
    err = capsys.readouterr().err
    assert "no usable CUDA GPU" in err and "smoke-cpu" in err and "Traceback" not in err


def test_only_and_quick_narrow_a_scenario():
    sc = scenario.load(ROOT / "scenarios" / "h200-full.toml")
    small = bench.narrowed(sc, ["liger"], quick=True)
    assert [r.backend for r in small.runs] == ["torch", "liger"]  # the reference stays
    assert small.train.steps == small.train.warmup + bench.QUICK_TIMED
    with pytest.raises(ScenarioError, match="--only names backend 'jax'"):
        bench.narrowed(sc, ["jax"], quick=False)


def test_a_seed_torch_cannot_take_is_refused_before_anything_runs():
    # torch seeds are unsigned 64-bit: a larger one passed the check and the bench died with a traceback ("Overflow
    # when unpacking long long") while making the weights.
    with pytest.raises(ScenarioError, match=r"field 'seed' must be an integer between 0 and 18446744073709551615"):
        scenario.parse(bad(seed=2**64), "scenarios/bad.toml")
    assert scenario.parse(bad(seed=2**64 - 1), "scenarios/bad.toml").seed == 2**64 - 1


def test_text_data_on_a_model_too_small_for_the_default_tokenizer_is_refused():
    # The tiny presets have 512 ids, the default tokenizer 4096: the bench died with a ValueError traceback after
    # building the weights, instead of naming the field.
    with pytest.raises(ScenarioError, match=r"bad.toml: field 'data.kind' is 'text'.*4096.*vocab_size is 512"):
        scenario.parse(bad(data={"kind": "text"}), "scenarios/bad.toml")


def _checkpoint(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(tmp_path)


LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 176,
                "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("config, words", [
    ("{not json", ["config.json is not valid JSON"]),
    ({"model_type": "gpt2", "vocab_size": 300, "n_embd": 32, "n_layer": 1, "n_head": 2},
     ["config.json lacks", "num_attention_heads", "intermediate_size"]),
])
def test_a_checkpoint_config_the_harness_cannot_read_is_refused_before_anything_runs(tmp_path, config, words):
    # Both died with a traceback (JSONDecodeError, KeyError 'num_attention_heads') after the bench had started.
    with pytest.raises(ScenarioError) as e:
        scenario.parse(bad(model={"path": _checkpoint(tmp_path, config)}), "scenarios/bad.toml")
    assert str(e.value).startswith("scenarios/bad.toml: field 'model.path'")
    for w in words:
        assert w in str(e.value)


def test_a_checkpoint_is_checked_for_text_data_by_its_own_vocab(tmp_path):
    path = _checkpoint(tmp_path, LLAMA_CONFIG)
    assert scenario.parse(bad(model={"path": path}), "x.toml").model.path == path
    with pytest.raises(ScenarioError, match="vocab_size is 300"):
        scenario.parse(bad(model={"path": path}, data={"kind": "text"}), "x.toml")
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "vocab_size": 4096}))
    assert scenario.parse(bad(model={"path": path}, data={"kind": "text"}), "x.toml").data.kind == "text"
