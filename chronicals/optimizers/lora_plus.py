"""LoRA+ (Hayou et al., 2024): the B matrices learn lr_ratio times faster than the A matrices."""

from __future__ import annotations

import math

from torch import nn

from .factory import create_optimizer

_B_MARKERS = ("lora_B", "lora_embedding_B")


def _is_b(name: str) -> bool:
    return any(f".{m}." in f".{name}." for m in _B_MARKERS)


def _no_decay(name: str, param) -> bool:
    # Norm weights, biases and DoRA magnitudes are vectors: decaying them toward 0 harms the model. A conv
    # layer's DoRA magnitude is shaped (1, out_channels, 1, ...), so it is known by its PEFT name.
    return param.ndim < 2 or name.endswith(".bias") or ".lora_magnitude_vector." in f".{name}."


def lora_plus_param_groups(model: nn.Module, *, base_lr: float, lr_ratio: float, weight_decay: float) -> list[dict]:
    """Parameter groups: "lora_B" (base_lr * lr_ratio, weight_decay), "lora_B_no_decay" (base_lr * lr_ratio, 0),
    "default" (A matrices and every other trainable matrix: base_lr, weight_decay) and "no_decay" (norms, biases,
    DoRA magnitudes: base_lr, 0). Empty groups are left out. Works on any model whose adapters follow PEFT's
    names (ours and PEFT's)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # Finite too: an inf or NaN rate reaches a group's lr, which torch.optim does not check, and the first step
    # turns the parameters to NaN.
    for name, value in (("base_lr", base_lr), ("lr_ratio", lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    groups = {key: [] for key in ("lora_B", "lora_B_no_decay", "default", "no_decay")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = ("lora_B" if _is_b(name) else "default") if not _no_decay(name, param) else \
            ("lora_B_no_decay" if _is_b(name) else "no_decay")
        groups[key].append(param)
    if not groups["lora_B"] and not groups["lora_B_no_decay"]:
        raise ValueError("model has no trainable LoRA B matrices (parameters named *.lora_B.*); "
                         "add adapters first with chronicals.lora.apply_lora or peft.get_peft_model")
    settings = {
        "lora_B": (base_lr * lr_ratio, weight_decay), "lora_B_no_decay": (base_lr * lr_ratio, 0.0),
        "default": (base_lr, weight_decay), "no_decay": (base_lr, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items() if params
    ]


def create_lora_plus_optimizer(model: nn.Module, base_lr: float = 2e-4, lr_ratio: float = 16.0,
                               weight_decay: float = 0.01, *, optimizer: str = "adamw_fused", **kwargs):
    """An optimizer (named as in chronicals.optimizers.OPTIMIZERS) over lora_plus_param_groups(model, ...)."""
    groups = lora_plus_param_groups(model, base_lr=base_lr, lr_ratio=lr_ratio, weight_decay=weight_decay)
    return create_optimizer(optimizer, groups, lr=base_lr, weight_decay=weight_decay, **kwargs)
