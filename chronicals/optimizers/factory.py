"""Choosing an optimizer by name (the config's `optimizer` field)."""

from __future__ import annotations

import torch

from .adam8bit import Adam8bit
from .fused_adamw import FusedAdamW

OPTIMIZERS = {
    "adamw_fused": FusedAdamW,  # fused kernel where PyTorch has one, foreach otherwise
    "adamw": torch.optim.AdamW,  # PyTorch's default implementation choice
    "adam8bit": Adam8bit,  # bitsandbytes, CUDA only
}


def create_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                     eps: float = 1e-8):
    """The optimizer called `name` (one of OPTIMIZERS) over `params` (tensors or param-group dicts)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
