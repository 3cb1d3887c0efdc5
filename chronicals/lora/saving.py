"""Saving, loading and merging adapters, in PEFT's format (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .fused import install_fused, remove_fused


def _require_peft_model(model, what: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"{what} takes the model returned by apply_lora (a peft.PeftModel), got {type(model).__name__}")


def save_lora(model, directory: str | Path) -> Path:
    """Write the adapters to `directory`; peft.PeftModel.from_pretrained(base, directory) loads them."""
    _require_peft_model(model, "save_lora")
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def load_lora(base_model: nn.Module, directory: str | Path, *, trainable: bool = True, fused: bool = True,
              fused_kconcat: bool = False):
    """Load adapters saved by save_lora (or by PEFT) onto `base_model`; returns the peft.PeftModel. `fused` and
    `fused_kconcat` choose the forward paths as LoRAConfig's fields of those names do (PEFT's adapter_config.json
    has no field for them, so they are not saved)."""
    from peft import PeftModel

    from .apply import carries_adapters

    if fused_kconcat and not fused:
        raise ValueError("load_lora(fused_kconcat=True) selects a forward of the fused paths; it needs fused=True")
    # PEFT would wrap it in a second PeftModel whose names match none of the saved ones: nothing loaded, no error.
    if isinstance(base_model, nn.Module) and carries_adapters(base_model):
        raise ValueError("base_model already carries LoRA adapters; load_lora takes the plain base model (a fresh "
                         "one, or merge_lora's result)")
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory} has no adapter_config.json; pass the directory save_lora wrote")
    model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)
    if fused:
        install_fused(model, kconcat=fused_kconcat)
    return model


def merge_lora(model) -> nn.Module:
    """Fold the adapters into the base weights; returns the plain base model (adapters removed)."""
    _require_peft_model(model, "merge_lora")
    _refuse_tied(model)
    remove_fused(model)
    return model.merge_and_unload()


def _refuse_tied(model) -> None:
    """A merge writes W + s B A into the base weight; a weight shared with another layer (tied embeddings: lm_head
    and embed_tokens) would change that layer too, so the merged model would compute something else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # By module object, not name: a module registered under two names (an alias) holds nothing of another layer.
    holders: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), {}).setdefault(id(module), name)
    tied = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and module.active_adapters and not module.merged:
            base = module.get_base_layer()
            others = [n for m, n in holders.get(id(getattr(base, "weight", None)), {}).items() if m != id(base)]
            if others:
                tied.append(f"{name!r} (shared with {others[0]!r})")
    if tied:
        raise ValueError(
            f"merge_lora: the adapted layer {', '.join(tied)} holds a weight tied to another layer (tied embeddings); "
            "merging would change both layers and the merged model would give other logits. Keep the adapters "
            "unmerged (save_lora / load_lora), or untie the weights before apply_lora (tie_word_embeddings=False, "
            "lm_head with its own copy of the embedding matrix)"
        )
