"""Optimizers: fused AdamW, 8-bit Adam, LoRA+ parameter groups, and choosing one by name."""

from .adam8bit import Adam8bit
from .factory import OPTIMIZERS, create_optimizer
from .fused_adamw import FusedAdamW
from .lora_plus import create_lora_plus_optimizer, lora_plus_param_groups

__all__ = ["OPTIMIZERS", "Adam8bit", "FusedAdamW", "create_lora_plus_optimizer", "create_optimizer",
           "lora_plus_param_groups"]
