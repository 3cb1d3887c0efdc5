"""The fused SwiGLU MLP (gate and up in one matmul, h recomputed in the backward) against a float64 reference
(tests/oracle.py); frozen weights, autocast, what it saves for the backward, and when the patched MLP uses it."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from oracle import assert_no_worse
from torch import nn

from chronicals.kernels import fused_swiglu
from chronicals.kernels.swiglu import swiglu_backward, swiglu_forward
from chronicals.kernels.swiglu_mlp import fused_swiglu_mlp
from chronicals.models import swiglu as patched_mlp

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("x", "W_gate", "W_up", "W_down")
# Factor over native PyTorch's error in bf16/fp16. Both paths round g, u and dh alike, then reduce them over
# tokens or features, and that shared noise cancels differently per draw, so either path can land above the
# other (1500 draws at these sizes: (ours - slack) / native at most 1.4, for dW_up from a single token, whose
# gradient is one outer product). Sizes start at 8 so that a relative error is a statistic over many
# roundings, not one element's luck. fp32 gets factor 1.
LOW_PRECISION_FACTOR = 2.0


def reference(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def run(fn, inputs, dy, frozen=()):
    """fn's output and the gradients of the inputs that are not frozen (None for the frozen ones)."""
    leaves = [t.detach().clone().requires_grad_(i not in frozen) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)))
    return y, [next(grads) if t.requires_grad else None for t in leaves]


def make_inputs(lead, d, inter, dtype, transposed, gen):
    """x [*lead, d] (a transposed, non-contiguous view when asked), weights scaled as a trained MLP's, dy."""
    if transposed and len(lead) >= 1:
        x = torch.randn(d, *lead, generator=gen).movedim(0, -1)
    else:
        x = torch.randn(*lead, d, generator=gen)
    w_gate = torch.randn(inter, d, generator=gen) * (2 / d**0.5)  # gates reach both tails of the sigmoid
    w_up = torch.randn(inter, d, generator=gen) / d**0.5
    w_down = torch.randn(d, inter, generator=gen) / inter**0.5
    dy = torch.randn(*lead, d, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, w_gate, w_up, w_down)], dy.to(DEVICE, dtype)


def check_against_float64(inputs, dy, dtype, frozen=()):
    y, grads = run(fused_swiglu_mlp, inputs, dy, frozen)
    y_nat, grads_nat = run(reference, inputs, dy, frozen)
    y_ref, grads_ref = run(reference, [t.double() for t in inputs], dy.double(), frozen)
    assert y.dtype == dtype and y.shape == y_ref.shape
    factor = 1.0 if dtype == torch.float32 else LOW_PRECISION_FACTOR
    assert_no_worse("out", y, y_nat, y_ref, dtype, factor=factor)
    for name, g, g_nat, g_ref in zip(NAMES, grads, grads_nat, grads_ref):
        if g_ref is None:
            assert g is None, f"{name} is frozen but got a gradient"
        else:
            assert g.dtype == dtype
            assert_no_worse(f"d {name}", g, g_nat, g_ref, dtype, factor=factor)


@given(lead=st.lists(st.integers(1, 12), min_size=1, max_size=2), d=st.integers(8, 40), inter=st.integers(8, 72),
       dtype=st.sampled_from(DTYPES), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(lead=[1], d=1, inter=1, dtype=torch.float32, transposed=False, seed=0)  # one element everywhere
@example(lead=[2, 3], d=24, inter=1100, dtype=torch.bfloat16, transposed=True, seed=1)  # two column blocks per row
@example(lead=[5], d=17, inter=37, dtype=torch.float16, transposed=False, seed=2)
def test_mlp_matches_float64(lead, d, inter, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs, dy = make_inputs(lead, d, inter, dtype, transposed, gen)
    check_against_float64(inputs, dy, dtype)


@pytest.mark.parametrize("frozen", [(1, 2, 3), (1,), (2,), (3,), (0,), (0, 1, 2)])
def test_frozen_inputs_get_no_gradient_and_the_rest_stay_correct(frozen):
    gen = torch.Generator().manual_seed(len(frozen))
    inputs, dy = make_inputs([2, 7], 19, 45, torch.bfloat16, True, gen)
    check_against_float64(inputs, dy, torch.bfloat16, frozen)


@pytest.mark.parametrize("lead", [[6], [2, 3]])
def test_output_can_be_changed_in_place_as_the_unfused_mlps(lead):
    # The output was a view of the [N, d_out] product made inside the autograd.Function, so y += residual raised
    # "Output 0 of SwiGLUMLPFunction is a view and is being modified inplace"; the unfused MLP's output allows it.
    gen = torch.Generator().manual_seed(6)
    inputs, dy = make_inputs(lead, 12, 20, torch.float32, False, gen)
    residual = torch.randn(*lead, 12, generator=gen).to(DEVICE)

    def mlp_then_inplace(fn):
        def run_(*args):
            y = fn(*args)
            y += residual.to(y.dtype)
            return y
        return run_

    y, grads = run(mlp_then_inplace(fused_swiglu_mlp), inputs, dy)
    y_ref, grads_ref = run(mlp_then_inplace(reference), [t.double() for t in inputs], dy.double())
    for out, want in zip([y, *grads], [y_ref, *grads_ref]):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_strided_swiglu_launchers_write_column_halves_and_recompute_c_over_dc():
    gen = torch.Generator().manual_seed(0)
    rows, inter = 5, 1100  # more than one column block per row
    gu = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(DEVICE, torch.bfloat16)
    g, u = gu[:, :inter], gu[:, inter:]
    dc = torch.randn(rows, inter, generator=gen).to(DEVICE, torch.bfloat16)
    c = swiglu_forward(g, u)
    assert c.is_contiguous() and c.shape == (rows, inter)
    dgu = torch.full_like(gu, float("nan"))
    buf = dc.clone()
    da, db = swiglu_backward(buf, g, u, da=dgu[:, :inter], db=dgu[:, inter:], c=buf)
    assert da.data_ptr() == dgu.data_ptr() and torch.isfinite(dgu).all()
    assert torch.equal(buf, c)  # the recomputed c is the forward's, bit for bit
    a64, b64 = g.double().requires_grad_(True), u.double().requires_grad_(True)
    c64 = F.silu(a64) * b64
    da64, db64 = torch.autograd.grad(c64, (a64, b64), dc.double())
    a_n, b_n = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    c_n = F.silu(a_n) * b_n
    da_n, db_n = torch.autograd.grad(c_n, (a_n, b_n), dc)
    assert_no_worse("c", c, c_n, c64, torch.bfloat16)
    assert_no_worse("da", da, da_n, da64, torch.bfloat16)
    assert_no_worse("db", db, db_n, db64, torch.bfloat16)
    with pytest.raises(ValueError, match="unit column stride"):
        swiglu_forward(g.t(), u.t())


def test_autocast_casts_to_its_dtype_and_fp32_weights_get_fp32_gradients():
    gen = torch.Generator().manual_seed(3)
    inputs, dy = make_inputs([3, 5], 16, 40, torch.float32, False, gen)
    half = torch.bfloat16

    def under_autocast(fn):
        def wrapped(*args):
            with torch.autocast(DEVICE, dtype=half):
                return fn(*args)
        return wrapped

    y, grads = run(under_autocast(fused_swiglu_mlp), inputs, dy)
    y_nat, grads_nat = run(under_autocast(reference), inputs, dy)
    y_ref, grads_ref = run(reference, [t.to(half).double() for t in inputs], dy.to(half).double())
    assert y.dtype == y_nat.dtype == half
    assert_no_worse("out", y, y_nat, y_ref, half, factor=LOW_PRECISION_FACTOR)
    for name, g, g_nat, g_ref in zip(NAMES, grads, grads_nat, grads_ref):
        assert g.dtype == torch.float32, name
        assert_no_worse(f"d {name}", g, g_nat, g_ref, half, factor=LOW_PRECISION_FACTOR)


class MLP(nn.Module):
    """The Llama/Qwen MLP's structure, with the patched forward."""

    def __init__(self, d, inter, bias=False, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(d, inter, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(inter, d, bias=bias, dtype=dtype)
        self.act_fn = nn.SiLU()

    forward = patched_mlp.swiglu_mlp_forward


def saved_activation_bytes(module, fn, x) -> tuple[int, list]:
    """Bytes of the distinct storages saved for backward that are not `module`'s parameters, and their shapes."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved, shapes = {}, []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(saved.values()), shapes


def test_fused_mlp_saves_x_and_gu_but_not_h():
    n, d, inter = 24, 16, 56
    mlp = MLP(d, inter, dtype=torch.bfloat16).to(DEVICE)
    x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    before, _ = saved_activation_bytes(mlp, lambda x: mlp.down_proj(fused_swiglu(mlp.gate_proj(x), mlp.up_proj(x))), x)
    after, shapes = saved_activation_bytes(mlp, mlp, x)
    itemsize = 2
    # Before: x (saved by gate_proj and up_proj, one storage), gate and up (SwiGLU), h (down_proj).
    assert before == (n * d + 3 * n * inter) * itemsize, before
    # After: x and the one [N, 2I] gate|up buffer; no [N, I] tensor.
    assert after == (n * d + 2 * n * inter) * itemsize, after
    assert (n, inter) not in shapes, shapes


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_added_in_the_last_matmul_matches_float64(dtype):
    # residual + mlp(x) with the residual as the down matmul's beta = 1 input; its gradient is dy itself.
    gen = torch.Generator().manual_seed(4)
    inputs, dy = make_inputs([3, 11], 24, 40, dtype, False, gen)
    residual = torch.randn(3, 11, 24, generator=gen).to(DEVICE, dtype)

    def with_residual(fn):
        return lambda x, wg, wu, wd, r: r + fn(x, wg, wu, wd)

    y, grads = run(lambda *a: fused_swiglu_mlp(*a[:4], a[4]), [*inputs, residual], dy)
    y_nat, grads_nat = run(with_residual(reference), [*inputs, residual], dy)
    y_ref, grads_ref = run(with_residual(reference), [t.double() for t in (*inputs, residual)], dy.double())
    factor = 1.0 if dtype == torch.float32 else LOW_PRECISION_FACTOR
    assert y.dtype == dtype
    assert_no_worse("out", y, y_nat, y_ref, dtype, factor=factor)
    for name, g, g_nat, g_ref in zip((*NAMES, "residual"), grads, grads_nat, grads_ref):
        assert_no_worse(f"d {name}", g, g_nat, g_ref, dtype, factor=factor)
    assert torch.equal(grads[4], dy)


def test_residual_that_broadcasts_or_promotes_is_added_as_a_sum():
    # Not the output's shape or dtype (a bias-like row, an fp32 residual stream): the op adds it as `r + mlp(x)` does.
    gen = torch.Generator().manual_seed(5)
    inputs, dy = make_inputs([2, 7], 16, 24, torch.bfloat16, False, gen)
    mlp = fused_swiglu_mlp(*inputs)
    for residual in (torch.randn(16, generator=gen).to(DEVICE, torch.bfloat16),
                     torch.randn(2, 7, 16, generator=gen).to(DEVICE)):
        got = fused_swiglu_mlp(*inputs, residual)
        assert got.dtype == (residual + mlp).dtype
        torch.testing.assert_close(got, residual + mlp, rtol=0, atol=0)


def test_patched_mlp_uses_the_fused_op_only_for_plain_bias_free_linears(monkeypatch):
    calls = []
    import chronicals.kernels.swiglu_mlp as fused_module

    original = fused_module.fused_swiglu_mlp
    monkeypatch.setattr(fused_module, "fused_swiglu_mlp", lambda *a: calls.append(1) or original(*a))

    def check(mlp, x, fused):
        calls.clear()
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        want = mlp.down_proj(F.silu(gate) * up)
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)
        assert bool(calls) == fused

    x = torch.randn(2, 5, 8, device=DEVICE)
    check(MLP(8, 12).to(DEVICE), x, True)
    check(MLP(8, 12, bias=True).to(DEVICE), x, False)

    class Wrapped(nn.Linear):  # e.g. an adapter layer: not exactly nn.Linear
        pass

    wrapped = MLP(8, 12).to(DEVICE)
    wrapped.up_proj = Wrapped(8, 12, bias=False, device=DEVICE)
    check(wrapped, x, False)
    hooked = MLP(8, 12).to(DEVICE)  # e.g. accelerate's offloading: the module call must run
    hooked.down_proj.register_forward_pre_hook(lambda module, args: None)
    check(hooked, x, False)
    mixed = MLP(8, 12).to(DEVICE)
    mixed.down_proj.to(torch.float64)
    calls.clear()
    with pytest.raises(RuntimeError):
        mixed(x)  # as unpatched: F.linear refuses the float64 down_proj
    assert not calls
    monkeypatch.setattr(patched_mlp, "kernels_usable", lambda t: False)
    check(MLP(8, 12).to(DEVICE), x, False)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    wd = torch.randn(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="takes 8 features"):
        fused_swiglu_mlp(torch.randn(4, 7, device=DEVICE), w, w, wd)
    with pytest.raises(ValueError, match="w_up has shape"):
        fused_swiglu_mlp(x, w, w[:5], wd)
    with pytest.raises(ValueError, match="w_down has shape"):
        fused_swiglu_mlp(x, w, w, wd[:, :5])
    with pytest.raises(TypeError, match="w_down has dtype"):
        fused_swiglu_mlp(x, w, w, wd.half())
    with pytest.raises(TypeError, match="x has dtype int64"):
        fused_swiglu_mlp(x.long(), w, w, wd)
    # Under autocast too: only what autocast itself casts is cast (an int x was computed in bf16, float64 silently
    # cast to bf16, and a module passed in place of a weight had its parameters cast in place before the TypeError).
    gate_proj = nn.Linear(8, 6, bias=False).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="x has dtype int64"):
            fused_swiglu_mlp(x.long(), w, w, wd)
        with pytest.raises(TypeError, match="x has dtype float64"):
            fused_swiglu_mlp(x.double(), w.double(), w.double(), wd.double())
        with pytest.raises(TypeError, match="w_gate must be a torch.Tensor, got Linear"):
            fused_swiglu_mlp(x, gate_proj, w, wd)
    assert gate_proj.weight.dtype == torch.float32

