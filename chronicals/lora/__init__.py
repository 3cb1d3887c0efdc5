"""LoRA, rsLoRA and DoRA adapters, PEFT-compatible, with fused forward/backward paths."""

from .apply import apply_lora, check_targets, peft_config
from .config import DEFAULT_TARGET_MODULES, LoRAConfig
from .fused import install_fused, remove_fused
from .saving import load_lora, merge_lora, save_lora

__all__ = [
    "DEFAULT_TARGET_MODULES", "LoRAConfig", "apply_lora", "check_targets", "install_fused", "load_lora",
    "merge_lora", "peft_config", "remove_fused", "save_lora",
]
