"""What a config turns into before the loop runs: the tokenizer, the model (with every optimization the config
switches on, applied in the one order that works), the optimizer and the autocast dtype."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from chronicals.config import ChronicalsConfig


class SetupError(ValueError):
    """The model, tokenizer or environment cannot run this config; the message says which field to change."""


def autocast_dtype(cfg: ChronicalsConfig, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast over fp32 master weights, or None for plain fp32. "auto" is bf16 on a GPU that has it."""
    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mode == "fp16" and device.type != "cuda":
        raise SetupError("config field 'mixed_precision' is 'fp16', which needs a CUDA GPU; use 'bf16' or 'no' on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mode]


def check_optional_packages(cfg: ChronicalsConfig) -> None:
    """Packages that only some settings need, checked before anything is written (a missing one is a SetupError)."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SetupError("config field 'tensorboard' is true but the tensorboard package is missing: "
                         "pip install 'chronicals[tensorboard]' (or set tensorboard: false)")


def check_output_dir(cfg: ChronicalsConfig) -> None:
    """output_dir must be, or be creatable as, a writable directory: a file in its place, or a directory this user
    cannot write to, is found here, not by the first write after the data was tokenized (a FileExistsError /
    NotADirectoryError / PermissionError traceback)."""
    path = Path(cfg.output_dir).absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise SetupError(f"config field 'output_dir' is {cfg.output_dir!r}, but {str(p)!r} is a file; "
                                 "pass a directory path")
            if not os.access(p, os.W_OK | os.X_OK):  # else a PermissionError traceback at the first write
                raise SetupError(f"config field 'output_dir' is {cfg.output_dir!r}, but {str(p)!r} is not writable "
                                 "by this user; pass a directory you can write to")
            return


def load_tokenizer(cfg: ChronicalsConfig):
    from chronicals.data import default_tokenizer
    from chronicals.models import PRESETS

    name = cfg.tokenizer
    if name is None:
        name = "default" if cfg.model.lower() in PRESETS else cfg.model
    if name == "default":
        tok = default_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise SetupError(
                f"config field 'tokenizer' ({name!r}) could not be loaded: {e}. Pass a local tokenizer directory, "
                "a hub name (needs network access), or 'default' for the embedded one"
            ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions carry no loss, so any id works; eos is always present
    if tok.pad_token_id is None:
        raise SetupError(f"tokenizer {name!r} has neither a pad nor an eos token; add one before training")
    return tok


def load_model(cfg: ChronicalsConfig, tokenizer) -> nn.Module:
    """A preset shape (random init, seeded, vocabulary at least the tokenizer's) or a checkpoint, in fp32."""
    from chronicals.models import PRESETS, build_model

    attn = "sdpa" if cfg.use_flash_attention else "eager"
    name = cfg.model
    if name.lower() in PRESETS:
        overrides = dict(cfg.model_kwargs)
        _check_model_kwargs(name, overrides)
        overrides.setdefault("vocab_size", max(PRESETS[name.lower()]["vocab_size"], len(tokenizer)))
        try:
            return build_model(name, seed=cfg.seed, attn_implementation=attn, dtype=torch.float32, **overrides)
        except Exception as e:  # transformers' config validators raise their own (non-ValueError) error types
            raise SetupError(f"config field 'model_kwargs' ({cfg.model_kwargs!r}) does not fit preset {name!r}: {e}") \
                from e
    if cfg.model_kwargs:
        raise SetupError("config field 'model_kwargs' only applies to preset models; remove it for a checkpoint")
    try:
        model = build_model(name, attn_implementation=attn, dtype=torch.float32)
    except ValueError as e:  # transformers: an unrecognised model_type / architecture
        raise SetupError(f"config field 'model' ({name!r}): {e}") from e
    except OSError as e:
        where = "the local directory" if Path(name).exists() else "a preset or a hub model"
        raise SetupError(
            f"config field 'model' ({name!r}) could not be loaded as {where}: {e}. Presets: {', '.join(PRESETS)}"
        ) from e
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise SetupError(
            f"the tokenizer has {len(tokenizer)} tokens but model {name!r} embeds only "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer (tokenizer: null)"
        )
    return model


def _check_model_kwargs(name: str, overrides: dict) -> None:
    """transformers' configs keep any keyword they do not know as a plain attribute, so a misspelt model_kwargs key
    (num_hidden_layerz) would build the preset's default shape without a word. A key is known when the config class
    takes it (its signature), holds it by default, or folds it into another field (rope_theta, absent from the built
    config's fields); head_dim is read with getattr by every supported model, whether its config declares it or not."""
    import difflib
    import inspect

    from chronicals.models import PRESETS
    from chronicals.models.presets import preset_config

    if not overrides:
        return
    try:
        built = preset_config(name, **overrides).to_dict()
    except Exception:  # a value transformers refuses: load_model's own error names it
        return
    default = preset_config(name)
    known = set(inspect.signature(type(default).__init__).parameters) | set(default.to_dict()) | {"head_dim"}
    for key in overrides:
        if key in built and key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            model_type = PRESETS[name.lower()]["model_type"]
            raise SetupError(f"config field 'model_kwargs' has {key!r}, which the {model_type} config of preset "
                             f"{name!r} does not know{hint}")


def prepare_model(model: nn.Module, cfg: ChronicalsConfig, device: torch.device) -> nn.Module:
    """Apply the optimizations the config switches on; returns the model to train (a PeftModel with LoRA)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise SetupError(f"the model ({type(model).__name__}) has no Hugging Face config; pass a transformers model")
    if cfg.use_fused_kernels or cfg.use_sequence_packing or cfg.use_cuda_graphs:
        import chronicals

        if not hasattr(chronicals, "apply"):
            raise SetupError("chronicals.apply (model patching) is not available in this install; set "
                             "use_fused_kernels, use_sequence_packing and use_cuda_graphs to false")
        from chronicals.models.cuda_graphs import GraphsUnsupported
        from chronicals.models.registry import FAMILIES, supported
        from chronicals.models.swiglu import SILU_NAMES

        fused = cfg.use_fused_kernels and model_type in FAMILIES
        if cfg.use_fused_kernels and not fused:
            # As Liger and Unsloth do with an architecture they have no kernels for: train it with its own modules.
            warnings.warn(f"chronicals has no fused kernels for model_type {model_type!r} (it has them for "
                          f"{supported()}); training with the model's own modules. Set use_fused_kernels: false to "
                          "silence this", stacklevel=2)
        # The SwiGLU kernel is silu's alone: a model with another gated activation keeps HF's MLP and every other
        # fused kernel (there is no per-kernel switch in the config to turn off just this one).
        gated_silu = getattr(model.config, "hidden_act", "silu") in SILU_NAMES
        try:
            chronicals.apply(model, rms_norm=fused, swiglu=fused and gated_silu, rope=fused,
                             linear_cross_entropy=fused, packed_attention=cfg.use_sequence_packing,
                             cuda_graphs=cfg.use_cuda_graphs)
        except ValueError as e:  # the graphs' refusals, or else packed attention's
            fix = "in the config, use_cuda_graphs: false" if isinstance(e, GraphsUnsupported) else \
                "or set use_sequence_packing: false to train it on padded batches"
            raise SetupError(f"{e}; {fix}") from e
    if cfg.use_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(device)
    if cfg.use_fp8:
        _convert_fp8(model, device)
    if cfg.use_lora:
        from chronicals.lora import LoRAConfig, apply_lora

        try:  # LoRAConfig's own checks (e.g. an empty target name) too: a SetupError naming the config fields
            lora = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              target_modules=_lora_targets(model, cfg), use_dora=cfg.use_dora,
                              use_rslora=cfg.use_rslora, fused=cfg.use_fused_kernels)
            model = apply_lora(model, lora)
        except ValueError as e:
            raise SetupError(f"LoRA settings (lora_rank / lora_target_modules) do not fit this model: {e}") from e
    _cast_weights(model, cfg, device)
    return model


def _lora_targets(model: nn.Module, cfg: ChronicalsConfig) -> list[str]:
    """The config's target modules; the default ones (Llama's seven projection names) become "all-linear" on a model
    that names its projections otherwise (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn), which the default
    means: every projection of every layer. Named targets are the user's, checked by apply_lora."""
    from chronicals.config import DEFAULT_LORA_TARGETS

    targets = list(cfg.lora_target_modules)
    if targets != list(DEFAULT_LORA_TARGETS):
        return targets
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if not missing:
        return targets
    warnings.warn(f"this model has no module named {', '.join(missing)} (lora_target_modules' default names); LoRA "
                  "adapts all its linear layers instead (lora_target_modules: [all-linear]); name the modules to "
                  "choose others", stacklevel=3)
    return ["all-linear"]


def _cast_weights(model: nn.Module, cfg: ChronicalsConfig, device: torch.device) -> None:
    """Frozen weights never see an optimizer, so they live in the compute dtype; trainable ones stay fp32 master
    weights unless param_dtype says bfloat16."""
    compute = autocast_dtype(cfg, device)
    if cfg.param_dtype == "bfloat16" and compute != torch.bfloat16:
        raise SetupError("config field 'param_dtype' is 'bfloat16' but this device computes in "
                         f"{compute or 'fp32'}; use param_dtype: auto here")
    for p in model.parameters():
        if cfg.param_dtype == "bfloat16" or (compute is not None and cfg.param_dtype == "auto" and not p.requires_grad):
            p.data = p.data.to(compute)
        elif cfg.param_dtype == "auto" and p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            # A model loaded in bf16 (the usual from_pretrained) would otherwise round every update to bf16.
            p.data = p.data.float()


def _convert_fp8(model: nn.Module, device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise SetupError("config field 'use_fp8' needs a GPU with FP8 tensor cores (Hopper, Ada or newer); "
                         "set use_fp8: false here")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise SetupError("config field 'use_fp8' needs torchao: pip install 'chronicals[fp8]'") from e

    def eligible(module: nn.Module, fqn: str) -> bool:
        # The head stays in bf16 (its loss is sensitive), and FP8 GEMMs need dimensions divisible by 16.
        return (isinstance(module, nn.Linear) and "lm_head" not in fqn
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=eligible)


def build_optimizer(model: nn.Module, cfg: ChronicalsConfig) -> torch.optim.Optimizer:
    """chronicals.optimizers' AdamW (PyTorch's fused kernel where it exists), or 8-bit Adam; weight decay only on
    matrices; LoRA+ parameter groups (B matrices at lora_plus_ratio x the learning rate) when the config asks."""
    from chronicals.optimizers import create_lora_plus_optimizer, create_optimizer

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise SetupError("the model has no trainable parameters; check use_lora / lora_target_modules")
    name = "adam8bit" if cfg.use_8bit_optimizer else "adamw_fused"
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    try:
        if cfg.use_lora_plus:
            return create_lora_plus_optimizer(model, base_lr=cfg.learning_rate, lr_ratio=cfg.lora_plus_ratio,
                                              weight_decay=cfg.weight_decay, optimizer=name, **kwargs)
        groups = [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        return create_optimizer(name, [g for g in groups if g["params"]], lr=cfg.learning_rate,
                                weight_decay=cfg.weight_decay, **kwargs)
    except (RuntimeError, ImportError, ValueError) as e:  # Adam8bit: no GPU, no bitsandbytes, parameters off the GPU
        if not cfg.use_8bit_optimizer:
            raise
        raise SetupError(f"config field 'use_8bit_optimizer' is true but 8-bit Adam cannot run here ({e}); set "
                         "use_8bit_optimizer: false to train with fused AdamW") from e
