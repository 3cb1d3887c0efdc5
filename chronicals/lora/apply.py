"""apply_lora: PEFT's own LoRA layers (so PEFT saves and loads them as they are), checked first, then routed
through the fused ops."""

from __future__ import annotations

from torch import nn

from .config import ALL_LINEAR, LoRAConfig
from .fused import install_fused

try:  # transformers' GPT-2 style linear (weight stored [in, out])
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _layer_dims(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _all_linear(model: nn.Module) -> list[str]:
    """What PEFT's "all-linear" adapts: every Linear / Conv1D layer but the output head. PEFT leaves out the head
    of a transformers PreTrainedModel only: another module's get_output_embeddings() is adapted like any linear
    layer, so it is listed (and checked) here too; skipping it let a rank above the head's size through."""
    from transformers import PreTrainedModel

    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return [n for n, m in model.named_modules()
            if n and m is not head and (isinstance(m, nn.Linear) or (Conv1D and isinstance(m, Conv1D)))]


def carries_adapters(model: nn.Module) -> bool:
    """Whether `model` is a PeftModel or holds PEFT's layers (e.g. the base of one)."""
    return hasattr(model, "peft_config") or any(hasattr(m, "lora_A") for m in model.modules())


def check_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the modules the config adapts; raises a clear error for anything that cannot work."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a chronicals.lora.LoRAConfig, got {type(config).__name__}")
    if carries_adapters(model):
        raise ValueError("model already carries LoRA adapters; apply_lora takes the plain base model")
    modules = dict(model.named_modules())
    if config.target_modules == [ALL_LINEAR]:
        matched = _all_linear(model)
        if not matched:
            raise ValueError(f"LoRAConfig.target_modules={ALL_LINEAR!r}: {type(model).__name__} has no linear layer "
                             "besides its output head; name the modules to adapt instead")
    else:
        matched = []
        for target in config.target_modules:
            names = [n for n in modules if n and _matches(n, target)]
            if not names:
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _layer_dims(m) is not None})
                raise ValueError(
                    f"LoRAConfig.target_modules entry {target!r} matches no module of {type(model).__name__}; "
                    f"its adaptable layers are named: {', '.join(linear)}; or pass target_modules={ALL_LINEAR!r}"
                )
            matched += [n for n in names if n not in matched]
    for name in matched:
        module = modules[name]
        dims = _layer_dims(module)
        if dims is None or (config.use_dora and type(module) is not nn.Linear):
            what = "DoRA supports only torch.nn.Linear" if config.use_dora else \
                "LoRA supports torch.nn.Linear, torch.nn.Embedding and transformers Conv1D"
            raise ValueError(f"module {name!r} is a {type(module).__name__}: {what}; "
                             f"remove it from LoRAConfig.target_modules")
        if config.rank > min(dims):
            raise ValueError(
                f"LoRAConfig.rank={config.rank} is larger than layer {name!r} ({dims[0]} x {dims[1]}) allows; "
                f"use a rank of at most {min(dims)}"
            )
    return matched


def peft_config(config: LoRAConfig, *, task_type: str | None = None):
    """The equivalent peft.LoraConfig."""
    from peft import LoraConfig

    # PEFT expands the "all-linear" string itself (a list holding it would be read as a module name).
    targets = ALL_LINEAR if config.target_modules == [ALL_LINEAR] else list(config.target_modules)
    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        use_rslora=config.use_rslora, use_dora=config.use_dora, bias="none", task_type=task_type,
    )


def apply_lora(model: nn.Module, config: LoRAConfig | None = None):
    """Add LoRA (or DoRA) adapters to `model`; returns the peft.PeftModel wrapping it (base weights frozen).

    Adapters are kept in fp32 (PEFT's default) with their optimizer states; the fused paths compute in the
    activations' dtype. With `config.fused` and dropout 0, the forward and backward run the fused ops of
    chronicals.kernels.lora (their K-concatenated forwards with `config.fused_kconcat`); with dropout > 0 (in
    training) PEFT's plain forward runs. Apply chronicals.apply(model) patches before this, so the fused MLP
    replaces the patched MLP forward.
    """
    from peft import get_peft_model

    config = LoRAConfig() if config is None else config
    check_targets(model, config)
    task_type = "CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None
    peft_model = get_peft_model(model, peft_config(config, task_type=task_type))
    if config.fused:
        install_fused(peft_model, kconcat=config.fused_kconcat)
    return peft_model
