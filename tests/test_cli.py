"""The command line: `chronicals train [CONFIG.yaml] [key=value ...]` trains end to end, and bad input ends in a
one-line error with exit status 2."""

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chronicals.cli import main
from chronicals.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model_kwargs.hidden_size=32", "model_kwargs.intermediate_size=64", "model_kwargs.num_attention_heads=2",
         "model_kwargs.num_key_value_heads=1", "progress_bar=false"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: contended threads cost more than they give
    yield
    torch.set_num_threads(threads)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_demo_without_config_trains_and_its_loss_falls(tmp_path, capsys):
    # The quick start (no config file), shortened, with packing and the fused kernels off; see the next test.
    out = tmp_path / "demo"
    rc = main(["train", f"output_dir={out}", "max_steps=24", "warmup_steps=2", "use_fused_kernels=false", *SMALL])
    assert rc == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["label_tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert (out / "config.yaml").is_file()
    assert "loss" in capsys.readouterr().out


def test_yaml_config_with_chat_data_fused_kernels_packing_and_lora(tmp_path):
    # Every optimization path that runs on CPU, through a config file, on a JSONL chat dataset with the config's own
    # column name (Triton kernels under the interpreter, so the shapes stay tiny).
    data = tmp_path / "chat.jsonl"
    chats = [{"conversation": [{"role": "user", "content": f"What is {i} plus {i}?"},
                               {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(6)]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny-qwen2\ntokenizer: default\ndataset: {data}\nmessages_column: conversation\n"
                   f"max_seq_length: 64\nbatch_size: 1\nmax_steps: 2\nuse_lora: true\nlora_rank: 4\n"
                   f"use_gradient_checkpointing: true\nactivation_offload: true\noutput_dir: {tmp_path / 'out'}\n")
    rc = main(["train", str(cfg), *SMALL])
    assert rc == 0
    out = tmp_path / "out"
    rows = _metrics(out)
    assert len(rows) == 2
    assert all(0 < r["label_tokens"] < 30 for r in rows)  # only the assistant turns carry loss
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["learning_rat=1"], "unknown config field 'learning_rat'; did you mean 'learning_rate'"),
        (["lr_schedule=cosin"], "'lr_schedule' is 'cosin'; valid values: 'cosine' | 'linear' | 'constant'"),
        (["missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["zzz=1"], "unknown config field 'zzz' (valid fields: model, model_kwargs"),
        (["learning_rate=[1,"], "override 'learning_rate=[1,': the value is not valid YAML"),
        (["model=/nonexistent/model"], "config field 'model' ('/nonexistent/model') could not be loaded"),
        (["dataset=/nonexistent.jsonl"], "training data '/nonexistent.jsonl'"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    rc = main(["train", *args, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_its_package_is_a_one_line_error_before_anything_is_written(tmp_path, capsys):
    # docs/TRAINING.md: `tensorboard: true` needs `pip install 'chronicals[tensorboard]'`; without it the CLI exits 2
    # with that hint (it was an ImportError traceback, exit 1, after config.yaml and metrics.jsonl were written).
    out = tmp_path / "out"
    rc = main(["train", "tensorboard=true", "max_steps=1", f"output_dir={out}", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install 'chronicals[tensorboard]'" in err and "Traceback" not in err
    assert not out.exists()


def test_a_malformed_yaml_file_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-4\nbatch_size: [2,\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "run.yaml' is not valid YAML" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "chronicals", "train", "batch_size=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'batch_size' is 0; it must be an integer >= 1" in proc.stderr


def test_example_configs_load_and_show_their_command():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    from chronicals.config import ChronicalsConfig

    for path in configs:
        header = path.read_text().splitlines()[0]
        assert header.startswith("# ") and "chronicals train" in path.read_text().split("\n\n")[0], path
        ChronicalsConfig.from_yaml(path)


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    # Ctrl-C while the model or data load (before the trainer's own handler is installed), or a second Ctrl-C in a
    # step (the trainer raises KeyboardInterrupt: "a second one aborts at once"): one line and status 130, as after the
    # first Ctrl-C, not a KeyboardInterrupt traceback.
    import chronicals.cli as cli

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    try:
        rc = main(["train", "max_steps=1", f"output_dir={tmp_path}"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the CLI")
    assert rc == 130
    err = capsys.readouterr().err
    assert err.startswith("chronicals: interrupted by Ctrl-C") and len(err.strip().splitlines()) == 1


def test_a_second_ctrl_c_aborts_the_run_with_one_line(tmp_path):
    # Steps of 40 micro-batches (about half a second): the second Ctrl-C lands in the step the first one lets finish.
    proc = subprocess.Popen([sys.executable, "-m", "chronicals", "train", "max_steps=100000", "use_fused_kernels=false",
                             "gradient_accumulation_steps=40", f"output_dir={tmp_path / 'out'}", *SMALL], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for wait_for in ("step      1", "Ctrl-C: finishing this step"):
            line = ""
            while not line.startswith(wait_for):
                line = proc.stdout.readline()
                assert line, f"no {wait_for!r} line: {proc.communicate(timeout=60)[1]}"
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("chronicals: interrupted by Ctrl-C"), err
    assert "checkpoint saved" not in out


def test_a_config_file_whose_path_holds_an_equals_sign_is_read_as_the_config(tmp_path, monkeypatch):
    # Sweep folders are often named key=value (runs/lr=1e-4/run.yaml); an existing file is the config, not an override
    # (it was read as an override of the unknown field 'runs/lr').
    from chronicals.cli import load_config

    cfg = tmp_path / "lr=1e-4" / "run.yaml"
    cfg.parent.mkdir()
    cfg.write_text("model: tiny-qwen2\nlearning_rate: 1.0e-4\n")
    monkeypatch.chdir(tmp_path)
    for path in (str(cfg), "lr=1e-4/run.yaml"):
        loaded = load_config([path, "max_steps=3"])
        assert (loaded.model, loaded.learning_rate, loaded.max_steps) == ("tiny-qwen2", 1e-4, 3)
    with pytest.raises(ConfigError, match="config file 'lr=1e-4/missing.yaml' does not exist"):
        load_config(["lr=1e-4/missing.yaml"])


def test_an_empty_config_argument_says_so(tmp_path, capsys):
    # `chronicals train "$CONFIG"` with CONFIG unset passes ''; that was reported as "is a directory" (Path('') is '.').
    assert main(["train", "", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "the config file path is empty" in err and "directory" not in err


def test_train_help_names_the_config_formats_and_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: chronicals train [-h] [CONFIG.yaml | CONFIG.toml] [key=value ...]" in out
    assert "TOML" in out and "model_kwargs.num_hidden_layers=4" in out
    assert "2 on a config, data or setup error" in out and "130 after Ctrl-C" in out
