"""Training FLOPs and model FLOPs utilisation (MFU), by the project's convention (see DESIGN.md):

    per token:  6 N for a full fine-tune (forward 2N, backward 4N), 4 N with LoRA (frozen weights get no weight
                gradient, so backward is 2N); N = parameters in matmuls (embedding lookups excluded)
    attention:  6 s^2 d_attn per layer and sequence of s tokens (see `attention_flops`)

Recomputation (gradient checkpointing) is not counted: MFU measures useful work.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense bf16 tensor-core peaks per GPU from NVIDIA's datasheets, FLOP/s. The datasheets state BF16 Tensor Core
# "with sparsity"; the dense peak is half of it. NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100/): SXM 1,979
# -> 989, PCIe 1,513 -> 756, NVL 1,671 -> 835 per GPU. NVIDIA H200 datasheet (.../data-center/h200/): SXM 1,979 -> 989,
# NVL 1,671 -> 835. A100: 312 dense (SXM and PCIe). Keyed by a fragment of torch.cuda.get_device_name() ("NVIDIA H100
# 80GB HBM3" is the SXM part; "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA H200 NVL"); the longest
# fragment a name contains wins. The harness reads the same table (harness/metrics.py).
DATASHEET_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,  # L40 datasheet: 362 with sparsity; without this row "NVIDIA L40" matched "L4" (121)
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165.2e12,
}


def datasheet_peak_flops(gpu_name: str | None) -> float | None:
    """The datasheet dense bf16 peak (FLOP/s) of the GPU named `gpu_name`: of the table's fragments the name contains,
    the longest ("H100 NVL" over "H100"), whatever the table's order; None for a GPU not listed."""
    name = (gpu_name or "").lower()
    matches = [(len(fragment), peak) for fragment, peak in DATASHEET_BF16.items() if name and fragment.lower() in name]
    return max(matches, key=lambda m: m[0])[1] if matches else None


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
    return datasheet_peak_flops(torch.cuda.get_device_name(device))
