"""Small blocks with HF's module names, adapted by PEFT, in the three precisions the LoRA tests compare:
float64 (the reference), all-native (PEFT's path with adapters in the native dtype: what plain PyTorch does),
and ours (base in the native dtype, adapters fp32 as apply_lora keeps them, fused forwards installed)."""

from __future__ import annotations

import copy
import os

import torch
from autograd_graph import node_names
from oracle import assert_no_worse
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from chronicals.lora import install_fused

# CHRONICALS_TEST_DEVICE=cuda runs these comparisons on the GPU (native Triton, cuBLAS); default CPU/interpreter.
DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")


class MLP(nn.Module):
    def __init__(self, d: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QKVO(nn.Module):
    """q, k, v of one input (as an attention forward calls them), then o over their concatenation."""

    def __init__(self, d: int, dq: int, dkv: int, bias: bool = False):
        super().__init__()
        self.q_proj = nn.Linear(d, dq, bias=bias)
        self.k_proj = nn.Linear(d, dkv, bias=bias)
        self.v_proj = nn.Linear(d, dkv, bias=bias)
        self.o_proj = nn.Linear(dq + 2 * dkv, d, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(torch.cat([q, k, v], dim=-1))


class InPlaceQKVO(QKVO):
    """QKVO whose forward changes the projections' outputs in place (q *= scaling, out += residual), as attention
    forwards may; `qkv=False` changes only o's (the K-concatenated q/k/v are column views, like torch.split's)."""

    def __init__(self, *args, qkv: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.qkv = qkv

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv:
            q.mul_(0.5)
            k += 1.0
            v.mul_(2.0)
        out = self.o_proj(torch.cat([q, k, v], dim=-1))
        out += x
        return out


def adapted(block: nn.Module, rank: int, alpha: float, *, dora: bool = False, rslora: bool = False,
            dropout: float = 0.0, seed: int = 0, rank_pattern: dict | None = None,
            alpha_pattern: dict | None = None) -> nn.Module:
    """`block` with PEFT adapters on every linear, A and B both random (so the low-rank path matters);
    `rank_pattern`/`alpha_pattern` (PEFT's: module name -> r / alpha) give layers their own rank and scale."""
    targets = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_dora=dora,
                     use_rslora=rslora, lora_dropout=dropout, rank_pattern=rank_pattern or {},
                     alpha_pattern=alpha_pattern or {})
    torch.manual_seed(seed)
    model = inject_adapter_in_model(cfg, block)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def three_precisions(model: nn.Module, dtype: torch.dtype, device: str = DEVICE, kconcat: bool = False):
    """(float64 reference, native-dtype PEFT path, ours) copies of an adapted block; `kconcat`: ours runs the
    K-concatenated forwards."""
    ref = copy.deepcopy(model).double().to(device)
    native = copy.deepcopy(model).to(dtype).to(device)
    ours = copy.deepcopy(model).to(dtype).to(device)
    for name, p in ours.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    install_fused(ours, kconcat=kconcat)
    return ref, native, ours


def run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype, device: str = DEVICE):
    """Output, dX and every adapter gradient of `model` at input x (cast to `dtype`) and output grad dy."""
    x = x.detach().to(device, dtype).requires_grad_(True)
    y = model(x)
    y.backward(dy.to(device, y.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, x.grad, grads


def graph_names(t: torch.Tensor) -> set[str]:
    """Class names of every autograd node behind `t` (to see which path ran)."""
    return set(node_names(t))


# Factors over native PEFT's error in bf16/fp16. Adapter gradients reduce over all tokens products of operands both
# paths round alike (e, g, dY); with random rank-1 adapters at scale up to 64 that shared noise cancels
# differently per draw, so either path can land above the other (300 draws at these sizes: (ours - slack) /
# PEFT at most 0.96 for outputs and dX, 1.5 for adapter gradients; on the H200, whose cuBLAS rounds its bf16
# matmuls differently, one SwiGLU-MLP draw with 64 outputs reached 1.6). Sizes start at 8 so that a relative error
# is a statistic over many roundings, not one element's luck. fp32 gets factor 1.
BF16_OUT_FACTOR = 2.0
BF16_GRAD_FACTOR = 3.0


def compare_with_peft(model, x, dy, dtype, grad_fn_names, device=DEVICE, kconcat=False, absent_names=()):
    """Output, dX and adapter gradients of our fused block against PEFT's float64 (reference) and native-dtype
    (the bar) paths; `grad_fn_names` must appear in our autograd graph (the fused ops really ran), and
    `absent_names` must not."""
    ref, native, ours = three_precisions(model, dtype, device, kconcat=kconcat)
    y_ref, dx_ref, g_ref = run(ref, x, dy, torch.float64, device)
    y_nat, dx_nat, g_nat = run(native, x, dy, dtype, device)
    y, dx, g = run(ours, x, dy, dtype, device)
    # The fused ops really ran (not PEFT's path): their backward nodes are in the graph.
    names = graph_names(ours(x.to(device, dtype).requires_grad_(True)))
    for name in grad_fn_names:
        assert name in names, f"{name} not in the autograd graph: {sorted(names)}"
    for name in absent_names:
        assert name not in names, f"{name} in the autograd graph: {sorted(names)}"
    assert y.dtype == dtype
    out_factor = BF16_OUT_FACTOR if dtype != torch.float32 else 1.0
    assert_no_worse("output", y, y_nat, y_ref, dtype, factor=out_factor)
    assert_no_worse("dX", dx, dx_nat, dx_ref, dtype, factor=out_factor)
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert g[name].dtype == torch.float32, name  # adapters stay fp32, as apply_lora keeps them
        factor = BF16_GRAD_FACTOR if dtype != torch.float32 else 1.0
        assert_no_worse(f"d {name}", g[name], g_nat[name], g_ref[name], dtype, factor=factor)
