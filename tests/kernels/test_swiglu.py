"""SwiGLU (silu(gate) * up) against a float64 reference (tests/oracle.py)."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from oracle import assert_no_worse

from chronicals.kernels import fused_swiglu
from chronicals.kernels.swiglu import _BLOCK

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def swiglu_and_grads(fn, gate, up, dc):
    a = gate.detach().clone().requires_grad_(True)
    b = up.detach().clone().requires_grad_(True)
    c = fn(a, b)
    da, db = torch.autograd.grad(c, (a, b), dc.to(c.dtype))
    return c, da, db


def reference(a, b):
    return F.silu(a) * b


def make(shape, dtype, transposed, gen):
    """gate/up-like input: contiguous, or a transposed (non-contiguous) view of the same shape."""
    if transposed and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    else:
        t = torch.randn(*shape, generator=gen)
    return (3 * t).to(DEVICE, dtype)  # gates well into both tails of the sigmoid


@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), dtype=st.sampled_from(DTYPES),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(shape=[1], dtype=torch.float32, transposed=False, seed=0)
@example(shape=[1, 1, 1], dtype=torch.bfloat16, transposed=True, seed=1)
@example(shape=[_BLOCK + 1], dtype=torch.float16, transposed=False, seed=2)  # one element past a block
@example(shape=[3, 1500], dtype=torch.bfloat16, transposed=True, seed=3)  # several blocks, non-contiguous
def test_swiglu_matches_float64(shape, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    gate = make(shape, dtype, transposed, gen)
    up = make(shape, dtype, not transposed, gen)
    dc = torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    c, da, db = swiglu_and_grads(fused_swiglu, gate, up, dc)
    c_nat, da_nat, db_nat = swiglu_and_grads(reference, gate, up, dc)
    c_ref, da_ref, db_ref = swiglu_and_grads(reference, gate.double(), up.double(), dc.double())
    assert c.dtype == dtype and c.shape == gate.shape
    assert_no_worse("out", c, c_nat, c_ref, dtype)
    assert_no_worse("d gate", da, da_nat, da_ref, dtype)
    assert_no_worse("d up", db, db_nat, db_ref, dtype)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="but up has"):
        fused_swiglu(x, x[:, :4])
    with pytest.raises(TypeError, match="up has dtype"):
        fused_swiglu(x, x.half())
    with pytest.raises(TypeError, match="gate has dtype int64"):
        fused_swiglu(x.long(), x)
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        fused_swiglu([1.0], x)
    with pytest.raises(ValueError, match="up is on meta"):
        fused_swiglu(x, torch.empty(4, 8, device="meta"))


@pytest.mark.gpu
def test_int64_offsets_on_gpu():
    # More than 2^31 elements: the last block's offsets only fit in int64.
    n = 2**31 + 4099
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_(True)
    b = torch.randn(n, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_(True)
    c = fused_swiglu(a, b)
    dc = torch.ones_like(c)
    da, db = torch.autograd.grad(c, (a, b), dc)
    tail = slice(n - 5000, n)
    a_t, b_t = a.detach()[tail].double().requires_grad_(True), b.detach()[tail].double().requires_grad_(True)
    c_t = reference(a_t, b_t)
    da_t, db_t = torch.autograd.grad(c_t, (a_t, b_t), torch.ones_like(c_t))
    for got, want in ((c, c_t), (da, da_t), (db, db_t)):
        torch.testing.assert_close(got.detach()[tail].double(), want.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_approximate_sigmoid_matches_the_precise_one_at_the_tails_on_gpu(monkeypatch, dtype):
    # bf16/fp16 outputs take ex2/rcp.approx.ftz (swiglu._FAST_SIGMOID): at the tails (exp overflowing to inf,
    # flushed to 0), at infinities and NaN, and on random gates, outputs and gradients must equal tl.sigmoid's
    # within one rounding of the output dtype, with the same inf/NaN pattern.
    from chronicals.kernels import swiglu

    tails = [-float("inf"), -1e4, -104.0, -88.8, -87.0, -20.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 20.0, 87.0, 88.8, 104.0,
             1e4, float("inf"), float("nan")]
    gen = torch.Generator().manual_seed(0)
    gate = torch.cat([torch.tensor(tails), 8 * torch.randn(5000, generator=gen)]).to("cuda", dtype)
    up = torch.cat([torch.ones(len(tails)), torch.randn(5000, generator=gen)]).to("cuda", dtype)
    dc = torch.randn(gate.shape, generator=gen).to("cuda", dtype)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(swiglu, "_FAST_SIGMOID", fast)
        results.append(swiglu_and_grads(fused_swiglu, gate, up, dc))
    ulp = torch.finfo(dtype).eps
    for name, got, want in zip(("out", "d gate", "d up"), *results):
        got, want = got.double(), want.double()
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got.isinf(), want.isinf()), name
        finite = want.isfinite()
        diff = (got[finite] - want[finite]).abs()
        assert (diff <= ulp * want[finite].abs() + 1e-30).all(), (name, diff.max().item())
