"""Fused QK-RoPE against a float64 reference of Hugging Face's apply_rotary_pos_emb (tests/oracle.py)."""

import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from oracle import assert_no_worse

from chronicals.kernels import fused_qk_rope, rope
from chronicals.kernels.rope import _settings

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rope(q, k, cos, sin):
    """HF apply_rotary_pos_emb with cos/sin [B or 1, S, D] (unsqueezed over heads)."""
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def packed_positions(batch, seq, gen):
    """Positions that restart at 0 at random sequence boundaries, as in a packed batch."""
    rows = []
    for _ in range(batch):
        pos, p = [], 0
        for _ in range(seq):
            p = 0 if torch.rand((), generator=gen) < 0.25 else p
            pos.append(p)
            p += 1
        rows.append(pos)
    return torch.tensor(rows)


def rope_table(n_pos, head_dim, dtype, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def make_qk(batch, heads, seq, head_dim, dtype, hf_layout, gen):
    """[B, H, S, D]: HF's view(B, S, H, D).transpose(1, 2) (non-contiguous), or contiguous."""
    if hf_layout:
        return torch.randn(batch, seq, heads, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(batch, heads, seq, head_dim, generator=gen).to(DEVICE, dtype)


def rope_and_grads(fn, q, k, upstream):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_rot, k_rot = fn(q, k)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), [g.to(q_rot.dtype) for g in upstream])
    return q_rot, k_rot, dq, dk


@st.composite
def rope_cases(draw):
    n_q = draw(st.integers(1, 6))
    return dict(batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 9)), n_q=n_q, n_k=draw(st.integers(1, n_q)),
                head_dim=2 * draw(st.integers(1, 20)), dtype=draw(st.sampled_from(DTYPES)),
                cos_mode=draw(st.sampled_from(["per_batch", "shared", "table", "table_shared"])),
                cos_fp32=draw(st.booleans()), half_table=draw(st.booleans()),
                hf_layout=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def case(**kw):
    base = dict(batch=1, seq=1, n_q=1, n_k=1, head_dim=2, dtype=torch.float32, cos_mode="per_batch",
                cos_fp32=False, half_table=False, hf_layout=True, seed=0)
    return base | kw


# One more position than a program handles, for Qwen2.5-0.5B's heads (14 q, 2 kv of 64).
_PPP = _settings(14, 2, 64)[3]


@given(c=rope_cases())
@example(c=case())  # one position, one head each, head_dim 2
@example(c=case(batch=1, seq=_PPP + 1, n_q=14, n_k=2, head_dim=64, dtype=torch.bfloat16, cos_mode="table"))
@example(c=case(batch=2, seq=_PPP + 1, n_q=14, n_k=2, head_dim=64, dtype=torch.bfloat16, half_table=True))
@example(c=case(batch=2, seq=3, n_q=32, n_k=8, head_dim=128, dtype=torch.bfloat16, cos_mode="shared"))
@example(c=case(batch=1, seq=2, n_q=64, n_k=8, head_dim=256, dtype=torch.float16, cos_fp32=True))  # 16384 q/pos
@example(c=case(batch=3, seq=5, n_q=5, n_k=3, head_dim=18, dtype=torch.float16, hf_layout=False,
                cos_mode="table_shared"))
def test_qk_rope_matches_float64(c):
    dtype = c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"])
    b, s, d = c["batch"], c["seq"], c["head_dim"]
    q = make_qk(b, c["n_q"], s, d, dtype, c["hf_layout"], gen)
    k = make_qk(b, c["n_k"], s, d, dtype, c["hf_layout"], gen)
    upstream = [torch.randn(q.shape, generator=gen).to(DEVICE, dtype),
                torch.randn(k.shape, generator=gen).to(DEVICE, dtype)]
    pos = packed_positions(1 if c["cos_mode"].endswith("shared") else b, s, gen).to(DEVICE)
    cos_t, sin_t = rope_table(int(pos.max()) + 3, d, torch.float32 if c["cos_fp32"] else dtype)
    cos, sin = cos_t[pos], sin_t[pos]  # HF's per-position [B or 1, S, D]
    # The first halves only, as tensors of their own (rows of D/2; HF's halves are equal). A view of the full rows
    # would hide a kernel that reads past the half: it would find the equal second half there.
    width = d // 2 if c["half_table"] else d
    cut = lambda t: t[..., :width].contiguous()  # noqa: E731
    if c["cos_mode"].startswith("table"):
        kernel = lambda q_, k_: fused_qk_rope(q_, k_, cut(cos_t), cut(sin_t), position_ids=pos)
    else:
        kernel = lambda q_, k_: fused_qk_rope(q_, k_, cut(cos), cut(sin))

    q_rot, k_rot, dq, dk = rope_and_grads(kernel, q, k, upstream)
    nat = rope_and_grads(lambda q_, k_: hf_rope(q_, k_, cos, sin), q, k, upstream)
    ref = rope_and_grads(lambda q_, k_: hf_rope(q_, k_, cos.double(), sin.double()), q.double(), k.double(),
                         [g.double() for g in upstream])
    assert q_rot.dtype == dtype and q_rot.shape == q.shape and k_rot.shape == k.shape
    for name, out, n, r in zip(["q_rot", "k_rot", "dq", "dk"], (q_rot, k_rot, dq, dk), nat, ref):
        assert_no_worse(name, out, n, r, dtype)


def test_table_without_position_ids_uses_positions_from_zero():
    gen = torch.Generator().manual_seed(0)
    q = make_qk(2, 4, 6, 16, torch.float32, True, gen)
    k = make_qk(2, 2, 6, 16, torch.float32, True, gen)
    cos_t, sin_t = rope_table(10, 16, torch.float32)
    q_rot, k_rot = fused_qk_rope(q, k, cos_t, sin_t)
    q_ref, k_ref = hf_rope(q, k, cos_t[:6][None], sin_t[:6][None])
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_rot, k_ref)


def test_one_row_of_position_ids_serves_every_row_of_the_batch():
    # position_ids [S] (torch.arange(S) + offset, say) is [1, S]: the same positions for every sequence.
    gen = torch.Generator().manual_seed(3)
    q = make_qk(2, 4, 6, 16, torch.float32, True, gen).to(DEVICE)
    k = make_qk(2, 2, 6, 16, torch.float32, True, gen).to(DEVICE)
    cos_t, sin_t = rope_table(10, 16, torch.float32)
    positions = torch.tensor([3, 4, 5, 0, 1, 2])
    q_ref, k_ref = hf_rope(q.cpu(), k.cpu(), cos_t[positions][None], sin_t[positions][None])
    got = fused_qk_rope(q, k, cos_t.to(DEVICE), sin_t.to(DEVICE), positions.to(DEVICE))
    for g, want in zip(got, (q_ref, k_ref)):
        torch.testing.assert_close(g.cpu(), want)
    with pytest.raises(ValueError, match=r"position_ids has shape \(5,\); expected \[6\]"):
        fused_qk_rope(q, k, cos_t.to(DEVICE), sin_t.to(DEVICE), positions[:5].to(DEVICE))


def test_cos_sin_unsqueezed_at_the_head_dim_as_hf_broadcasts_them():
    gen = torch.Generator().manual_seed(1)
    q = make_qk(2, 4, 6, 16, torch.float32, True, gen).to(DEVICE)
    k = make_qk(2, 2, 6, 16, torch.float32, True, gen).to(DEVICE)
    cos_t, sin_t = rope_table(10, 16, torch.float32)
    cos, sin = cos_t[3:9][None].expand(2, -1, -1).to(DEVICE), sin_t[3:9][None].expand(2, -1, -1).to(DEVICE)
    expected = fused_qk_rope(q, k, cos, sin)
    for got, want in zip(fused_qk_rope(q, k, cos[:, None], sin[:, None]), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cos"):
        fused_qk_rope(q, k, cos[:, None].expand(2, 4, 6, 16), sin[:, None].expand(2, 4, 6, 16))


def test_position_ids_beside_per_position_cos_sin_are_not_used_as_in_hf():
    # HF's apply_rotary_pos_emb(q, k, cos, sin, position_ids) and Liger's liger_rotary_pos_emb take position_ids
    # and ignore it: the [B, S, D] cos/sin were already gathered at those positions (packed: restarting ones).
    gen = torch.Generator().manual_seed(2)
    q = make_qk(2, 4, 6, 16, torch.float32, True, gen).to(DEVICE)
    k = make_qk(2, 2, 6, 16, torch.float32, True, gen).to(DEVICE)
    cos_t, sin_t = rope_table(10, 16, torch.float32)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [4, 5, 6, 7, 8, 9]])
    cos, sin = cos_t[position_ids].to(DEVICE), sin_t[position_ids].to(DEVICE)
    q_ref, k_ref = hf_rope(q.cpu(), k.cpu(), cos.cpu(), sin.cpu())
    for got, want in zip(fused_qk_rope(q, k, cos, sin, position_ids.to(DEVICE)), (q_ref, k_ref)):
        torch.testing.assert_close(got.cpu(), want)


def test_expanded_inputs_and_gradients_keep_head_dim_innermost():
    """A stride-0 (expanded) dimension, as in q broadcast over the batch or the gradient of q_rot.sum(0), once sorted
    below head_dim in the output layout, so the kernel (unit last stride) wrote out of place: garbage."""
    gen = torch.Generator().manual_seed(2)
    q = make_qk(1, 4, 6, 16, torch.float32, True, gen).expand(3, -1, -1, -1)
    k = make_qk(3, 2, 6, 16, torch.float32, True, gen)
    cos_t, sin_t = rope_table(6, 16, torch.float32)
    q_rot, k_rot = fused_qk_rope(q, k, cos_t, sin_t)
    q_ref, k_ref = hf_rope(q, k, cos_t[None], sin_t[None])
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_rot, k_ref)
    w_q, w_k = torch.randn(4, 6, 16, generator=gen).to(DEVICE), torch.randn(2, 6, 16, generator=gen).to(DEVICE)
    loss = lambda q_rot, k_rot: (q_rot.sum(0) * w_q).sum() + (k_rot.sum(0) * w_k).sum()  # dq, dk stride 0 over B
    q_, k_ = (t.detach().clone().requires_grad_(True) for t in (q.contiguous(), k))
    want = torch.autograd.grad(loss(*hf_rope(q_, k_, cos_t[None], sin_t[None])), (q_, k_))
    q_, k_ = (t.detach().clone().requires_grad_(True) for t in (q.contiguous(), k))
    for g, w in zip(torch.autograd.grad(loss(*fused_qk_rope(q_, k_, cos_t, sin_t)), (q_, k_)), want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("hf_layout", [True, False])
def test_outputs_can_be_changed_in_place_as_hfs(hf_layout):
    """q_rot and k_rot were permuted views of the tensors allocated inside the autograd.Function, so an in-place
    change (q_rot.mul_(scale), k_rot += bias) raised "Output 0 of QKRopeFunction is a view and is being modified
    inplace"; HF's RoPE output allows it. The outputs keep the inputs' memory order."""
    gen = torch.Generator().manual_seed(4)
    q = make_qk(2, 4, 5, 16, torch.float32, hf_layout, gen)
    k = make_qk(2, 2, 5, 16, torch.float32, hf_layout, gen)
    upstream = [torch.randn(q.shape, generator=gen).to(DEVICE), torch.randn(k.shape, generator=gen).to(DEVICE)]
    cos_t, sin_t = rope_table(5, 16, torch.float32)

    def rope_then_inplace(fn):
        def run(q_, k_):
            q_rot, k_rot = fn(q_, k_)
            q_rot.mul_(0.25)
            k_rot += 1.0
            return q_rot, k_rot
        return run

    q_rot, k_rot, dq, dk = rope_and_grads(rope_then_inplace(lambda a, b: fused_qk_rope(a, b, cos_t, sin_t)), q, k,
                                          upstream)
    ref = rope_and_grads(rope_then_inplace(lambda a, b: hf_rope(a, b, cos_t[None].double(), sin_t[None].double())),
                         q.double(), k.double(), [g.double() for g in upstream])
    for out, want in zip((q_rot, k_rot, dq, dk), ref):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    order = lambda t: sorted(range(4), key=lambda d: t.stride(d), reverse=True)  # noqa: E731
    assert order(q_rot) == order(q) and order(k_rot) == order(k)
    assert q_rot._base is None and k_rot._base is None


def test_outputs_strided_as_the_inputs_take_the_inputs_offsets(monkeypatch):
    """Where q_out/k_out have q's/k's strides (HF's views, contiguous inputs, gradients in their layout) the kernel
    addresses the outputs with the inputs' offsets (OUT_LIKE_IN). It must write what the outputs' own strides give,
    bit for bit, forward and backward; q and k split from one fused q/k/v output (rows wider than q) keep their own."""
    flags = []
    kernel = rope._qk_rope_kernel

    class Spy:  # records OUT_LIKE_IN of each launch
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                flags.append(kwargs["OUT_LIKE_IN"])
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(rope, "_qk_rope_kernel", Spy())
    gen = torch.Generator().manual_seed(5)
    b, s, n_q, n_k, d = 2, 7, 5, 3, 12
    cos_t, sin_t = rope_table(s, d, torch.float32)
    heads = lambda t, h: t.view(b, s, h, d).transpose(1, 2)  # noqa: E731 (HF's view of a projection's output)
    # "hf": q and k from their own projections ([B, S, H * D] each); "fused qkv": views of one q/k/v output, whose rows
    # are wider than q's (the patched models' fused projection)
    layouts = {"hf": ([(n_q * d,), (n_k * d,)], lambda q, k: (heads(q, n_q), heads(k, n_k))),
               "fused qkv": ([((n_q + 2 * n_k) * d,)],
                             lambda x: tuple(heads(t, h) for t, h in zip(x.split([n_q * d, n_k * d, n_k * d], -1),
                                                                        (n_q, n_k))))}
    for name, (widths, views) in layouts.items():
        xs = [torch.randn(b, s, *w, generator=gen).to(DEVICE, torch.bfloat16) for w in widths]
        upstream = [torch.randn(b, h, s, d, generator=gen).to(DEVICE, torch.bfloat16) for h in (n_q, n_k)]
        got = {}
        for shared in (True, False):
            monkeypatch.setattr(rope, "_OUT_OFFSETS_SHARED", shared)
            flags.clear()
            leaves = [x.detach().clone().requires_grad_(True) for x in xs]
            q_rot, k_rot = fused_qk_rope(*views(*leaves), cos_t, sin_t)
            got[shared] = (q_rot, k_rot, *torch.autograd.grad((q_rot, k_rot), leaves, upstream))
            # forward: the outputs are dense, as HF's q and k views are and views of wider q/k/v rows are not;
            # backward: dq and dk come in q_rot's and k_rot's dense layout
            assert flags == [shared and name == "hf", shared], (name, shared, flags)
        for a, c in zip(got[True], got[False]):
            assert torch.equal(a, c), name


@pytest.mark.parametrize("cos_mode", ["per_batch", "shared", "table"])
def test_batches_beyond_the_grid_limit_launch_per_slice(monkeypatch, cos_mode):
    """The grid's second dimension runs over the batch (CUDA allows 65535); larger batches launch per slice, with
    per-row cos/sin and position_ids sliced along. The limit is lowered here so that a small batch crosses it."""
    from chronicals.kernels import rope

    gen = torch.Generator().manual_seed(3)
    q = make_qk(5, 3, 4, 8, torch.float32, True, gen)
    k = make_qk(5, 1, 4, 8, torch.float32, True, gen)
    pos = packed_positions(5, 4, gen).to(DEVICE)
    cos_t, sin_t = rope_table(8, 8, torch.float32)
    if cos_mode == "table":
        call = lambda: fused_qk_rope(q, k, cos_t, sin_t, position_ids=pos)  # noqa: E731
        cos, sin = cos_t[pos], sin_t[pos]
    else:
        cos, sin = (cos_t[pos], sin_t[pos]) if cos_mode == "per_batch" else (cos_t[pos[:1]], sin_t[pos[:1]])
        call = lambda: fused_qk_rope(q, k, cos, sin)  # noqa: E731
    monkeypatch.setattr(rope, "_MAX_GRID_BATCH", 2)
    for got, want in zip(call(), hf_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want)


def test_bad_input_names_the_argument():
    q = torch.randn(1, 4, 5, 8, device=DEVICE)
    k = torch.randn(1, 2, 5, 8, device=DEVICE)
    cos, sin = rope_table(5, 8, torch.float32)
    cos3, sin3 = cos[None], sin[None]
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        fused_qk_rope(q[0], k, cos3, sin3)
    with pytest.raises(TypeError, match="k has dtype"):
        fused_qk_rope(q, k.half(), cos3, sin3)
    with pytest.raises(ValueError, match="k has shape"):
        fused_qk_rope(q, k[:, :, :4], cos3, sin3)
    with pytest.raises(ValueError, match="even head_dim"):
        fused_qk_rope(q[..., :7], k[..., :7], cos3[..., :7], sin3[..., :7])
    with pytest.raises(ValueError, match="cos/sin have last dimension 6 but q and k have head_dim 8"):
        fused_qk_rope(q, k, cos3[..., :6], sin3[..., :6])
    with pytest.raises(ValueError, match="but sin has"):
        fused_qk_rope(q, k, cos3, sin)
    with pytest.raises(ValueError, match="position_ids range"):
        fused_qk_rope(q, k, cos, sin, position_ids=torch.full((1, 5), 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="position_ids has dtype"):
        fused_qk_rope(q, k, cos, sin, position_ids=torch.zeros(1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="cos/sin require grad"):
        fused_qk_rope(q, k, cos3.requires_grad_(), sin3)
    with pytest.raises(ValueError, match="sin is on meta"):
        fused_qk_rope(q, k, cos3.detach(), torch.empty(1, 5, 8, device="meta"))
    # q and k in [B, S, heads, D] (equal head counts pass the shape checks): the message says which layout is read.
    with pytest.raises(ValueError, match=r"read as \[B, heads, S, D\].*transpose\(1, 2\)"):
        fused_qk_rope(q.transpose(1, 2), q.transpose(1, 2), cos3.detach(), sin3)
    # The leading size accepted, as the message states it: "1" for a batch of one (not "1 or 1"), else "1 or B".
    with pytest.raises(ValueError, match=r"expected \[1, 5, 8 or 4\]"):
        fused_qk_rope(q, k, cos3.detach()[:, :4], sin3[:, :4])
    with pytest.raises(ValueError, match=r"expected \[1 or 2, 5\]"):
        fused_qk_rope(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), cos, sin,
                      position_ids=torch.zeros(3, 5, dtype=torch.long, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("n_q,n_k,head_dim", [(32, 8, 128), (14, 2, 64)])
def test_model_shapes_on_gpu_tuned_launch(n_q, n_k, head_dim):
    # 2 x 2048 positions: large enough for the autotuned launch (small calls take a fixed config).
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2048, n_q, head_dim, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 2048, n_k, head_dim, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2)
    upstream = [torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16),
                torch.randn(k.shape, generator=gen).to("cuda", torch.bfloat16)]
    pos = torch.arange(2048, device="cuda").repeat(2, 1) % 1000  # packed: restarts at 0
    cos_t, sin_t = rope_table(1000, head_dim, torch.bfloat16)
    cos_t, sin_t = cos_t.cuda(), sin_t.cuda()
    cos, sin = cos_t[pos], sin_t[pos]
    half = head_dim // 2
    for kernel in (lambda q_, k_: fused_qk_rope(q_, k_, cos, sin),
                   lambda q_, k_: fused_qk_rope(q_, k_, cos[..., :half], sin[..., :half]),
                   lambda q_, k_: fused_qk_rope(q_, k_, cos_t, sin_t, position_ids=pos)):
        got = rope_and_grads(kernel, q, k, upstream)
        nat = rope_and_grads(lambda q_, k_: hf_rope(q_, k_, cos, sin), q, k, upstream)
        ref = rope_and_grads(lambda q_, k_: hf_rope(q_, k_, cos.double(), sin.double()), q.double(), k.double(),
                             [g.double() for g in upstream])
        for name, out, n, r in zip(["q_rot", "k_rot", "dq", "dk"], got, nat, ref):
            assert_no_worse(name, out, n, r, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n_q,n_k,head_dim", [(14, 2, 64), (32, 8, 128), (1, 1, 2), (5, 3, 80), (3, 1, 10)])
def test_bit_widening_equals_the_cvt_at_every_launch_shape(monkeypatch, n_q, n_k, head_dim):
    # _utils.widen's inline PTX sees bf16 pairs as the layout packs them, so tiles of one element per thread (k's
    # [2, 32] at 2 warps) and tiles smaller than the warp are the cases to pin: both widenings are exact, so the
    # outputs must be bit-identical, forward and backward, at every fixed launch.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, n_q, head_dim, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 37, n_k, head_dim, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2)
    cos_t, sin_t = rope_table(64, head_dim, torch.bfloat16)
    pos = (torch.arange(37, device="cuda").repeat(2, 1) * 7) % 64
    for launch in ((1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (2, 1), (2, 8)):
        monkeypatch.setattr(rope, "_LAUNCH", launch)
        outs = []
        for bits in (True, False):
            monkeypatch.setattr(rope, "_BIT_WIDEN", bits)
            for table in ((cos_t[:, :head_dim // 2], sin_t[:, :head_dim // 2]), (cos_t.float(), sin_t.float())):
                q_out, k_out = torch.empty_like(q), torch.empty_like(k)
                rope.qk_rope_launch(q, k, q_out, k_out, *table, pos, backward=False)
                dq, dk = torch.empty_like(q), torch.empty_like(k)
                rope.qk_rope_launch(q_out, k_out, dq, dk, *table, pos, backward=True)
                outs.append((q_out, k_out, dq, dk))
        half = len(outs) // 2
        for with_bits, with_cvt in zip(outs[:half], outs[half:]):
            for a, b in zip(with_bits, with_cvt):
                assert torch.equal(a, b), launch
