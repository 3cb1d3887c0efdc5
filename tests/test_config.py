"""ChronicalsConfig: typed fields validated at construction (errors name the field and the valid values), YAML
loading, dotted key=value overrides."""

import dataclasses

import pytest

from chronicals.config import ChronicalsConfig, ConfigError, apply_override, demo_config

SEED_FIELDS = ["learning_rate", "batch_size", "gradient_accumulation_steps", "max_steps", "warmup_steps",
               "use_flash_attention", "use_fused_kernels", "use_sequence_packing", "use_gradient_checkpointing",
               "use_torch_compile", "use_lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
               "use_lora_plus", "lora_plus_ratio", "use_8bit_optimizer", "activation_offload", "mixed_precision",
               "use_fp8", "epochs", "lr_schedule", "seed", "max_seq_length", "output_dir", "logging_steps",
               "save_steps", "max_grad_norm", "model", "dataset", "dataset_format", "text_column", "prompt_column",
               "messages_column", "resume_from_checkpoint"]


def test_has_the_documented_fields():
    names = {f.name for f in dataclasses.fields(ChronicalsConfig)}
    assert set(SEED_FIELDS) <= names


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr_schedule": "cosin"}, "'lr_schedule' is 'cosin'; valid values: 'cosine' | 'linear' | 'constant'"),
        ({"mixed_precision": "bf32"}, "'mixed_precision' is 'bf32'; valid values: 'auto' | 'bf16' | 'fp16' | 'no'"),
        ({"batch_size": 0}, "'batch_size' is 0; it must be an integer >= 1"),
        ({"batch_size": 2.5}, "'batch_size' must be int, got 2.5"),
        ({"use_lora": "yes"}, "'use_lora' must be bool, got 'yes'"),
        ({"learning_rate": -1.0}, "'learning_rate' is -1.0; it must be > 0"),
        ({"learning_rate": "fast"}, "'learning_rate' must be float, got 'fast'"),
        ({"lora_dropout": 1.0}, "'lora_dropout' is 1.0; it must be in [0, 1)"),
        ({"max_steps": 0}, "'max_steps' is 0; it must be -1 (use epochs) or an integer >= 1"),
        ({"use_lora_plus": True}, "LoRA+ needs use_lora: true"),
        ({"activation_offload": True}, "set use_gradient_checkpointing: true as well"),
        ({"use_cuda_graphs": True, "use_torch_compile": True}, "'use_cuda_graphs' and 'use_torch_compile' are both"),
        ({"use_cuda_graphs": True, "use_gradient_checkpointing": True}, "recomputed layers cannot be replayed"),
        ({"cuda_graphs": True}, "use 'use_cuda_graphs'"),
        ({"use_lora": True, "lora_target_modules": []}, "'lora_target_modules' is []"),
        ({"learnin_rate": 1e-3}, "unknown config field 'learnin_rate'; did you mean 'learning_rate'?"),
        # Other trainers' names: what to write instead, not difflib's guess (eval_strategy -> 'eval_steps').
        ({"eval_strategy": "steps"}, "unknown config field 'eval_strategy' (a Hugging Face / TRL / torchtune name); "
                                     "set 'eval_dataset'"),
        ({"num_train_epochs": 3}, "'num_train_epochs' (a Hugging Face / TRL / torchtune name); use 'epochs'"),
        ({"warmup_ratio": 0.1}, "use 'warmup_steps', a number of steps"),
        ({"resume_from_checkpoint": True}, "'resume_from_checkpoint' is true; it takes 'latest'"),
        ({"seed": -1}, "'seed' is -1; it must be an integer in [0, 2**32)"),
        ({"seed": 2**32}, "'seed' is 4294967296; it must be an integer in [0, 2**32)"),
        ({"learning_rate": float("inf")}, "'learning_rate' is inf; it must be a finite number"),
        ({"adam_epsilon": float("nan")}, "'adam_epsilon' is nan; it must be a finite number"),
        ({"lora_plus_ratio": float("inf")}, "'lora_plus_ratio' is inf; it must be a finite number"),
        ({"max_seq_length": 1}, "'max_seq_length' is 1; it must be an integer >= 2"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(values, message):
    # The same error through a file's mapping and through the constructor's keywords (where an unknown name would
    # otherwise be the generated __init__'s bare TypeError).
    for build in (ChronicalsConfig.from_dict, lambda values: ChronicalsConfig(**values)):
        with pytest.raises(ConfigError) as info:
            build(values)
        assert message in str(info.value)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-qwen2\nlearning_rate: 1e-4\nlora_target_modules: [q_proj, v_proj]\n"
                    "model_kwargs:\n  num_hidden_layers: 3\n")
    cfg = ChronicalsConfig.from_yaml(path, ["batch_size=4", "use_lora=true", "model_kwargs.hidden_size=32",
                                            "resume_from_checkpoint=null", "lr_schedule=linear"])
    assert cfg.model == "tiny-qwen2" and cfg.learning_rate == 1e-4  # YAML 1.1's "1e-4" string becomes a float
    assert cfg.batch_size == 4 and cfg.use_lora is True and cfg.lr_schedule == "linear"
    assert cfg.model_kwargs == {"num_hidden_layers": 3, "hidden_size": 32}
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.resume_from_checkpoint is None
    assert ChronicalsConfig.from_yaml(None) == ChronicalsConfig()
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert ChronicalsConfig.from_yaml(again) == cfg  # to_yaml round-trips


def test_a_toml_file_reads_as_the_same_yaml(tmp_path):
    # A *.toml config was parsed as YAML: "must hold a mapping", or wrong values.
    yaml_file, toml_file = tmp_path / "run.yaml", tmp_path / "run.toml"
    yaml_file.write_text("learning_rate: 1.0e-4\nuse_lora: true\nlora_target_modules: [q_proj]\n"
                         "model_kwargs:\n  num_hidden_layers: 3\n")
    toml_file.write_text('learning_rate = 1e-4\nuse_lora = true\nlora_target_modules = ["q_proj"]\n\n'
                         "[model_kwargs]\nnum_hidden_layers = 3\n")
    assert ChronicalsConfig.from_yaml(toml_file) == ChronicalsConfig.from_yaml(yaml_file)
    toml_file.write_text("learning_rate = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        ChronicalsConfig.from_yaml(toml_file)


def test_mixed_precision_no_reads_as_no_from_yaml_and_overrides(tmp_path):
    # YAML 1.1 reads a bare `no` as false; the documented value 'no' must still work in a file and on the CLI.
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\n")
    assert ChronicalsConfig.from_yaml(path).mixed_precision == "no"
    assert ChronicalsConfig.from_yaml(None, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="'lr_schedule' is False; valid values"):
        ChronicalsConfig(lr_schedule=False)


def test_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_override({}, "learning_rate")
    with pytest.raises(ConfigError, match="'model' is not a mapping"):
        apply_override({"model": "x"}, "model.sub=1")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        ChronicalsConfig.from_yaml(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        ChronicalsConfig.from_yaml(tmp_path / "none.yaml")


def test_malformed_yaml_and_unknown_fields_are_config_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-4,\n")
    with pytest.raises(ConfigError, match=r"config file '.*broken.yaml' is not valid YAML: .* at line 2"):
        ChronicalsConfig.from_yaml(broken)
    with pytest.raises(ConfigError, match=r"override 'lora_target_modules=\[q_proj': the value is not valid YAML"):
        apply_override({}, "lora_target_modules=[q_proj")
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        ChronicalsConfig.from_yaml(tmp_path)
    with pytest.raises(ConfigError) as e:  # no near match: the valid fields are listed
        ChronicalsConfig.from_dict({"zzz": 1})
    assert "unknown config field 'zzz'" in str(e.value) and "learning_rate" in str(e.value)
    assert "use_lora" in str(e.value)


def test_comma_list_from_the_command_line_and_demo_defaults():
    cfg = ChronicalsConfig.from_yaml(None, ["lora_target_modules=q_proj, v_proj"])
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    demo = demo_config()
    assert demo.model == "tiny-llama" and demo.output_dir == "outputs/demo" and demo.max_steps <= 100


def test_output_dir_expands_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ChronicalsConfig(output_dir="~/runs/a").output_dir == str(tmp_path / "runs" / "a")


def test_dataset_format_takes_every_row_format_the_data_layer_reads():
    import typing

    from chronicals.config import DatasetFormat
    from chronicals.data import FORMATS

    # "tokenized" is found from the rows (input_ids), never named in a config.
    assert set(typing.get_args(DatasetFormat)) == {"auto", *FORMATS} - {"tokenized"}
    assert ChronicalsConfig(dataset_format="sharegpt").dataset_format == "sharegpt"
    with pytest.raises(ConfigError, match="'dataset_format' is 'chatml'; valid values: .*'sharegpt' \\| 'alpaca'"):
        ChronicalsConfig(dataset_format="chatml")
