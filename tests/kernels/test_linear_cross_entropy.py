"""Fused linear cross-entropy against a float64 reference (loss, d(hidden), d(weight), d(bias)).

Under TRITON_INTERPRET=1 (CPU) shapes stay small but odd: N, d and V are not powers of two, V is not
a multiple of the vocabulary block, and blocks are narrower than V so the online log-sum-exp merges
several of them. The native-dtype PyTorch computation of the same loss sets each error bound.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_no_worse

from chronicals.kernels import fused_cross_entropy, fused_linear_cross_entropy
from chronicals.kernels import linear_cross_entropy as lce

DEVICE = os.environ.get("CHRONICALS_TEST_DEVICE", "cpu")
IGNORE = -100


def torch_loss(hidden, weight, bias, labels, *, reduction="mean", normalizer=None, softcap=None, z_loss_weight=0.0,
               label_smoothing=0.0, ignore_index=IGNORE):
    """The loss as plain PyTorch computes it in the inputs' dtype (float64 inputs give the reference)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    rows = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss_weight:
        rows = rows + z_loss_weight * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (valid.sum().clamp(min=1) if normalizer is None else normalizer)


def make_inputs(n, d, v, dtype, seed, *, bias=False, ignore="some"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(d))
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        labels[torch.rand(n, generator=g) < 0.3] = IGNORE
    elif ignore == "prefix":  # a masked prompt: the first half of the rows
        labels[: n // 2] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)
    return cast(hidden), cast(weight), cast(b), labels.to(DEVICE)


def losses_and_grads(fn, hidden, weight, bias, labels, upstream, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, labels, **kw)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype).expand_as(loss))
    return (loss, *grads)


def kernel(hidden, weight, bias, labels, **kw):
    return fused_linear_cross_entropy(hidden, weight, labels, bias, **kw)


def check_against_reference(hidden, weight, bias, labels, dtype, **kw):
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(hidden.shape[0] if kw.get("reduction") == "none" else (), generator=g).to(DEVICE)
    ref_kw = {k: v for k, v in kw.items() if k not in ("strategy", "chunk")}
    out = losses_and_grads(kernel, hidden, weight, bias, labels, upstream, **kw)
    native = losses_and_grads(torch_loss, hidden, weight, bias, labels, upstream, **ref_kw)
    as64 = lambda t: None if t is None else t.double()
    ref = losses_and_grads(torch_loss, as64(hidden), as64(weight), as64(bias), labels, upstream.double(), **ref_kw)
    for name, o, nat, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), out, native, ref):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        assert_no_worse(name, o.float(), nat.float(), r, dtype)


# At least 3 rows and columns: with fewer elements one bf16 rounding more or less swings the relative
# error norm past the slack; the 1-row / 1-column edges are checked in fp32 below.
@given(
    n=st.integers(3, 40),
    d=st.integers(3, 24),
    v=st.integers(2, 150),
    strategy=st.sampled_from(["vocab", "rows", "tiles"]),
    chunk=st.sampled_from([7, 16, 33, None, (7, 16), (16, 33), (5, 150)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore=st.sampled_from(["none", "some", "prefix"]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 4.0]),
    z_loss_weight=st.sampled_from([0.0, 1e-2]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(n, d, v, strategy, chunk, dtype, reduction, ignore, bias, softcap, z_loss_weight,
                                   label_smoothing, seed):
    if reduction == "none":
        strategy = "vocab"  # "rows"/"tiles" need a scalar loss (checked in test_bad_input_names_the_argument)
    if strategy != "tiles" and isinstance(chunk, tuple):
        chunk = chunk[1]  # (rows, columns) is a tile; the other strategies take one block size
    hidden, weight, b, labels = make_inputs(n, d, v, dtype, seed, bias=bias, ignore=ignore)
    check_against_reference(hidden, weight, b, labels, dtype, reduction=reduction, softcap=softcap,
                            z_loss_weight=z_loss_weight, label_smoothing=label_smoothing, strategy=strategy,
                            chunk=chunk)


@pytest.mark.parametrize("strategy", ["vocab", "rows", "tiles"])
@pytest.mark.parametrize("n, d, v", [(1, 1, 2), (1, 5, 9), (6, 1, 17)])
def test_single_row_or_column_edges(n, d, v, strategy):
    hidden, weight, bias, labels = make_inputs(n, d, v, torch.float32, n + d + v, bias=True, ignore="none")
    check_against_reference(hidden, weight, bias, labels, torch.float32, strategy=strategy, chunk=4)


@pytest.mark.parametrize("strategy, chunk", [("vocab", 37), ("rows", 7), ("tiles", (7, 37))])
def test_blocks_wider_than_one_program_step(monkeypatch, strategy, chunk):
    # Rows of 37 (or all 83) columns walked 8 at a time: the in-kernel loop and its ragged tail.
    monkeypatch.setattr(lce, "MAX_BLOCK_V", 8)
    hidden, weight, bias, labels = make_inputs(19, 13, 83, torch.float32, 3, bias=True)
    check_against_reference(hidden, weight, bias, labels, torch.float32, strategy=strategy, chunk=chunk,
                            softcap=3.0, z_loss_weight=1e-2, label_smoothing=0.2)


@pytest.mark.parametrize("reduction, strategy",
                         [("mean", "vocab"), ("mean", "rows"), ("sum", "rows"), ("mean", "tiles"),
                          ("none", "auto")])
def test_all_ignored_batch_is_zero_not_nan(reduction, strategy):
    hidden, weight, bias, labels = make_inputs(9, 5, 21, torch.bfloat16, 0, bias=True, ignore="all")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    # a window with no valid label
    normalizer = torch.tensor(0) if reduction == "mean" and strategy in ("rows", "tiles") else None
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2], reduction=reduction,
                                      strategy=strategy, chunk=4, normalizer=normalizer)
    loss.sum().backward()
    assert torch.equal(loss.float(), torch.zeros_like(loss.float()))
    for t in leaves:
        assert torch.equal(t.grad.float(), torch.zeros_like(t.grad.float()))


@pytest.mark.parametrize("strategy, chunk", [("vocab", 8), ("rows", 4), ("tiles", (2, 8))])
def test_a_masked_start_of_the_vocabulary_is_finite(strategy, chunk):
    # A -inf bias on the first 16 of 40 entries: the online log-sum-exp rescaled by exp(-inf - (-inf)) = NaN while
    # every column so far was -inf, so loss and gradients were NaN where F.cross_entropy is finite.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 6, generator=gen).to(DEVICE)
    weight = torch.randn(40, 6, generator=gen).to(DEVICE)
    bias = torch.zeros(40, device=DEVICE)
    bias[:16] = float("-inf")
    labels = torch.tensor([16, 20, 39, 25, 30], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], labels, bias, strategy=strategy, chunk=chunk)
    loss.backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (hidden, weight)]
    ref = F.cross_entropy(ref_leaves[0] @ ref_leaves[1].t() + bias.double(), labels)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["vocab", "rows", "tiles"])
def test_empty_batch(strategy):
    h = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(7, 5, device=DEVICE, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long, device=DEVICE), strategy=strategy)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 5) and not w.grad.any()


@pytest.mark.parametrize("strategy", ["vocab", "rows", "tiles"])
def test_normalizer_makes_accumulation_equal_one_batch(strategy):
    # Two micro-batches with different valid counts, each normalised by the total count, sum to the
    # gradient of the whole batch's mean; a per-micro-batch mean would not.
    hidden, weight, _, labels = make_inputs(30, 11, 47, torch.float32, 5)
    labels[:4] = IGNORE
    total = int((labels != IGNORE).sum())
    whole = [t.clone().requires_grad_() for t in (hidden, weight)]
    fused_linear_cross_entropy(whole[0], whole[1], labels, strategy=strategy, chunk=16).backward()
    parts = [t.clone().requires_grad_() for t in (hidden, weight)]
    for rows, norm in ((slice(0, 12), total), (slice(12, 30), torch.tensor(float(total)))):
        loss = fused_linear_cross_entropy(parts[0][rows], parts[1], labels[rows], normalizer=norm, strategy=strategy,
                                          chunk=16)
        loss.backward()
    torch.testing.assert_close(parts[0].grad, whole[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[1].grad, whole[1].grad, rtol=1e-5, atol=1e-6)


def test_a_negative_normalizer_tensor_gives_nan_not_a_flipped_loss():
    # A number is refused up front; a tensor is not read back (a host sync per call), so a negative count made the
    # loss and its gradients change sign silently. It now makes them NaN, which the trainer's non-finite check sees.
    hidden, weight, _, labels = make_inputs(6, 5, 10, torch.float32, 0)
    hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, normalizer=torch.tensor(-4.0))
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(hidden.grad[labels != IGNORE]).all()
    assert fused_linear_cross_entropy(hidden, weight, labels, normalizer=torch.tensor(0.0)).isfinite()


def test_random_tokens_give_ln_vocab_and_no_hidden_shift():
    # An uninformed model (tiny hidden states) scores random next tokens at ln(V).
    v = 97
    hidden, weight, _, labels = make_inputs(64, 16, v, torch.float32, 7, ignore="none")
    loss = fused_linear_cross_entropy(hidden * 1e-3, weight, labels)
    assert abs(loss.item() - math.log(v)) < 0.02, loss.item()
    # A "copy" model (hidden = its input token's embedding, tied lm_head) scores ~0 only when labels
    # equal the inputs: the function compares row t with label t, with no shift of its own.
    tokens = torch.randint(0, v, (2, 33), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    embedding = torch.eye(v, device=DEVICE) * 30.0  # token t -> logit 900 for t, 0 elsewhere
    copy_hidden = embedding[tokens]
    assert fused_cross_entropy(copy_hidden, embedding, tokens, chunk_size=32).item() < 1e-3
    shifted = fused_cross_entropy(copy_hidden[:, :-1], embedding, tokens[:, 1:], chunk_size=32).item()
    assert shifted > math.log(v), shifted


def test_seed_call_matches_mean_over_valid_targets():
    hidden, weight, _, labels = make_inputs(3 * 11, 9, 40, torch.float32, 2)
    loss = fused_cross_entropy(hidden.view(3, 11, 9), weight, labels.view(3, 11), chunk_size=16)
    expected = F.cross_entropy(hidden.double() @ weight.double().t(), labels, ignore_index=IGNORE)
    assert abs(loss.item() - expected.item()) < 1e-5


def test_seed_call_takes_flattened_rows_as_the_batched_ones():
    # [N, d] hidden states with [N] targets (Liger's layout) give the [B, N, d] call's loss and gradients.
    hidden, weight, _, labels = make_inputs(3 * 11, 9, 40, torch.float32, 5)
    results = []
    for h, t in ((hidden.view(3, 11, 9), labels.view(3, 11)), (hidden, labels)):
        h = h.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        loss = fused_cross_entropy(h, w, t, chunk_size=16)
        loss.backward()
        results.append((loss.detach(), h.grad.reshape(hidden.shape), w.grad))
    for batched, flat in zip(*results):
        torch.testing.assert_close(flat, batched)
    with pytest.raises(ValueError, match=r"targets must have shape \(33,\)"):
        fused_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="targets must have 1 dimensions"):
        fused_cross_entropy(hidden, weight, labels.view(3, 11))


@pytest.mark.parametrize("options", [dict(reduction="sum"), dict(reduction="none"), dict(normalizer=50),
                                     dict(softcap=3.0, z_loss_weight=1e-2), dict(label_smoothing=0.1)])
def test_seed_call_passes_the_loss_options_on(options):
    # Liger's fused loss takes reduction and softcap on its call: the seed's call takes them too, and "none" gives
    # one loss per target in the targets' [B, N] shape (0 where ignored). Gradients against the float64 reference.
    hidden, weight, _, labels = make_inputs(3 * 11, 9, 40, torch.float64, 6)
    h = hidden.view(3, 11, 9).float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    loss = fused_cross_entropy(h, w, labels.view(3, 11), chunk_size=16, **options)
    h64, w64 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = torch_loss(h64, w64, None, labels, **options)
    assert loss.shape == ((3, 11) if options.get("reduction") == "none" else ())
    torch.testing.assert_close(loss.double().reshape(expected.shape), expected.detach(), rtol=1e-5, atol=1e-5)
    upstream = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss.backward(upstream.float().to(DEVICE))
    expected.backward(upstream.reshape(expected.shape).to(DEVICE))
    torch.testing.assert_close(h.grad.double().reshape(h64.shape), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_tied_weight_accumulates_both_gradients():
    # lm_head tied to the embedding: the parameter's gradient is the lookup's plus the loss's.
    hidden_, weight, _, labels = make_inputs(14, 6, 25, torch.float32, 9)
    tokens = labels.clamp(min=0)
    grads = []
    for fn in (kernel, torch_loss):
        shared = weight.double().clone().requires_grad_() if fn is torch_loss else weight.clone().requires_grad_()
        h = shared[tokens] * 0.5 + hidden_.to(shared.dtype)
        fn(h, shared, None, labels).backward()
        grads.append(shared.grad.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_autocast_runs_in_its_dtype_and_reaches_fp32_weights():
    hidden, weight, _, labels = make_inputs(10, 6, 23, torch.float32, 8)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(*leaves, labels, chunk=4)
    loss.backward()
    expected = fused_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk=4)
    assert loss.item() == expected.item()
    assert leaves[0].grad.dtype == leaves[1].grad.dtype == torch.float32


def test_autocast_casts_only_what_autocast_would_and_the_checks_refuse_the_rest():
    # Every argument was cast before the checks: an int hidden or weight passed them (computed in bf16), a module
    # passed in place of its weight had its parameters cast to bf16 in place before the TypeError, and a non-tensor
    # bias failed with an AttributeError. float64 stays float64 under autocast (as autocast leaves it) and is refused.
    hidden, weight, _, labels = make_inputs(4, 5, 10, torch.float32, 0)
    lm_head = torch.nn.Linear(5, 10, bias=False).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="hidden has dtype int64"):
            fused_linear_cross_entropy(hidden.long(), weight, labels)
        with pytest.raises(TypeError, match="weight has dtype int32"):
            fused_linear_cross_entropy(hidden, weight.int(), labels)
        with pytest.raises(TypeError, match="hidden has dtype float64"):
            fused_linear_cross_entropy(hidden.double(), weight.double(), labels)
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            fused_linear_cross_entropy(hidden, weight, labels, 0.5)
        with pytest.raises(TypeError, match="weight must be a torch.Tensor, got Linear"):
            fused_linear_cross_entropy(hidden, lm_head, labels)
    assert lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("strategy", ["vocab", "rows", "tiles"])
def test_frozen_weight_and_constant_hidden(strategy):
    hidden, weight, _, labels = make_inputs(12, 7, 30, torch.float32, 4)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, labels, strategy=strategy, chunk=8).backward()  # weight frozen (LoRA)
    h_ref = hidden.double().requires_grad_()
    torch_loss(h_ref, weight.double(), None, labels).backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels, strategy=strategy, chunk=8).backward()  # hidden needs no gradient
    w_ref = weight.double().requires_grad_()
    torch_loss(hidden.double(), w_ref, None, labels).backward()
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-6)
    assert fused_linear_cross_entropy(hidden, weight, labels).requires_grad is False


@pytest.mark.parametrize("strategy", ["rows", "tiles"])
def test_gradients_in_forward_refuse_a_second_backward(strategy):
    hidden, weight, _, labels = make_inputs(5, 4, 11, torch.float32, 0)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, strategy=strategy)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden=torch.zeros(4, 6)), "weight must be"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must have one entry"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), r"labels must lie in \[0, 10\)"),
        (dict(labels=torch.tensor([0, 1, -1, 2])), "ignore_index"),
        (dict(labels=torch.zeros(4)), "labels has dtype"),
        (dict(weight=torch.zeros(10, 5, dtype=torch.float16)), "weight has dtype"),
        (dict(bias=torch.zeros(9)), "bias must have 10 entries"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(reduction="sum", normalizer=8), "normalizer replaces the mean"),
        (dict(normalizer=-1), "normalizer must be a token count"),
        (dict(normalizer=torch.ones(2)), "one-element tensor"),
        (dict(softcap=0.0), "softcap must be"),
        (dict(softcap=float("inf")), "softcap must be a positive finite number"),  # was a NaN loss (inf·tanh(0))
        (dict(z_loss_weight=-1.0), "z_loss_weight"),
        # Was accepted (every loss inf), or a bare TypeError from the comparison that named nothing.
        (dict(z_loss_weight=float("inf")), "z_loss_weight must be a finite number"),
        (dict(z_loss_weight=None), "z_loss_weight must be a finite number"),
        (dict(softcap="30"), "softcap must be a positive finite number"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be a number in \[0, 1\]"),
        (dict(label_smoothing=1.5), r"label_smoothing must be a number in \[0, 1\]"),
        (dict(label_smoothing=None), r"label_smoothing must be a number in \[0, 1\]"),
        (dict(chunk=0), "chunk must be"),
        (dict(strategy="cols"), "strategy must be one of"),
        (dict(strategy="rows", reduction="none"), "needs a scalar loss"),
        (dict(strategy="tiles", reduction="none"), "needs a scalar loss"),
        (dict(strategy="tiles", chunk=(4, 0)), r"rows or \(rows, vocabulary columns\)"),
        (dict(strategy="tiles", chunk=(4, 4, 4)), r"rows or \(rows, vocabulary columns\)"),
        (dict(strategy="rows", chunk=(4, 4)), "chunk must be a positive int or None"),
        (dict(chunk=True), "chunk must be"),
        # True == 1: a bool would silently drop every label 1 from the loss.
        (dict(ignore_index=True), "ignore_index must be an int"),
        (dict(ignore_index=-100.0), "ignore_index must be an int"),
        (dict(ignore_index=None), "ignore_index must be an int"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = dict(hidden=torch.zeros(4, 5), weight=torch.zeros(10, 5), labels=torch.zeros(4, dtype=torch.long),
                bias=None)
    args.update(change)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("bias"),
                                   **args)


@pytest.mark.parametrize("chunk_size", [0, -1, True, 2.5])
def test_fused_cross_entropy_names_chunk_size(chunk_size):
    hidden, weight, _, labels = (t if t is None else t.to(DEVICE) for t in make_inputs(6, 5, 10, torch.float32, 0))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_cross_entropy(hidden.view(2, 3, 5), weight, labels.view(2, 3), chunk_size=chunk_size)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(lm_head_weight=torch.zeros(10, 5, dtype=torch.float16)), "lm_head_weight has dtype"),
        (dict(lm_head_weight=torch.zeros(10, 4)), r"lm_head_weight must be \[vocab, 5\]"),
        (dict(lm_head_weight=torch.zeros(5)), "lm_head_weight must have 2 dimensions"),
        (dict(lm_head_weight=[[0.0] * 5]), "lm_head_weight must be a torch.Tensor"),
        (dict(lm_head_weight=torch.zeros(10, 5, device="meta")), "lm_head_weight is on meta"),
        (dict(targets=torch.zeros(2, 3, dtype=torch.long, device="meta")), "targets is on meta"),
    ],
)
def test_fused_cross_entropy_names_its_own_arguments(change, message):
    # Its inputs were checked only by fused_linear_cross_entropy, whose errors named lm_head_weight "weight" and
    # hidden_states "hidden".
    # The changed tensors come to the test's device (else a GPU run reports their device, not the dtype or shape);
    # the meta ones stay, as they test the device check.
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_meta else v for k, v in change.items()}
    args = dict(hidden_states=torch.zeros(2, 3, 5, device=DEVICE), lm_head_weight=torch.zeros(10, 5, device=DEVICE),
                targets=torch.zeros(2, 3, dtype=torch.long, device=DEVICE)) | change
    with pytest.raises((ValueError, TypeError), match=message):
        fused_cross_entropy(**args)
    # Under autocast an fp32 lm_head_weight is cast as autocast's matmul would cast it, not refused.
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss = fused_cross_entropy(torch.randn(2, 3, 5, device=DEVICE), torch.randn(10, 5, device=DEVICE),
                                   torch.zeros(2, 3, dtype=torch.long, device=DEVICE))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("strategy", ["vocab", "rows", "tiles"])
@pytest.mark.parametrize("bad_label", [10, 11, -1])
def test_unchecked_out_of_range_labels_make_the_loss_nan(strategy, bad_label):
    # check_labels=False (the patched models' path) skips the host synchronisation, so a label outside [0, V)
    # must poison the loss instead of counting as a zero target logit; valid and ignored rows alone stay finite.
    hidden, weight, _, labels = (t if t is None else t.to(DEVICE) for t in make_inputs(6, 5, 10, torch.float32, 0))
    labels[0] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels, strategy=strategy, check_labels=False)
    assert torch.isfinite(loss)
    labels[3] = bad_label
    loss = fused_linear_cross_entropy(hidden, weight, labels, strategy=strategy, check_labels=False)
    assert torch.isnan(loss)


@pytest.mark.parametrize("ignore_index", [10, 13])
def test_ignore_index_outside_the_vocabulary_is_accepted(ignore_index):
    # An ignore_index at or past V (e.g. a pad id = vocab size) marks ignored rows; the label check took it for an
    # out-of-range label and raised, though it is exempt whatever its value.
    hidden, weight, _, labels = make_inputs(6, 5, 10, torch.float32, 0, ignore=None)
    labels[::2] = ignore_index
    check_against_reference(hidden, weight, None, labels, torch.float32, ignore_index=ignore_index)


@pytest.mark.gpu
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("strategy", ["vocab", "rows", "tiles"])
def test_gpu_realistic_block_sizes(strategy, label_smoothing):
    # Default vocabulary blocks (1024+ wide, MAX_BLOCK_V-wide program steps) or 300-row blocks, on a
    # bf16 shape with V and N not multiples of the block; on CUDA the fp32-output matmul accumulates.
    hidden, weight, bias, labels = make_inputs(777, 256, 5003, torch.bfloat16, 11, bias=True)
    check_against_reference(hidden, weight, bias, labels, torch.bfloat16, softcap=30.0, z_loss_weight=1e-4,
                            label_smoothing=label_smoothing, strategy=strategy,
                            chunk={"vocab": None, "rows": 300, "tiles": (300, 1100)}[strategy])


def test_a_tile_spanning_the_vocabulary_is_not_recomputed(monkeypatch):
    # One tile per row block: pass 2 reuses the logits pass 1 left in the buffer (6·N·d·V FLOPs, not 8), so the
    # only logits matmuls are pass 1's, one per row block (plus dW's first block), and the result is unchanged.
    hidden, weight, bias, labels = make_inputs(19, 13, 83, torch.float32, 5, bias=True)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    check_against_reference(hidden, weight, bias, labels, torch.float32, strategy="tiles", chunk=(7, 83))
    whole = len(calls)
    calls.clear()
    check_against_reference(hidden, weight, bias, labels, torch.float32, strategy="tiles", chunk=(7, 82))
    assert whole == 3 + 1 and len(calls) == 3 * (2 + 2) + 2  # 3 row blocks of 2 tiles; dW written per tile


@pytest.mark.gpu
def test_gpu_row_blocks_free_the_logits_block_before_casting_dw():
    # Several row blocks sum dW in fp32, cast to bf16 at the end. The [rows, V] logits block must be gone by then:
    # the call's extra memory is the block, the fp32 dW and dH (plus O(N)), not the block and both dW copies.
    hidden, weight, _, labels = make_inputs(2000, 512, 8000, torch.bfloat16, 3)
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, labels, strategy="rows", chunk=1000)
    extra = torch.cuda.max_memory_allocated() - before
    block, dw32, dh = 1000 * 8000 * 2, 8000 * 512 * 4, 2000 * 512 * 2
    assert extra <= block + dw32 + dh + 2**20, extra
