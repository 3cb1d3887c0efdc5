"""The one configuration of a Chronicals run: a typed dataclass, validated when constructed, loadable from YAML
with dotted `key=value` overrides (`chronicals train run.yaml learning_rate=1e-4 model_kwargs.num_hidden_layers=4`).

Every optimization is one boolean field, so an ablation is a list of overrides. The defaults are a sensible
single-GPU fine-tune; `demo_config()` is the CPU quick start that `chronicals train` runs with no config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "bf16", "fp16", "no"]
ParamDtype = Literal["auto", "float32", "bfloat16"]
DatasetFormat = Literal["auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca"]
Overflow = Literal["truncate", "split"]
NonFinite = Literal["stop", "skip"]
Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["auto", "fsdp2", "ddp", "none"]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_EVAL = "set 'eval_dataset' (held-out data, evaluated at the end) and 'eval_steps' (also every N steps)"
_BATCH = "use 'batch_size' (rows per micro-batch on each process; global_batch_size for all of a step's rows)"
# Field names of HF TrainingArguments / TRL SFTConfig / torchtune that chronicals spells otherwise or lacks, and what
# to write instead.
OTHER_TRAINERS_NAMES = {
    "lr": "use 'learning_rate'",
    "num_train_epochs": "use 'epochs' (whole epochs; max_steps for a number of steps)",
    "num_epochs": "use 'epochs' (whole epochs; max_steps for a number of steps)",
    "per_device_train_batch_size": _BATCH, "train_batch_size": _BATCH, "micro_batch_size": _BATCH,
    "lr_scheduler_type": "use 'lr_schedule' (cosine | linear | constant)",
    "warmup_ratio": "use 'warmup_steps', a number of steps (not a fraction of the run)",
    "max_length": "use 'max_seq_length'", "max_seq_len": "use 'max_seq_length'",
    "gradient_checkpointing": "use 'use_gradient_checkpointing'",
    "bf16": "use mixed_precision: bf16", "fp16": "use mixed_precision: fp16",
    "packing": "use 'use_sequence_packing'",
    "model_name_or_path": "use 'model'",
    "dataset_text_field": "use 'text_column'",
    "lora_r": "use 'lora_rank'", "target_modules": "use 'lora_target_modules'",
    "optim": "the optimizer is AdamW; use_8bit_optimizer: true for 8-bit Adam",
    "torch_compile": "use 'use_torch_compile'", "cuda_graphs": "use 'use_cuda_graphs'",
    "save_strategy": "use 'save_steps' (0: a checkpoint only at the end)",
    "report_to": "metrics go to output_dir/metrics.jsonl; tensorboard: true adds TensorBoard",
    **{name: _EVAL for name in ("eval_strategy", "evaluation_strategy", "do_eval")},
    "per_device_eval_batch_size": "evaluation uses 'batch_size' (or global_batch_size's rows per process)",
}


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the field and what it accepts."""


@dataclass
class ChronicalsConfig:
    # Model: a preset name from chronicals.models.PRESETS, a local checkpoint directory, or a hub name.
    model: str = "qwen2.5-0.5b"
    # Overrides for a preset's transformers config (e.g. num_hidden_layers); ignored keys are an error there.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Tokenizer: "default" (the embedded one), or a path / hub name; None means the model's own when it has one.
    tokenizer: Union[str, None] = None

    # Data: a JSONL/Parquet file, a saved dataset directory, an HF dataset name, or "default" (the embedded text).
    # Formats: "text", "prompt_completion" (loss on the completion), "messages" (chat; loss on assistant turns),
    # "sharegpt" (a `conversations` column of {from, value} turns, as messages), "alpaca" (instruction, optional
    # input, output; loss on the output); "auto" picks one from the columns.
    dataset: str = "default"
    dataset_format: DatasetFormat = "auto"
    dataset_split: str = "train"
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    max_seq_length: int = 2048
    overflow: Overflow = "truncate"  # a sequence over max_seq_length: cut it, or split it into several
    # Held-out data in the same formats, read like `dataset` (its split too): its mean token loss and perplexity are
    # logged after training, and every eval_steps optimizer steps when that is > 0.
    eval_dataset: Union[str, None] = None
    eval_steps: int = 0

    # Optimisation.
    learning_rate: float = 2e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    warmup_steps: int = 0
    lr_schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 42

    # Optimizations, one switch each.
    use_flash_attention: bool = True  # SDPA (FlashAttention kernels on GPU); false: eager attention
    use_fused_kernels: bool = True  # RMSNorm, SwiGLU, RoPE, linear cross-entropy and LoRA as fused Triton ops
    use_sequence_packing: bool = True  # padding-free rows with varlen attention; false: padded batches
    use_gradient_checkpointing: bool = False
    activation_offload: bool = False  # checkpointed activations to pinned CPU memory, copies overlapped
    use_torch_compile: bool = False
    # Decoder layers replayed as CUDA graphs (chronicals.apply's cuda_graphs): pays where the host's kernel launches
    # bound the step (small models at short steps), costs a static copy of each layer's input and output gradient.
    # Captured once the batch shape repeats: padded batches of one length, not packed rows of varying lengths.
    use_cuda_graphs: bool = False
    use_8bit_optimizer: bool = False  # bitsandbytes 8-bit AdamW (CUDA); else fused AdamW
    mixed_precision: Precision = "auto"  # autocast dtype; "auto" is bf16 on a GPU that has it, else fp32
    # Weights: "auto" keeps trainable weights in fp32 (master weights) and frozen ones in the autocast dtype;
    # "bfloat16" holds every weight in bf16 (half the weight, gradient and optimizer memory; updates are rounded
    # to bf16, so prefer it for LoRA-free runs only at learning rates well above bf16's resolution).
    param_dtype: ParamDtype = "auto"
    use_fp8: bool = False

    # LoRA.
    use_lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    use_lora_plus: bool = False
    lora_plus_ratio: float = 16.0
    use_dora: bool = False  # weight-decomposed LoRA (DoRA): a magnitude vector per adapted layer
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    # Outputs, logging, checkpoints.
    output_dir: str = "outputs/run"
    logging_steps: int = 10  # console line every N steps; metrics.jsonl gets every step
    save_steps: int = 0  # checkpoint every N steps; 0 saves only at the end (and on Ctrl-C)
    save_total_limit: Union[int, None] = None  # keep only the newest N checkpoints
    save_final_model: bool = True
    resume_from_checkpoint: Union[str, None] = None  # a checkpoint directory, or "latest" in output_dir
    tensorboard: bool = False
    progress_bar: bool = True
    on_nonfinite: NonFinite = "stop"  # a NaN/inf loss or gradient: stop the run, or skip that step
    device: Device = "auto"
    # Intra-op threads on a CPU run (None: PyTorch's default). Tiny models train faster on 1: with more, the
    # threads' synchronisation costs more than the split work saves.
    cpu_threads: Union[int, None] = None

    # Several GPUs (launched with torchrun): "auto" is FSDP2 for a full fine-tune and DDP for LoRA; "none" is
    # only for one process. See docs/MULTI_GPU.md.
    distributed_strategy: Strategy = "auto"
    # Rows per optimizer step over all processes; when set it replaces batch_size, which becomes
    # global_batch_size / (processes x gradient_accumulation_steps) and must come out whole.
    global_batch_size: Union[int, None] = None

    def __new__(cls, *args, **kwargs):
        # ChronicalsConfig(per_device_train_batch_size=8) otherwise fails in the generated __init__ with a bare
        # TypeError; an unknown name gets from_dict's error instead, with the field a user of HF / TRL meant.
        _check_names(cls, kwargs)
        return super().__new__(cls)

    def __post_init__(self):
        if isinstance(self.resume_from_checkpoint, bool):  # HF Trainer's resume_from_checkpoint=True
            raise ConfigError(f"config field 'resume_from_checkpoint' is {str(self.resume_from_checkpoint).lower()}; "
                              "it takes 'latest' (the newest checkpoint in output_dir), a checkpoint directory, or "
                              "null to start afresh")
        _check_types(self)
        _check_values(self)
        # "~/runs/x" means the home directory, as it does for dataset paths (not a folder named "~").
        self.output_dir = os.path.expanduser(self.output_dir)

    # ---- construction from files and overrides -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChronicalsConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of field: value, got {type(values).__name__}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: typing.Sequence[str] = (),
                  base: ChronicalsConfig | None = None) -> ChronicalsConfig:
        """Fields from the YAML (or, named *.toml, TOML) file at `path` (or from `base`, default the class defaults,
        when None), then `overrides` of the form `key=value` / `key.subkey=value`, values parsed as YAML scalars."""
        values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                what = "is a directory, not a YAML file" if p.is_dir() else "does not exist"
                raise ConfigError(f"config file {str(p)!r} {what}")
            if p.suffix.lower() == ".toml":  # torchtitan's format; anything else is read as YAML (JSON included)
                try:
                    loaded = tomllib.loads(p.read_text(encoding="utf-8"))
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                    raise ConfigError(f"config file {str(p)!r} is not valid TOML: {_one_line(e)}") from None
            else:
                try:
                    loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
                except (yaml.YAMLError, UnicodeDecodeError) as e:
                    raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_one_line(e)}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping of field: value")
            values.update(loaded)
        for item in overrides:
            apply_override(values, item)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_names(cls, values: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            if key in OTHER_TRAINERS_NAMES:  # difflib's guess there misleads: warmup_ratio -> warmup_steps
                hint = f" (a Hugging Face / TRL / torchtune name); {OTHER_TRAINERS_NAMES[key]}"
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"unknown config field {key!r}{hint} (valid fields: {valid})")


def demo_config(**changes) -> ChronicalsConfig:
    """The quick start: a tiny Llama-shaped model trained from scratch on the embedded text, ~1 minute on 2 CPU
    cores. The model's vocabulary is sized to the tokenizer when the model is built."""
    values = dict(
        model="tiny-llama", tokenizer="default", dataset="default", max_seq_length=128, overflow="split",
        learning_rate=3e-3,
        batch_size=8, max_steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1, output_dir="outputs/demo",
        logging_steps=10, mixed_precision="auto", use_sequence_packing=True, cpu_threads=1,
    )
    values.update(changes)
    return ChronicalsConfig(**values)


def apply_override(values: dict[str, Any], item: str) -> None:
    """Apply one `key=value` (or `key.subkey=value`) override to a plain dict of config values."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key before '='")
    # Parsed as YAML, so numbers, booleans, null and [lists] read as they would in the file.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(e)})") from None
    parts = key.split(".")
    target = values
    for part in parts[:-1]:
        nested = target.setdefault(part, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a mapping, so it has no sub-keys")
        target = nested
    target[parts[-1]] = value


def _one_line(e: Exception) -> str:
    """A YAML error's message without its multi-line source excerpt."""
    mark = getattr(e, "problem_mark", None)
    text = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else text


# ---- validation --------------------------------------------------------------------------------------------------
def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(name: str, value, tp):
    """Return `value` as type `tp` when it is one (ints are floats; YAML's float strings are floats), else raise."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
    elif origin is Literal:
        if value is False and "no" in typing.get_args(tp):  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
            return "no"
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config field {name!r} is {value!r}; valid values: {_describe(tp)}")
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
        if isinstance(value, str) and item_tp is str:  # "q_proj,v_proj" from a command line
            return [v.strip() for v in value.split(",") if v.strip()]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4)
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"config field {name!r} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _check_types(cfg: ChronicalsConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _coerce(f.name, getattr(cfg, f.name), hints[f.name]))


def _check_values(cfg: ChronicalsConfig) -> None:
    def need(ok: bool, name: str, rule: str):
        if not ok:
            raise ConfigError(f"config field {name!r} is {getattr(cfg, name)!r}; it must be {rule}")

    for name in ("learning_rate", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "lora_alpha", "lora_dropout", "lora_plus_ratio"):
        need(math.isfinite(getattr(cfg, name)), name, "a finite number")
    for name in ("batch_size", "gradient_accumulation_steps", "epochs", "logging_steps", "lora_rank"):
        need(getattr(cfg, name) >= 1, name, "an integer >= 1")
    need(cfg.max_seq_length >= 2, "max_seq_length", "an integer >= 2 (a token and the one it predicts)")
    need(0 <= cfg.seed < 2**32, "seed", "an integer in [0, 2**32)")
    for name in ("warmup_steps", "save_steps", "eval_steps"):
        need(getattr(cfg, name) >= 0, name, "an integer >= 0")
    need(cfg.max_steps == -1 or cfg.max_steps >= 1, "max_steps", "-1 (use epochs) or an integer >= 1")
    need(cfg.learning_rate > 0, "learning_rate", "> 0")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "between 0 and 1")
    need(cfg.weight_decay >= 0, "weight_decay", ">= 0")
    need(0.0 <= cfg.adam_beta1 < 1.0, "adam_beta1", "in [0, 1)")
    need(0.0 <= cfg.adam_beta2 < 1.0, "adam_beta2", "in [0, 1)")
    need(cfg.adam_epsilon > 0, "adam_epsilon", "> 0")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)")
    need(cfg.lora_alpha > 0, "lora_alpha", "> 0")
    need(0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", "in [0, 1)")
    need(cfg.lora_plus_ratio > 0, "lora_plus_ratio", "> 0")
    need(cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit", "null or an integer >= 1")
    need(cfg.cpu_threads is None or cfg.cpu_threads >= 1, "cpu_threads", "null or an integer >= 1")
    need(cfg.global_batch_size is None or cfg.global_batch_size >= 1, "global_batch_size",
         "null or an integer >= 1")
    need(bool(cfg.model.strip()), "model", "a preset name (e.g. 'tiny-llama'), a local path or a hub name")
    need(bool(cfg.dataset.strip()), "dataset", "a file, a directory, a hub dataset name, or 'default'")
    need(bool(cfg.output_dir.strip()), "output_dir", "a directory path")
    need(cfg.eval_dataset is None or bool(cfg.eval_dataset.strip()), "eval_dataset",
         "null, or a file, a directory or a hub dataset name")
    if cfg.use_lora:
        need(len(cfg.lora_target_modules) > 0, "lora_target_modules", "a non-empty list of module names")
    for name, what in (("use_lora_plus", "LoRA+"), ("use_dora", "DoRA"), ("use_rslora", "rsLoRA")):
        if getattr(cfg, name) and not cfg.use_lora:
            raise ConfigError(f"config field '{name}' is true but 'use_lora' is false; {what} needs use_lora: true")
    if cfg.param_dtype == "bfloat16" and cfg.mixed_precision in ("no", "fp16"):
        raise ConfigError(
            f"config field 'param_dtype' is 'bfloat16' but 'mixed_precision' is {cfg.mixed_precision!r}; "
            "bf16 weights need mixed_precision: bf16 (or auto)"
        )
    for name, other in (("use_torch_compile", "compiled layers"), ("use_gradient_checkpointing", "recomputed layers")):
        if cfg.use_cuda_graphs and getattr(cfg, name):
            raise ConfigError(f"config fields 'use_cuda_graphs' and '{name}' are both true; {other} cannot be "
                              f"replayed as CUDA graphs, so set one of them to false")
    if cfg.activation_offload and not cfg.use_gradient_checkpointing:
        raise ConfigError(
            "config field 'activation_offload' is true but 'use_gradient_checkpointing' is false; offloading moves "
            "the checkpointed activations, so set use_gradient_checkpointing: true as well"
        )
