"""The LoRA SwiGLU kernels (low-rank terms inside the SwiGLU pass) against a float64 reference (tests/oracle.py); the
native-dtype bar is the same math as PEFT's unfused ops run it, one rounding per op."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from oracle import assert_no_worse

from chronicals.kernels.lora import _LOW_RANK_IN_SWIGLU_MAX_RANK as MAX_RANK
from chronicals.kernels.lora_swiglu import _BLOCK_M, _BLOCK_N, lora_swiglu_backward, lora_swiglu_forward

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")


def forward_ops(e0, g0, xa, b_g, b_u, s_g, s_u, a_d):
    r_g = b_g.shape[1]
    e = e0 + s_g * (xa[:, :r_g] @ b_g.t())
    g = g0 + s_u * (xa[:, r_g:] @ b_u.t())
    h = F.silu(e) * g
    return e, g, h, h @ a_d.t()


def backward_ops(dh0, e0, g0, xa, b_g, b_u, s_g, s_u, gd, a_d):
    e, g, h, _ = forward_ops(e0, g0, xa, b_g, b_u, s_g, s_u, a_d)
    dh = dh0 + gd @ a_d
    sig = torch.sigmoid(e)
    de = dh * g * sig * (1 + e * (1 - sig))
    dg = dh * e * sig
    return h, de, dg, torch.cat((s_g * (de @ b_g), s_u * (dg @ b_u)), dim=1)


# Ranks 1 to MAX_RANK (32): every rank the LoRA MLP sends here, so both rank blocks (16 and 32).
@given(n_rows=st.integers(1, 2 * _BLOCK_M + 3), n_cols=st.integers(1, 2 * _BLOCK_N + 5),
       r_g=st.integers(1, MAX_RANK), r_u=st.integers(1, MAX_RANK), r_d=st.integers(1, MAX_RANK),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), halves=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(n_rows=1, n_cols=1, r_g=1, r_u=1, r_d=1, dtype=torch.float32, halves=False, seed=0)
@example(n_rows=_BLOCK_M + 1, n_cols=_BLOCK_N + 1, r_g=16, r_u=17, r_d=3, dtype=torch.bfloat16, halves=True, seed=1)
@example(n_rows=_BLOCK_M + 3, n_cols=_BLOCK_N + 5, r_g=MAX_RANK, r_u=MAX_RANK, r_d=MAX_RANK,
         dtype=torch.bfloat16, halves=True, seed=2)
def test_lora_swiglu_matches_float64(n_rows, n_cols, r_g, r_u, r_d, dtype, halves, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)

    if halves:  # e0, g0 as the column halves of one [N, 2I] buffer (row stride 2I), as the fused gate|up matmul gives
        eg = rand(n_rows, 2 * n_cols, scale=2.0)
        e0, g0 = eg[:, :n_cols], eg[:, n_cols:]
    else:
        e0, g0 = rand(n_rows, n_cols, scale=2.0), rand(n_rows, n_cols, scale=2.0)
    xa = rand(n_rows, r_g + r_u)
    b_g, b_u, a_d = rand(n_cols, r_g, scale=0.3), rand(n_cols, r_u, scale=0.3), rand(r_d, n_cols, scale=0.3)
    s_g, s_u = 2.0, 0.5
    dh0, gd = rand(n_rows, n_cols), rand(n_rows, r_d)
    inputs64 = [t.double() for t in (e0, g0, xa, b_g, b_u)]

    h, ha = lora_swiglu_forward(e0, g0, xa, b_g, b_u, s_g, s_u, a_d)
    *_, h_nat, ha_nat = forward_ops(e0, g0, xa, b_g, b_u, s_g, s_u, a_d)
    *_, h_ref, ha_ref = forward_ops(*inputs64, s_g, s_u, a_d.double())
    assert h.dtype == ha.dtype == dtype
    assert_no_worse("h", h, h_nat, h_ref, dtype)
    assert_no_worse("h A_d^T", ha, ha_nat, ha_ref, dtype)

    e_in, g_in, dh_in = e0.clone(), g0.clone(), dh0.clone()  # the backward writes over them
    nat = backward_ops(dh0, e0, g0, xa, b_g, b_u, s_g, s_u, gd, a_d)
    ref = backward_ops(dh0.double(), *inputs64, s_g, s_u, gd.double(), a_d.double())
    out = lora_swiglu_backward(dh_in, e_in, g_in, xa, b_g, b_u, s_g, s_u, gd, a_d)
    assert out[0] is dh_in and out[1] is e_in and out[2] is g_in  # in place, as the LoRA MLP's backward relies on
    for name, o, n, r in zip(("h", "de", "dg", "G"), out, nat, ref):
        assert_no_worse(f"backward {name}", o, n, r, dtype)


def test_lora_swiglu_refuses_column_strided_inputs():
    e0 = torch.randn(8, 6, device=DEVICE).t()  # [6, 8] with column stride 6
    ok = torch.randn(6, 8, device=DEVICE)
    xa, b, a_d = torch.randn(6, 4, device=DEVICE), torch.randn(8, 2, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="e0 must be 2-D with unit column stride"):
        lora_swiglu_forward(e0, ok, xa, b, b, 1.0, 1.0, a_d)
