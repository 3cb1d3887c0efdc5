"""Training FLOPs and model FLOPs utilisation (MFU), by the project's convention (see DESIGN.md):

    per token:  6 N for a full fine-tune (forward 2N, backward 4N), 4 N with LoRA (frozen weights get no weight
                gradient, so backward is 2N); N = parameters in matmuls (embedding lookups excluded)
    attention:  6 s^2 d_attn per layer and sequence of s tokens (see `attention_flops`)

Recomputation (gradient checkpointing) is not counted: MFU measures useful work.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense bf16 tensor-core peaks from the datasheets (FLOP/s), matched against torch.cuda.get_device_name().
DATASHEET_BF16 = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165.2e12,
}


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: everything except embedding tables (an lm_head tied to the embedding
    is a matmul, so it is counted once through the embedding it shares)."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embed_ids)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and id(out.weight) in embed_ids:
        total += out.weight.numel()
    return total


def attention_flops(seq_lens: list[int], *, layers: int, attn_dim: int) -> float:
    """Causal attention FLOPs of one forward + backward over sequences of `seq_lens` tokens: per layer the forward
    does QK^T and PV, 2 * (2 s^2 d) FLOPs, half of it under the causal mask, and backward twice that:
    3 * 2 s^2 d = 6 s^2 d per layer and sequence."""
    return 6.0 * layers * attn_dim * float(sum(s * s for s in seq_lens))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DATASHEET_BF16.items():
        if key in name:
            return value
    return None
