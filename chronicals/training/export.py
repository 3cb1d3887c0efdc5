"""The final model of an FSDP2 run as one Hugging Face directory: the shards are gathered into full tensors on
rank 0's CPU (a collective every rank joins), then written as `model.safetensors` + `config.json` +
`generation_config.json` (as save_pretrained writes them; loads with `from_pretrained`) or, with LoRA, as a PEFT
adapter (loads with `PeftModel.from_pretrained`)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .distributed import DistEnv, barrier


def export_sharded(model: nn.Module, directory: str | Path, *, env: DistEnv, lora: bool, tokenizer=None) -> Path:
    directory = Path(directory)
    # Only rank 0 receives tensors (the others get an empty dict), offloaded to CPU one at a time, so no GPU ever
    # holds the whole model.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        if lora:
            model.save_pretrained(str(directory), state_dict=full, safe_serialization=True)
        else:
            save_file(_untied(model, full), str(directory / "model.safetensors"), metadata={"format": "pt"})
            # What save_pretrained writes beside the weights: the config naming the model class (fully_shard's
            # subclass is FSDP<class>; transformers strips the prefix too) and the weights' dtype (what
            # from_pretrained's dtype="auto" loads them as), and the generation settings.
            model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
            # transformers >= 4.56 calls it dtype, torch_dtype before.
            setattr(model.config, "dtype" if hasattr(model.config, "dtype") else "torch_dtype",
                    str(model.dtype).removeprefix("torch."))
            model.config.save_pretrained(directory)
            if model.can_generate():
                model.generation_config.save_pretrained(directory)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
    barrier(env)
    return directory


def _untied(model: nn.Module, state: dict) -> dict:
    """The state with a tied lm_head left out (from_pretrained re-ties it to the embedding), every tensor
    contiguous, as safetensors requires."""
    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        return {k: v.contiguous() for k, v in state.items()}
    head_name = next(name for name, m in model.named_modules() if m is head)
    return {k: v.contiguous() for k, v in state.items() if k != f"{head_name}.weight"}
