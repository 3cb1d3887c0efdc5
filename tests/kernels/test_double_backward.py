"""The Triton ops' backwards are not differentiable: a double backward (create_graph=True, then a backward through
the gradient) must raise, not treat the op's gradient as a constant and silently drop its second-order terms."""

import os

import pytest
import torch

from chronicals.kernels import (
    fused_add_rmsnorm,
    fused_linear_cross_entropy,
    fused_qk_rope,
    fused_rmsnorm,
    fused_swiglu,
    fused_swiglu_mlp,
)

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")
_W = torch.randn(8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
_COS = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
_HEAD = torch.randn(5, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
_GEN = torch.Generator().manual_seed(3)
_MLP = [torch.randn(*shape, generator=_GEN).to(DEVICE) for shape in ((6, 8), (6, 8), (8, 6))]

OPS = {
    "rmsnorm": lambda x: fused_rmsnorm(x, _W).pow(2).sum(),
    "add_rmsnorm": lambda x: fused_add_rmsnorm(x, x * 2, _W)[1].pow(2).sum(),
    "swiglu": lambda x: fused_swiglu(x, x * 2).sum(),
    "swiglu_mlp": lambda x: fused_swiglu_mlp(x, *_MLP).sum(),
    "qk_rope": lambda x: sum(t.pow(2).sum() for t in fused_qk_rope(x[None, None], x[None, None] * 2, _COS, _COS)),
    "linear_cross_entropy": lambda x: fused_linear_cross_entropy(x, _HEAD, torch.tensor([0, 1, 4], device=DEVICE)),
}


@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises(op):
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    # A term of its own keeps the gradient on the graph, as in a gradient penalty; before, the op's part of it
    # was a constant there and x.grad came out silently wrong.
    (g,) = torch.autograd.grad(OPS[op](x) + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("op", OPS)
def test_single_backward_under_create_graph_still_works(op):
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(OPS[op](x), x, create_graph=True)
    (g_plain,) = torch.autograd.grad(OPS[op](x), x)
    torch.testing.assert_close(g, g_plain)
