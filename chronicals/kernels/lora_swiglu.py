"""The SwiGLU step of the fused LoRA MLP (chronicals.kernels.lora) with its thin low-rank terms computed in the same
pass, so that no [N, I] tensor is read or written for them.

With e0 = X W_g^T (+ b_g), g0 = X W_u^T (+ b_u) the base gate/up outputs [N, I], XA_g, XA_u the thin [N, r]
products X A^T, and B_g, B_u [I, r], A_d [r_d, I] the adapters:

    forward:   e  = e0 + s_g XA_g B_g^T,   g = g0 + s_u XA_u B_u^T          (in registers, never stored)
               h  = silu(e) * g                                            stored: down's matmul reads it
               HA = h A_d^T                                                [N, r_d], summed along each row panel
    backward:  dh = dh0 + GD A_d           with dh0 = dY W_d, GD = s_d dY B_d [N, r_d]
               de = dh * g * sig * (1 + e * (1 - sig)),   dg = dh * silu(e)      sig = sigmoid(e)
               GS_g = s_g de B_g,  GS_u = s_u dg B_u                        [N, r], summed along each row panel
               h is written over dh0, de over e0 and dg over g0 (each element is read before it is overwritten)

One program owns BLOCK_M whole rows and walks their I columns, so the sums along a row (HA, GS) finish inside it:
no partial sums, no atomics. The low-rank terms are tl.dot products with K = r (padded to 16). What this saves
per [N, I] tensor pass, against cuBLAS thin matmuls around the elementwise SwiGLU kernel: in the forward the two
thin writes of s XA B^T (which the base matmuls then read back) and the read of h for HA; in the backward the thin
write of GD A_d and the reads of de and dg for GS. That is six of the twelve + six passes of the unfused ops.

Math in fp32 (the thin products accumulate in fp32 and are not rounded before the add), results rounded once to
the activations' dtype. HA and GS are formed from the rounded h, de and dg, as the matmuls reading those tensors
would form them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import DOT_UPCAST, cast_rne, next_power_of_2, sigmoid

# Rows per program and columns per step of its walk. H100, Llama-3.2-1B MLP (16384 x 8192, r 16, bf16), forward /
# backward, 2026-12-07 (copying the 3 N I elements a pass moves took 534 us): 64 x 64 over 4 warps 316 / 700 us
# (85% / 76% of copy); 128 x 64 over 8 warps 322 / 768; 32 x 64 371 / 957; 64 x 32 418 / 942; 64 x 64 over 8 warps
# 452 / 999; 32 x 32 451 / 1259 (64 x 128 over 8 warps, the session before: 512 / 3468). The sm90 cubin at 64 x 64
# over 4 warps uses 255 registers and spills (448 / 1472 bytes of stack a thread, Triton's cuobjdump); the launches
# that spill less (8 warps: 8 / 272; 64 x 32: 0 / 192) are slower, so the spills are not what limits it.
_BLOCK_M = 64
_BLOCK_N = 64
_NUM_WARPS = 4
# bf16/fp16 activations take the approximate sigmoid (_utils.sigmoid, as SwiGLU's kernels; fp32 keeps tl.sigmoid);
# False keeps tl.sigmoid.
# H100, Llama-3.2-1B MLP at r16 (scripts/lora_swiglu_ab.py, reports/kernels/lora_swiglu_ab-h100-3527565.json): forward
# 308.7 against 313.1 us, backward 639.5 against 686.1, and every output the same bf16 (largest difference 0).
_FAST_SIGMOID = True


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # The interpreter's tl.dot is wrong on bf16/fp16 operands (garbage): fp32 there, the native path on a GPU. fp32
    # operands (an fp32 model) are multiplied in full fp32, as PyTorch's matmul is by default, not in TF32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _thin(PTR, rows, row_ok, stride, off, r, R: tl.constexpr):
    # Columns off .. off + r of a [N, *] thin tensor, for `rows`: [BLOCK_M, R], zero past r.
    k = tl.arange(0, R)
    return tl.load(PTR + rows[:, None] * stride + off + k[None, :], mask=row_ok[:, None] & (k < r)[None, :],
                   other=0.0)


@triton.jit
def _panel(XA, stride_xa, n_rows, off_g, off_u, r_g, r_u, RG: tl.constexpr, RU: tl.constexpr, BLOCK_M: tl.constexpr):
    # This program's rows (int64: rows * stride may pass 2^31), their mask, and their gate/up thin products XA_g, XA_u.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    xg = _thin(XA, rows, row_ok, stride_xa, off_g, r_g, RG)
    xu = _thin(XA, rows, row_ok, stride_xa, off_u, r_u, RU)
    return rows, row_ok, xg, xu


@triton.jit
def _adapter_t(B, cols, col_ok, r, R: tl.constexpr):
    # Rows `cols` of a contiguous [I, r] adapter: [BLOCK_N, R], zero past r.
    k = tl.arange(0, R)
    return tl.load(B + cols[:, None] * r + k[None, :], mask=col_ok[:, None] & (k < r)[None, :], other=0.0)


@triton.jit
def _gate_up(E, G, rows, cols, mask, stride_e, stride_g, xg, xu, bg, bu, s_g, s_u, UPCAST: tl.constexpr):
    # e = e0 + s_g XA_g B_g^T, g = g0 + s_u XA_u B_u^T for one [BLOCK_M, BLOCK_N] tile, in fp32.
    e = tl.load(E + rows[:, None] * stride_e + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e += s_g * _dot(xg, tl.trans(bg), UPCAST)
    g += s_u * _dot(xu, tl.trans(bu), UPCAST)
    return e, g


@triton.jit
def _fwd_tile(E, G, BG, BU, AD, H, rows, row_ok, c0, n_cols, stride_e, stride_g, stride_h, xg, xu, r_g, r_u, r_d,
              s_g, s_u, ha, RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, FAST: tl.constexpr):
    # Columns c0 .. c0 + BLOCK_N of the row panel: h stored, h A_d^T added to the panel's HA.
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    bg = _adapter_t(BG, cols, col_ok, r_g, RG)
    bu = _adapter_t(BU, cols, col_ok, r_u, RU)
    e, g = _gate_up(E, G, rows, cols, mask, stride_e, stride_g, xg, xu, bg, bu, s_g, s_u, UPCAST)
    h = cast_rne(e * sigmoid(e, FAST, H.dtype.element_ty) * g, H.dtype.element_ty)
    tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
    # A_d^T's rows `cols`: A_d is [r_d, I], so its column c sits at c + k * I.
    kd = tl.arange(0, RD)
    ad_t = tl.load(AD + kd[None, :] * n_cols + cols[:, None], mask=col_ok[:, None] & (kd < r_d)[None, :], other=0.0)
    return ha + _dot(h, ad_t, UPCAST)


@triton.jit
def _lora_swiglu_fwd_kernel(
    E, G, XA, BG, BU, AD, H, HA,
    n_rows, n_cols, stride_e, stride_g, stride_xa, stride_h, stride_ha,
    off_g, off_u, r_g, r_u, r_d, s_g, s_u,
    RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, FAST: tl.constexpr,
):
    rows, row_ok, xg, xu = _panel(XA, stride_xa, n_rows, off_g, off_u, r_g, r_u, RG, RU, BLOCK_M)
    ha = tl.zeros((BLOCK_M, RD), dtype=tl.float32)
    if UPCAST:  # the interpreter cannot run range() over its 1-element scalars (numpy 2.4): a while loop there
        c0 = 0
        while c0 < n_cols:
            ha = _fwd_tile(E, G, BG, BU, AD, H, rows, row_ok, c0, n_cols, stride_e, stride_g, stride_h, xg, xu, r_g,
                           r_u, r_d, s_g, s_u, ha, RG, RU, RD, BLOCK_N, UPCAST, FAST)
            c0 += BLOCK_N
    else:
        for c0 in range(0, n_cols, BLOCK_N):
            ha = _fwd_tile(E, G, BG, BU, AD, H, rows, row_ok, c0, n_cols, stride_e, stride_g, stride_h, xg, xu, r_g,
                           r_u, r_d, s_g, s_u, ha, RG, RU, RD, BLOCK_N, UPCAST, FAST)
    kd = tl.arange(0, RD)
    tl.store(HA + rows[:, None] * stride_ha + kd[None, :], cast_rne(ha, HA.dtype.element_ty),
             mask=row_ok[:, None] & (kd < r_d)[None, :])


@triton.jit
def _bwd_tile(DH, E, G, BG, BU, AD, rows, row_ok, c0, n_cols, stride_dh, stride_e, stride_g, xg, xu, gd, r_g, r_u,
              r_d, s_g, s_u, gs_g, gs_u, RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, FAST: tl.constexpr):
    # Columns c0 .. c0 + BLOCK_N of the row panel: h, de, dg stored over dh0, e0, g0; de B_g, dg B_u added to GS.
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    bg = _adapter_t(BG, cols, col_ok, r_g, RG)
    bu = _adapter_t(BU, cols, col_ok, r_u, RU)
    kd = tl.arange(0, RD)
    ad = tl.load(AD + kd[:, None] * n_cols + cols[None, :], mask=(kd < r_d)[:, None] & col_ok[None, :], other=0.0)
    dh_ptr = DH + rows[:, None] * stride_dh + cols[None, :]
    dh = tl.load(dh_ptr, mask=mask, other=0.0).to(tl.float32) + _dot(gd, ad, UPCAST)
    e, g = _gate_up(E, G, rows, cols, mask, stride_e, stride_g, xg, xu, bg, bu, s_g, s_u, UPCAST)
    sig = sigmoid(e, FAST, E.dtype.element_ty)
    silu = e * sig
    de = cast_rne(dh * g * sig * (1.0 + e * (1.0 - sig)), E.dtype.element_ty)
    dg = cast_rne(dh * silu, G.dtype.element_ty)
    tl.store(dh_ptr, cast_rne(silu * g, DH.dtype.element_ty), mask=mask)
    tl.store(E + rows[:, None] * stride_e + cols[None, :], de, mask=mask)
    tl.store(G + rows[:, None] * stride_g + cols[None, :], dg, mask=mask)
    return gs_g + _dot(de, bg, UPCAST), gs_u + _dot(dg, bu, UPCAST)


@triton.jit
def _lora_swiglu_bwd_kernel(
    DH, E, G, XA, BG, BU, GD, AD, GS,
    n_rows, n_cols, stride_dh, stride_e, stride_g, stride_xa, stride_gd, stride_gs,
    off_g, off_u, r_g, r_u, r_d, s_g, s_u,
    RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, FAST: tl.constexpr,
):
    rows, row_ok, xg, xu = _panel(XA, stride_xa, n_rows, off_g, off_u, r_g, r_u, RG, RU, BLOCK_M)
    gd = _thin(GD, rows, row_ok, stride_gd, 0, r_d, RD)
    gs_g = tl.zeros((BLOCK_M, RG), dtype=tl.float32)
    gs_u = tl.zeros((BLOCK_M, RU), dtype=tl.float32)
    if UPCAST:  # a while loop under the interpreter, as in the forward
        c0 = 0
        while c0 < n_cols:
            gs_g, gs_u = _bwd_tile(DH, E, G, BG, BU, AD, rows, row_ok, c0, n_cols, stride_dh, stride_e, stride_g, xg,
                                   xu, gd, r_g, r_u, r_d, s_g, s_u, gs_g, gs_u, RG, RU, RD, BLOCK_N, UPCAST,
                                   FAST)
            c0 += BLOCK_N
    else:
        for c0 in range(0, n_cols, BLOCK_N):
            gs_g, gs_u = _bwd_tile(DH, E, G, BG, BU, AD, rows, row_ok, c0, n_cols, stride_dh, stride_e, stride_g, xg,
                                   xu, gd, r_g, r_u, r_d, s_g, s_u, gs_g, gs_u, RG, RU, RD, BLOCK_N, UPCAST,
                                   FAST)
    kg = tl.arange(0, RG)
    ku = tl.arange(0, RU)
    tl.store(GS + rows[:, None] * stride_gs + kg[None, :], cast_rne(s_g * gs_g, GS.dtype.element_ty),
             mask=row_ok[:, None] & (kg < r_g)[None, :])
    tl.store(GS + rows[:, None] * stride_gs + r_g + ku[None, :], cast_rne(s_u * gs_u, GS.dtype.element_ty),
             mask=row_ok[:, None] & (ku < r_u)[None, :])


def _rank_block(r: int) -> int:
    return max(16, next_power_of_2(r))  # tl.dot wants every dimension >= 16


def _row_strided(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be 2-D with unit column stride, got shape {tuple(t.shape)} strides {t.stride()}")


def _launch_args(e0, g0, xa, b_g, b_u, a_d):
    for name, t in (("e0", e0), ("g0", g0), ("xa", xa)):
        _row_strided(name, t)
    for name, t in (("b_g", b_g), ("b_u", b_u), ("a_d", a_d)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    n_rows, n_cols = e0.shape
    r_g, r_u, r_d = b_g.shape[1], b_u.shape[1], a_d.shape[0]
    return n_rows, n_cols, r_g, r_u, r_d, (triton.cdiv(n_rows, _BLOCK_M),)


def lora_swiglu_forward(e0, g0, xa, b_g, b_u, s_g: float, s_u: float, a_d):
    """(h [N, I], HA [N, r_d]) from the base gate/up outputs e0, g0 [N, I], xa = [XA_g | XA_u] [N, r_g + r_u], the
    adapters b_g, b_u [I, r] and a_d [r_d, I] (all in the activations' dtype) and the scales."""
    n_rows, n_cols, r_g, r_u, r_d, grid = _launch_args(e0, g0, xa, b_g, b_u, a_d)
    h = torch.empty((n_rows, n_cols), dtype=e0.dtype, device=e0.device)
    ha = torch.empty((n_rows, r_d), dtype=e0.dtype, device=e0.device)
    if n_rows and n_cols:
        _lora_swiglu_fwd_kernel[grid](
            e0, g0, xa, b_g, b_u, a_d, h, ha,
            n_rows, n_cols, e0.stride(0), g0.stride(0), xa.stride(0), h.stride(0), ha.stride(0),
            0, r_g, r_g, r_u, r_d, float(s_g), float(s_u),
            RG=_rank_block(r_g), RU=_rank_block(r_u), RD=_rank_block(r_d), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
            UPCAST=DOT_UPCAST, FAST=_FAST_SIGMOID, num_warps=_NUM_WARPS,
        )
    return h, ha


def lora_swiglu_backward(dh0, e0, g0, xa, b_g, b_u, s_g: float, s_u: float, gd, a_d):
    """In place: h over dh0, de over e0, dg over g0; returns (h, de, dg, GS) with GS = [s_g de B_g | s_u dg B_u]
    [N, r_g + r_u]. dh0 = dY W_d is dh's base part and gd = s_d dY B_d [N, r_d]; the rest as for the forward."""
    n_rows, n_cols, r_g, r_u, r_d, grid = _launch_args(e0, g0, xa, b_g, b_u, a_d)
    _row_strided("dh0", dh0)
    _row_strided("gd", gd)
    gs = torch.empty((n_rows, r_g + r_u), dtype=e0.dtype, device=e0.device)
    if n_rows and n_cols:
        _lora_swiglu_bwd_kernel[grid](
            dh0, e0, g0, xa, b_g, b_u, gd, a_d, gs,
            n_rows, n_cols, dh0.stride(0), e0.stride(0), g0.stride(0), xa.stride(0), gd.stride(0), gs.stride(0),
            0, r_g, r_g, r_u, r_d, float(s_g), float(s_u),
            RG=_rank_block(r_g), RU=_rank_block(r_u), RD=_rank_block(r_d), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
            UPCAST=DOT_UPCAST, FAST=_FAST_SIGMOID, num_warps=_NUM_WARPS,
        )
    return dh0, e0, g0, gs
