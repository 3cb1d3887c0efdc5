"""What the fused ops keep for the backward: only X, the gate/up outputs and thin [N, r] products (MLP), or X and
X A^T (projections), measured with saved-tensor hooks and compared with PEFT's eager path."""

import torch
from lora_blocks import MLP, QKVO, adapted, three_precisions


def _saved_activation_bytes(model, x) -> int:
    """Bytes of distinct storages saved for backward that are not the model's own parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


def test_fused_mlp_saves_x_gate_up_and_thin_products_only():
    n, d, inter, r = 48, 32, 96, 4
    _, native, ours = three_precisions(adapted(MLP(d, inter), r, 8.0), torch.float32, "cpu")
    x = torch.randn(n, d, requires_grad=True)
    itemsize = 4
    adapters = sum(p.numel() for name, p in ours.named_parameters() if "lora_" in name) * itemsize
    # X, gate(x), up(x), X [A_g; A_u]^T, h A_d^T; the casts of the adapters (no-ops in fp32 here) at most.
    bound = (n * d + 2 * n * inter + n * 3 * r) * itemsize + adapters
    ours_bytes, peft_bytes = _saved_activation_bytes(ours, x), _saved_activation_bytes(native, x)
    assert ours_bytes <= bound, (ours_bytes, bound)
    # PEFT's eager path also keeps silu(gate) and the product h = silu(gate) * up: two more [N, I] tensors
    # (we keep one small extra: cat(A_g, A_u), [2r, d]).
    assert peft_bytes - ours_bytes >= (2 * n * inter - 2 * r * d) * itemsize, (peft_bytes, ours_bytes)


def test_fused_projections_save_x_and_xa_only():
    n, d, r = 40, 32, 4
    _, _, ours = three_precisions(adapted(QKVO(d, 32, 16), r, 8.0), torch.float32, "cpu")
    x = torch.randn(n, d, requires_grad=True)
    adapters = sum(p.numel() for name, p in ours.named_parameters() if "lora_" in name) * 4
    # q/k/v: X and X [A_q; A_k; A_v]^T; o_proj: its input (the concatenation) and X A_o^T.
    bound = (n * d + n * 3 * r + n * (32 + 16 + 16) + n * r) * 4 + adapters
    assert _saved_activation_bytes(ours, x) <= bound
