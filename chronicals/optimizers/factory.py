"""Choosing an optimizer by name (the config's `optimizer` field)."""

from __future__ import annotations

import math
import numbers

import torch

from .adam8bit import Adam8bit
from .fused_adamw import FusedAdamW

OPTIMIZERS = {
    "adamw_fused": FusedAdamW,  # fused kernel where PyTorch has one, foreach otherwise
    "adamw": torch.optim.AdamW,  # PyTorch's default implementation choice
    "adam8bit": Adam8bit,  # bitsandbytes, CUDA only
}


def _number(name: str, value, high: float = math.inf) -> None:
    """`value` (a real number or a 1-element tensor) in [0, high), else a ValueError naming the field. torch.optim
    takes an infinite lr or weight_decay (the first step makes the weights NaN) and fails on a string or None with
    "'<=' not supported between instances of 'float' and 'str'"."""
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not 0 <= float(number) < high:
        raise ValueError(f"optimizer {name} must be a number in [0, {high}); got {value!r}")


def create_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                     eps: float = 1e-8):
    """The optimizer called `name` (one of OPTIMIZERS) over `params` (tensors or param-group dicts)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    for field, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
        _number(field, value)
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"optimizer betas must be a pair (beta1, beta2), each in [0, 1); got {betas!r}")
    for i, beta in enumerate(betas):
        _number(f"betas[{i}]", beta, high=1.0)
    return OPTIMIZERS[name](params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
