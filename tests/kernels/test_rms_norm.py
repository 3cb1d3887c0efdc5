"""RMSNorm and fused add + RMSNorm against a float64 reference (tests/oracle.py)."""

import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from oracle import SLACK, assert_no_worse

from chronicals.kernels import FusedRMSNorm, fused_add_rmsnorm, fused_rmsnorm, fused_rmsnorm_residual

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hf_rmsnorm(x, w, eps, offset):
    """Hugging Face Llama's RMSNorm (stats in fp32, normalised x rounded to x's dtype, times the weight);
    in float64 it is the ground truth."""
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((offset + w) * xn.to(x.dtype)).to(x.dtype)


def make_input(shape, dtype, layout, device, gen):
    """A tensor of `shape` that is contiguous, a column slice of a wider tensor, or a transposed view."""
    if layout == "sliced":
        return torch.randn(*shape[:-1], shape[-1] + 3, generator=gen, dtype=dtype).to(device)[..., : shape[-1]]
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=dtype).to(device).transpose(-1, -2)
    return torch.randn(*shape, generator=gen, dtype=dtype).to(device)


def grads(fn, inputs, upstream):
    """Outputs and input gradients of fn(*inputs) for the given upstream gradients (None = output unused)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, upstream) if g is not None]
    gs = torch.autograd.grad([o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    return outs, gs


def dx_slack(x, w, dy, eps, offset, dx_ref, dtype):
    """Slack for dx = rstd * (g - xh * mean(g * xh)), g = dy * (offset + w): the difference cancels to
    a residue of order eps / mean(x^2) when the row is short (hidden 1: g * (1 - xh^2)), so any fp32
    evaluation errs by a few ulp of the cancelled terms, not of the result. Negligible for longer rows."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    terms = (dy.double() * (offset + w.double()) * rstd).norm() / dx_ref.norm().clamp_min(1e-300)
    return SLACK[dtype] + 8 * 2.0**-24 * terms.item()


shapes = st.tuples(st.integers(1, 40), st.integers(1, 1100))


@given(shape=shapes, dtype=st.sampled_from(DTYPES), w_fp32=st.booleans(), offset=st.sampled_from([0.0, 1.0, 0.25]),
       layout=st.sampled_from(["contiguous", "sliced", "transposed"]), leading3d=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(shape=(1, 64), dtype=torch.bfloat16, w_fp32=False, offset=0.0, layout="contiguous", leading3d=False, seed=0)
@example(shape=(9, 1), dtype=torch.float32, w_fp32=False, offset=0.0, layout="contiguous", leading3d=False, seed=1)
# Block + 1: hidden one past a power of two, and rows one past the rows one tile holds (16 at 129).
@example(shape=(17, 129), dtype=torch.float16, w_fp32=False, offset=1.0, layout="sliced", leading3d=False, seed=2)
# More row tiles (20) than backward programs on CPU, so programs loop and dw partials add up.
@example(shape=(77, 1000), dtype=torch.bfloat16, w_fp32=True, offset=0.0, layout="transposed", leading3d=True, seed=3)
def test_rmsnorm_matches_float64(shape, dtype, w_fp32, offset, layout, leading3d, seed):
    rows, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    full = (2, rows, hidden) if leading3d else (rows, hidden)
    x = make_input(full, dtype, layout, DEVICE, gen)
    w_dtype = torch.float32 if w_fp32 else dtype
    w = (torch.rand(hidden, generator=gen, dtype=torch.float32) + 0.5 - offset).to(DEVICE, w_dtype)
    dy = torch.randn(full, generator=gen, dtype=torch.float32).to(DEVICE, dtype)
    eps = 1e-6

    (y,), (dx, dw) = grads(lambda a, b: fused_rmsnorm(a, b, eps=eps, offset=offset), (x, w), [dy])
    (y_nat,), (dx_nat, dw_nat) = grads(lambda a, b: hf_rmsnorm(a, b, eps, offset), (x, w), [dy])
    (y_ref,), (dx_ref, dw_ref) = grads(lambda a, b: hf_rmsnorm(a, b, eps, offset),
                                       (x.double(), w.double()), [dy.double()])
    # The output is in x's dtype also for an fp32 weight (the documented contract, as Liger's), where HF's
    # LlamaRMSNorm promotes to fp32: that would double the bytes of Qwen3's q/k norms under autocast.
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == w_dtype
    assert_no_worse("y", y, y_nat.to(dtype), y_ref, dtype)
    assert_no_worse("dx", dx, dx_nat, dx_ref, dtype, slack=dx_slack(x, w, dy, eps, offset, dx_ref, dtype))
    assert_no_worse("dw", dw, dw_nat, dw_ref, dtype)


@given(shape=shapes, dtype=st.sampled_from(DTYPES), offset=st.sampled_from([0.0, 1.0]),
       used=st.sampled_from(["both", "normed", "summed"]), layout=st.sampled_from(["contiguous", "sliced"]),
       seed=st.integers(0, 2**31 - 1))
@example(shape=(1, 1), dtype=torch.float32, offset=0.0, used="both", layout="contiguous", seed=0)
@example(shape=(33, 127), dtype=torch.bfloat16, offset=1.0, used="both", layout="sliced", seed=1)
def test_add_rmsnorm_matches_float64(shape, dtype, offset, used, layout, seed):
    rows, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    x = make_input((rows, hidden), dtype, layout, DEVICE, gen)
    r = make_input((rows, hidden), dtype, "contiguous", DEVICE, gen)
    w = (torch.rand(hidden, generator=gen) + 0.5 - offset).to(DEVICE, dtype)
    ds = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) if used != "normed" else None
    dy = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) if used != "summed" else None
    eps = 1e-5

    def unfused(a, b, c):
        s = a + b
        return s, hf_rmsnorm(s, c, eps, offset)

    (s, y), (dx, dr, dw) = grads(lambda a, b, c: fused_add_rmsnorm(a, b, c, eps=eps, offset=offset), (x, r, w),
                                 [ds, dy])
    (s_nat, y_nat), (dx_nat, _, dw_nat) = grads(unfused, (x, r, w), [ds, dy])
    ref_up = [g.double() if g is not None else None for g in (ds, dy)]
    (s_ref, y_ref), (dx_ref, _, dw_ref) = grads(unfused, (x.double(), r.double(), w.double()), ref_up)
    assert torch.equal(s, s_nat), "the sum must equal PyTorch's own add in the input dtype"
    assert_no_worse("normed", y, y_nat, y_ref, dtype)
    slack = dx_slack(s_ref, w, dy, eps, offset, dx_ref, dtype) if dy is not None else None
    assert_no_worse("d hidden_states", dx, dx_nat, dx_ref, dtype, slack=slack)
    assert torch.equal(dx, dr), "hidden_states and residual enter only through their sum"
    if used == "summed":
        assert dw is None or not dw.any()
    else:
        assert_no_worse("dw", dw, dw_nat, dw_ref, dtype)


@given(shape=shapes, dtype=st.sampled_from(DTYPES), offset=st.sampled_from([0.0, 1.0]),
       used=st.sampled_from(["both", "normed", "residual"]), layout=st.sampled_from(["contiguous", "sliced"]),
       seed=st.integers(0, 2**31 - 1))
@example(shape=(1, 1), dtype=torch.float32, offset=0.0, used="both", layout="contiguous", seed=0)
@example(shape=(33, 127), dtype=torch.bfloat16, offset=1.0, used="both", layout="sliced", seed=1)
def test_rmsnorm_residual_matches_float64(shape, dtype, offset, used, layout, seed):
    # (x, rmsnorm(x)): x's two gradients (the residual stream's and the norm's) summed inside the norm's backward.
    rows, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    x = make_input((rows, hidden), dtype, layout, DEVICE, gen)
    w = (torch.rand(hidden, generator=gen) + 0.5 - offset).to(DEVICE, dtype)
    dr = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) if used != "normed" else None
    dy = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) if used != "residual" else None
    eps = 1e-5

    def unfused(a, c):
        return a * 1, hf_rmsnorm(a, c, eps, offset)

    (r, y), (dx, dw) = grads(lambda a, c: fused_rmsnorm_residual(a, c, eps=eps, offset=offset), (x, w), [dr, dy])
    (_, y_nat), (dx_nat, dw_nat) = grads(unfused, (x, w), [dr, dy])
    ref_up = [g.double() if g is not None else None for g in (dr, dy)]
    (_, y_ref), (dx_ref, dw_ref) = grads(unfused, (x.double(), w.double()), ref_up)
    assert torch.equal(r, x), "the residual is the input itself"
    assert_no_worse("normed", y, y_nat, y_ref, dtype)
    if used == "residual":
        assert torch.equal(dx, dr) and (dw is None or not dw.any())
        return
    slack = dx_slack(x, w, dy, eps, offset, dx_ref, dtype)
    assert_no_worse("d hidden_states", dx, dx_nat, dx_ref, dtype, slack=slack)
    assert_no_worse("dw", dw, dw_nat, dw_ref, dtype)


def test_rmsnorm_residual_is_a_view_of_the_input_with_its_own_gradient():
    # The residual handed back is the input's storage (no copy), and as a pre-norm layer uses it (s = attn + x; a
    # loss of s and of the norm) the input's gradient is the sum of both paths.
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    w = torch.rand(24, device=DEVICE) + 0.5
    r, y = fused_rmsnorm_residual(x, w)
    assert r.data_ptr() == x.data_ptr()
    (3 * r + y.square()).sum().backward()
    xd = x.detach().double().requires_grad_()
    (3 * xd + hf_rmsnorm(xd, w.double(), 1e-6, 0.0).square()).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_add", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.0])
def test_hidden_size_one_input_gradient_is_exact(fused_add, eps):
    # At hidden 1, dx = g * (1 - xh^2) = g * eps * rstd^3: the general form cancels two nearly equal terms there
    # (fp32 kept 1e-4 to 5e-3 relative error, as PyTorch's own does). It must be within a few fp32 ulp of float64.
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(64, 1, generator=gen).to(DEVICE) for _ in range(2))
    w, dy = torch.randn(1, generator=gen).to(DEVICE), torch.randn(64, 1, generator=gen).to(DEVICE)
    if fused_add:
        def op(a, b, c):
            return fused_add_rmsnorm(a, b, c, eps)[1]

        def ref(a, b, c):
            return hf_rmsnorm(a + b, c, eps, 0.0)
        inputs = (x, r, w)
    else:
        def op(a, c):
            return fused_rmsnorm(a, c, eps)

        def ref(a, c):
            return hf_rmsnorm(a, c, eps, 0.0)
        inputs = (x, w)
    _, got = grads(op, inputs, [dy])
    _, want = grads(ref, tuple(t.double() for t in inputs), [dy.double()])
    err = ((got[0].double() - want[0]).norm() / want[0].norm()).item() if eps else (got[0].abs().max().item())
    assert err < 1e-6, f"relative error of dx at hidden 1: {err:.3g}"


def assert_bf16_rmsnorm_no_worse(x, w, dy):
    """y, dx and dw of fused_rmsnorm (eps 1e-6, no offset) against float64, bounded by bf16 PyTorch's own error."""
    (y,), (dx, dw) = grads(fused_rmsnorm, (x, w), [dy])
    (y_nat,), (dx_nat, dw_nat) = grads(lambda a, b: hf_rmsnorm(a, b, 1e-6, 0.0), (x, w), [dy])
    (y_ref,), (dx_ref, dw_ref) = grads(lambda a, b: hf_rmsnorm(a, b, 1e-6, 0.0), (x.double(), w.double()),
                                       [dy.double()])
    for name, out, nat, ref in [("y", y, y_nat, y_ref), ("dx", dx, dx_nat, dx_ref), ("dw", dw, dw_nat, dw_ref)]:
        assert_no_worse(name, out, nat, ref, torch.bfloat16)


@pytest.mark.parametrize("hidden", [16384, 16385])
def test_rmsnorm_large_hidden(hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(3, hidden, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.rand(hidden, generator=gen).to(DEVICE, torch.bfloat16)
    dy = torch.randn(3, hidden, generator=gen).to(DEVICE, torch.bfloat16)
    assert_bf16_rmsnorm_no_worse(x, w, dy)


def test_broadcast_upstream_gradient_and_frozen_weight():
    # y.sum() sends back an expanded (stride-0) gradient; a frozen weight gets no dw.
    x = torch.randn(2, 5, 48, dtype=torch.float32, device=DEVICE, requires_grad=True)
    w = torch.rand(48, device=DEVICE)
    fused_rmsnorm(x, w).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    hf_rmsnorm(x64, w.double(), 1e-6, 0.0).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_strided_weight_is_read_by_its_strides():
    # A weight that is a strided view (every other element of a wider buffer) was read as if contiguous.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 24, generator=gen).to(DEVICE)
    r = torch.randn(3, 24, generator=gen).to(DEVICE)
    buf = torch.rand(48, generator=gen).to(DEVICE).requires_grad_(True)
    buf_ref = buf.detach().double().requires_grad_(True)
    fused_rmsnorm(x, buf[::2]).sum().backward()
    hf_rmsnorm(x.double(), buf_ref[::2], 1e-6, 0.0).sum().backward()
    # fp32 against float64: fp32's tolerances (float64's own, 1e-7, failed at 1e-6 relative on the H100's dw sums)
    close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)  # noqa: E731
    close(fused_rmsnorm(x, buf[::2]), hf_rmsnorm(x.double(), buf_ref[::2], 1e-6, 0.0))
    close(buf.grad, buf_ref.grad)
    s, y = fused_add_rmsnorm(x, r, buf[::2])
    close(y, hf_rmsnorm((x + r).double(), buf_ref[::2], 1e-6, 0.0))


@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 16)])
def test_inplace_change_of_input_gives_autograds_usual_error(shape):
    # The saved input was a view made inside forward (grad mode off), so this raised "A view was created in
    # no_grad mode ... move both the view and the inplace either both inside the no_grad block", which misleads.
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    h = x * 2
    y = fused_rmsnorm(h, torch.ones(16, device=DEVICE))
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 16)])
def test_outputs_can_be_changed_in_place_as_pytorchs(shape):
    # The outputs were views of [rows, H] tensors made inside the autograd.Function, so y.mul_(2) or s += 1 raised
    # "Output 0 of RMSNormFunction is a view and is being modified inplace" (PyTorch's own norm allows it).
    gen = torch.Generator().manual_seed(5)
    x, r, dy = (torch.randn(*shape, generator=gen).to(DEVICE) for _ in range(3))
    w = (torch.rand(16, generator=gen) + 0.5).to(DEVICE)

    def norm_then_inplace(a, b):
        y = fused_rmsnorm(a, b) if a.dtype != torch.float64 else hf_rmsnorm(a, b, 1e-6, 0.0)
        y.mul_(2)
        return y

    (y,), (dx, dw) = grads(norm_then_inplace, (x, w), [dy])
    (y_ref,), (dx_ref, dw_ref) = grads(norm_then_inplace, (x.double(), w.double()), [dy.double()])
    for out, ref in [(y, y_ref), (dx, dx_ref), (dw, dw_ref)]:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)

    def add_norm_then_inplace(a, b, c):
        if a.dtype == torch.float64:
            s, y = a + b, hf_rmsnorm(a + b, c, 1e-6, 0.0)
        else:
            s, y = fused_add_rmsnorm(a, b, c)
        y += s  # the normed output changed in place, as a residual add written with +=
        return s * 3, y

    (s, y), (dx, dr, dw) = grads(add_norm_then_inplace, (x, r, w), [dy, dy])
    (s_ref, y_ref), (dx_ref, dr_ref, dw_ref) = grads(add_norm_then_inplace, (x.double(), r.double(), w.double()),
                                                     [dy.double(), dy.double()])
    for out, ref in [(s, s_ref), (y, y_ref), (dx, dx_ref), (dr, dr_ref), (dw, dw_ref)]:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # The sum is saved for the backward: changing it in place before then is autograd's usual error, unless only
    # the sum is used (the norm's backward then reads nothing).
    s, y = fused_add_rmsnorm(x.requires_grad_(True), r, w)
    s.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward(retain_graph=True)
    x.grad = None
    s.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_module_starts_at_unit_scale():
    for offset in (0.0, 1.0):
        norm = FusedRMSNorm(40, eps=1e-5, offset=offset, device=DEVICE)
        x = torch.randn(3, 40, device=DEVICE)
        torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert "40, eps=1e-05" in repr(norm)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        fused_rmsnorm(x, torch.ones(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="last dimension of hidden_states"):
        fused_rmsnorm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(TypeError, match="hidden_states has dtype int64"):
        fused_rmsnorm(x.long(), w)
    with pytest.raises(TypeError, match="residual has dtype"):
        fused_add_rmsnorm(x, x.half(), w)
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rmsnorm(x, x[:2], w)
    with pytest.raises(ValueError, match="weight is on meta"):
        fused_rmsnorm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="hidden_states must have at least one dimension"):
        fused_rmsnorm(torch.tensor(1.0, device=DEVICE), torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="eps"):
        fused_rmsnorm(x, w, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        fused_rmsnorm(x, w, eps=True)


def test_numpy_scalars_are_numbers():
    # np.float32 is not a Python float: eps=np.float32(1e-6) (a config read through numpy) was refused as not a number.
    import numpy as np

    x = torch.randn(3, 8, device=DEVICE)
    w = torch.rand(8, device=DEVICE)
    torch.testing.assert_close(fused_rmsnorm(x, w, eps=np.float32(1e-5), offset=np.float64(1.0)),
                               fused_rmsnorm(x, w, eps=1e-5, offset=1.0))
    with pytest.raises(ValueError, match="hidden sizes"):
        fused_rmsnorm(torch.randn(1, 40000, device=DEVICE), torch.ones(40000, device=DEVICE))


def test_dw_reduction_over_many_programs():
    # On a GPU the backward has 2 programs per SM (hundreds of dw partial rows); here only a few,
    # so the reduction of partial rows is driven directly with more rows than one reduce tile.
    from chronicals.kernels.rms_norm import _REDUCE_BLOCK_N, _REDUCE_BLOCK_P, _dw_reduce_kernel

    partial = torch.randn(2 * _REDUCE_BLOCK_P + 3, 70, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    dw = torch.empty(70, dtype=torch.bfloat16, device=DEVICE)
    _dw_reduce_kernel[(-(-70 // _REDUCE_BLOCK_N),)](partial, dw, partial.shape[0], 70,
                                                    BLOCK_P=_REDUCE_BLOCK_P, BLOCK_N=_REDUCE_BLOCK_N)
    torch.testing.assert_close(dw.double(), partial.double().sum(0), rtol=2**-8, atol=1e-5)


@pytest.mark.gpu
def test_llama_shape_and_int64_offsets_on_gpu():
    # 16384 x 4096: hundreds of backward programs and dw partial rows, as in training. Then rows whose
    # element offsets pass 2^31, checked on the last rows against PyTorch.
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda", generator=gen, dtype=torch.bfloat16) + 0.5
    dy = torch.randn_like(x)
    assert_bf16_rmsnorm_no_worse(x, w, dy)
    del x, dy

    rows = 2**31 // 4096 + 3
    big = torch.randn(rows, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    y = fused_rmsnorm(big, w)
    tail = big[-5:]
    assert_no_worse("y tail", y[-5:], hf_rmsnorm(tail, w, 1e-6, 0.0), hf_rmsnorm(tail.double(), w.double(), 1e-6, 0.0),
                    torch.bfloat16)


@pytest.mark.gpu
def test_backward_replayed_from_a_cuda_graph_is_the_eager_backward():
    # The backward's two launches (main kernel, dw reduction) captured in a CUDA graph, as the benchmark times them and
    # cuda_graphs replays a layer, and replayed on new inputs: dx and dw bit-identical to the same launches run eagerly.
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4099, 896, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    w = (torch.rand(896, device="cuda", generator=gen, dtype=torch.bfloat16) + 0.5).requires_grad_()
    dy = torch.randn_like(x)

    def step():
        return torch.autograd.grad(fused_rmsnorm(x, w), (x, w), dy)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dx_static, dw_static = step()
    for seed in (1, 2):
        gen.manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
            dy.copy_(torch.randn(dy.shape, device="cuda", generator=gen))
        graph.replay()
        dx, dw = step()
        assert torch.equal(dx_static, dx) and torch.equal(dw_static, dw)
