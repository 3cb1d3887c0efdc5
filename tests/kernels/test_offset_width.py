"""The elementwise kernels' int32 and int64 offset paths (_utils.needs_int64) give the same results, bit for bit, and
the width is chosen from the tensors' storage. The other kernel tests run the int32 path (their tensors are small);
here every op also runs with int64 offsets forced, on odd shapes, strided views and packed positions."""

import os

import pytest
import torch

from chronicals.kernels import _utils, fused_add_rmsnorm, fused_qk_rope, fused_rmsnorm, fused_swiglu
from chronicals.kernels.swiglu import swiglu_backward, swiglu_forward

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")


def _run(fn, inputs, force_int64, monkeypatch):
    """fn's outputs and the gradients of every floating input, with int64 offsets forced or not."""
    monkeypatch.setattr(_utils, "FORCE_INT64", force_int64)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in out]
    torch.autograd.backward(out, grads)
    return [o.detach() for o in out] + [t.grad for t in leaves if t.grad is not None]


def _same_both_ways(fn, inputs, monkeypatch):
    narrow = _run(fn, inputs, False, monkeypatch)
    wide = _run(fn, inputs, True, monkeypatch)
    assert len(narrow) == len(wide)
    for a, b in zip(narrow, wide):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _randn(*shape, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_and_add_rmsnorm(dtype, monkeypatch):
    x, r, w = _randn(37, 300, dtype=dtype), _randn(37, 300, dtype=dtype, seed=1), _randn(300, dtype=dtype, seed=2)
    _same_both_ways(lambda x_, w_: fused_rmsnorm(x_, w_, eps=1e-6), (x, w), monkeypatch)
    _same_both_ways(lambda x_, r_, w_: fused_add_rmsnorm(x_, r_, w_, eps=1e-6), (x, r, w), monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_flat_and_row_strided(dtype, monkeypatch):
    gate, up = _randn(5, 1031, dtype=dtype), _randn(5, 1031, dtype=dtype, seed=1)
    _same_both_ways(fused_swiglu, (gate, up), monkeypatch)  # contiguous: one flat row
    # Row-strided: gate and up as the column halves of one [N, 2I] tensor, as the fused MLP passes them.
    both = _randn(7, 2 * 1100, dtype=dtype, seed=3)
    dc = _randn(7, 1100, dtype=dtype, seed=4)
    results = []
    for force in (False, True):
        monkeypatch.setattr(_utils, "FORCE_INT64", force)
        a, b = both[:, :1100], both[:, 1100:]
        results.append((swiglu_forward(a, b), *swiglu_backward(dc, a, b, c=torch.empty_like(dc))))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_qk_rope_views_tables_and_packed_positions(monkeypatch):
    batch, seq, hq, hk, d = 2, 19, 5, 3, 18
    qkv = _randn(batch, seq, (hq + 2 * hk) * d)
    q = qkv[..., : hq * d].view(batch, seq, hq, d).transpose(1, 2)  # HF's transposed views of a fused projection
    k = qkv[..., hq * d: (hq + hk) * d].view(batch, seq, hk, d).transpose(1, 2)
    table = _randn(64, d // 2, dtype=torch.float32, seed=5)
    cos, sin = table.cos(), table.sin()
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5],
                              list(range(seq))], device=DEVICE)
    _same_both_ways(lambda q_, k_: fused_qk_rope(q_, k_, cos, sin, positions), (q, k), monkeypatch)
    per_position = cos[positions].repeat(1, 1, 2), sin[positions].repeat(1, 1, 2)  # [B, S, D] rows, HF's form
    _same_both_ways(lambda q_, k_: fused_qk_rope(q_, k_, *per_position), (q, k), monkeypatch)


def test_width_follows_the_storage(monkeypatch):
    monkeypatch.setattr(_utils, "FORCE_INT64", False)
    small = torch.empty(4096, 896, device="meta", dtype=torch.bfloat16)
    assert not _utils.needs_int64(small)
    big = torch.empty(1 << 30, device="meta", dtype=torch.bfloat16)
    assert _utils.needs_int64(small, big)
    # A small view of a large buffer: its offsets stay small, but the bound is the storage's (conservative).
    assert _utils.needs_int64(big[: 1 << 20].view(1024, 1024).t())
    assert not _utils.needs_int64(torch.empty((1 << 30) - 1, device="meta", dtype=torch.float32))
    monkeypatch.setattr(_utils, "FORCE_INT64", True)
    assert _utils.needs_int64(small)
