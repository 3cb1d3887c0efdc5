"""Padding-free packed attention: the varlen kernel paths against a float64 per-sequence reference, the
packed-batch layout and its validation, and (on tiny models) packed training equal to running each sequence
alone. The last group also shows that the equality check catches the two bugs peers shipped."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import chronicals
import chronicals.attention as attention
from chronicals.attention import PackedLayout, check_layout, layout_from_position_ids, varlen_attention
from chronicals.models import build_model
from tests.conftest import DEVICE
from tests.oracle import assert_no_worse

DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


def layout_of(lengths, device=DEVICE):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return PackedLayout(cu, max(lengths))


def reference(q, k, v, lengths, scale, window):
    """Dense per-sequence causal softmax attention with explicit masks, in q's dtype (float64 for the truth)."""
    n_rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qi = q[start:start + n].transpose(0, 1)
        ki = k[start:start + n].repeat_interleave(n_rep, 1).transpose(0, 1)
        vi = v[start:start + n].repeat_interleave(n_rep, 1).transpose(0, 1)
        idx = torch.arange(n, device=q.device)
        dist = idx[:, None] - idx[None, :]
        allowed = (dist >= 0) & (dist < (window if window else n + 1))
        scores = (qi @ ki.transpose(-1, -2)) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append((probs @ vi).transpose(0, 1))
        start += n
    return torch.cat(outs)


@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=5),
    heads=st.sampled_from([(2, 2), (4, 2), (6, 2), (4, 1)]),
    head_dim=st.sampled_from([8, 24, 64]),
    window=st.sampled_from([None, 1, 5, 33]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_varlen_attention_matches_float64_per_sequence_reference(lengths, heads, head_dim, window, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total, (hq, hkv) = sum(lengths), heads
    q64, k64, v64 = (torch.randn(total, h, head_dim, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad_out = torch.randn(total, hq, head_dim, generator=gen, dtype=torch.float64)
    scale = head_dim ** -0.5

    def run(fn, dt):
        leaves = [t.to(DEVICE, dt).requires_grad_() for t in (q64, k64, v64)]
        out = fn(*leaves)
        out.backward(grad_out.to(DEVICE, dt))
        return [out, *(t.grad for t in leaves)]

    ours = run(lambda q, k, v: varlen_attention(q, k, v, layout_of(lengths), scale=scale, sliding_window=window),
               dtype)
    native = run(lambda q, k, v: reference(q, k, v, lengths, scale, window), dtype)
    truth = run(lambda q, k, v: reference(q, k, v, lengths, scale, window), torch.float64)
    for name, o, n, t in zip(("out", "dq", "dk", "dv"), ours, native, truth):
        assert_no_worse(name, o, n, t, dtype, factor=2.0)


def test_backend_choice_and_bad_arguments():
    assert attention.select_backend(torch.device("cpu"), torch.bfloat16) == "sdpa_loop"
    q = torch.randn(10, 4, 8)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        varlen_attention(q, torch.randn(10, 3, 8), torch.randn(10, 3, 8), layout_of([10], "cpu"))
    with pytest.raises(ValueError, match="unknown varlen attention backend 'magic'"):
        varlen_attention(q, q, q, layout_of([10], "cpu"), backend="magic")
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        varlen_attention(q, q, q, layout_of([10], "cpu"), sliding_window=0)


# ---------------------------------------------------------------------------------------------------------------
# Layout: derived from position_ids, or given by a collator and validated.
# ---------------------------------------------------------------------------------------------------------------


def test_layout_from_position_ids_splits_at_each_restart():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 2]])
    layout = layout_from_position_ids(pos)
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 8, 13, 16] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_length == 5 and layout.num_sequences == 5


@pytest.mark.parametrize("pos, message", [
    ([[0, 1, 3, 4]], r"position_ids\[0, 2\] = 3 after position 1"),
    ([[2, 3, 4, 5]], r"position_ids\[0, 0\] = 2 after the row start"),
    ([[0, 1, 1, 2]], r"position_ids\[0, 2\] = 1 after position 1"),
])
def test_layout_rejects_positions_that_do_not_restart_and_count_up(pos, message):
    with pytest.raises(ValueError, match=message):
        layout_from_position_ids(torch.tensor(pos))


def test_check_layout_accepts_a_collators_batch_and_rejects_bad_ones():
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    assert check_layout(cu, 4, 9, pos).max_length == 4
    assert check_layout(cu.long(), None, 9).cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError, match="sequence 1 length 0"):
        check_layout(torch.tensor([0, 3, 3, 9]), None, 9)
    with pytest.raises(ValueError, match=r"position_ids disagree with cu_seq_lens_q: token 3 has position 3"):
        check_layout(cu, None, 9, torch.arange(9)[None])
    with pytest.raises(ValueError, match="must run from 0 to the number of tokens in the batch \\(10\\)"):
        check_layout(cu, None, 10)
    with pytest.raises(ValueError, match="max_length 3 is shorter than the longest packed sequence \\(4\\)"):
        check_layout(cu, 3, 9)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        check_layout(cu.float(), None, 9)


# ---------------------------------------------------------------------------------------------------------------
# Packed training on tiny models: each sequence's loss and gradients equal those of the sequence run alone.
# ---------------------------------------------------------------------------------------------------------------

LENGTHS = [7, 12, 2, 9]
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


def packed_model(name, **flags):
    model = build_model(name, seed=0).to(DEVICE)
    flags = {"rms_norm": False, "swiglu": False, "rope": False, "linear_cross_entropy": False, **flags}
    return chronicals.apply(model, **flags).train()


def sequences(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).to(DEVICE) for n in LENGTHS]


def packed_batch(seqs, target, with_positions=True, with_cu=True):
    """One row holding all `seqs`; only sequence `target` carries labels (the rest are -100). As the packed-batch
    convention says, each sequence's first label is -100, so no sequence predicts the next one's first token."""
    labels = [torch.cat([s.new_tensor([-100]), s[1:]]) if i == target else torch.full_like(s, -100)
              for i, s in enumerate(seqs)]
    batch = {"input_ids": torch.cat(seqs)[None], "labels": torch.cat(labels)[None]}
    if with_positions:
        batch["position_ids"] = torch.cat([torch.arange(len(s), device=DEVICE) for s in seqs])[None]
    if with_cu:
        batch["cu_seq_lens_q"] = layout_of([len(s) for s in seqs]).cu_seqlens
        batch["max_length_q"] = max(len(s) for s in seqs)
    return batch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worst_mismatch(model, seqs, make_batch=packed_batch, **batch_options):
    """Largest relative difference, over sequences, between a sequence's loss/gradients in the packed batch
    and run alone (same normaliser: the sequence's own target count)."""
    worst = 0.0
    for i, seq in enumerate(seqs):
        n_targets = len(seq) - 1
        packed = loss_and_grads(model, {**make_batch(seqs, i, **batch_options), "num_items_in_batch": n_targets})
        alone = loss_and_grads(model, {"input_ids": seq[None], "labels": seq[None], "num_items_in_batch": n_targets})
        worst = max(worst, ((packed[0] - alone[0]).abs() / alone[0].abs()).item())
        assert packed[1].keys() == alone[1].keys()
        for name, g in alone[1].items():
            worst = max(worst, ((packed[1][name] - g).norm() / g.norm().clamp(min=1e-30)).item())
    return worst


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_sequence_loss_and_grads_equal_the_sequence_alone(name):
    model = packed_model(name)
    assert worst_mismatch(model, sequences(model.config.vocab_size)) < 1e-4


def test_packed_batch_with_all_kernels_equals_sequences_alone():
    pytest.importorskip("chronicals.kernels.rms_norm")
    pytest.importorskip("chronicals.kernels.linear_cross_entropy")
    model = chronicals.apply(build_model("tiny-qwen3", seed=0).to(DEVICE)).train()
    seqs = sequences(model.config.vocab_size)
    assert worst_mismatch(model, [seqs[0], seqs[2]]) < 1e-4  # two short sequences: the kernels are interpreted


@pytest.mark.parametrize("options", [dict(with_cu=False), dict(with_positions=False)])
def test_boundaries_from_either_position_ids_or_cu_seq_lens_alone(options):
    model = packed_model("tiny-qwen2")
    assert worst_mismatch(model, sequences(model.config.vocab_size), **options) < 1e-4


def test_the_check_catches_cross_sequence_attention(monkeypatch):
    # Bug 1: attention that ignores the boundaries (here: the whole row treated as one sequence).
    model = packed_model("tiny-llama")
    loop = attention.BACKENDS["sdpa_loop"]
    whole_row = lambda q, k, v, layout, scale, left, p: loop(q, k, v, layout_of([q.shape[0]], q.device), scale, left, p)  # noqa: E501, E731
    monkeypatch.setitem(attention.BACKENDS, "sdpa_loop", whole_row)
    assert worst_mismatch(model, sequences(model.config.vocab_size)) > 1e-2


def test_the_check_catches_positions_that_do_not_restart():
    # Bug 2: position_ids counting 0..T-1 over the packed row. With cu_seq_lens it is rejected outright; without,
    # the row is one sequence, so attention crosses the boundaries and the losses/gradients differ.
    model = packed_model("tiny-llama")
    seqs = sequences(model.config.vocab_size)
    batch = packed_batch(seqs, 1)
    with pytest.raises(ValueError, match="position_ids disagree with cu_seq_lens_q"):
        model(**{**batch, "position_ids": torch.arange(sum(LENGTHS), device=DEVICE)[None]})

    def running_positions(seqs, target):
        return {**packed_batch(seqs, target, with_cu=False),
                "position_ids": torch.arange(sum(LENGTHS), device=DEVICE)[None]}

    assert worst_mismatch(model, seqs, running_positions) > 1e-2


def test_rope_sees_positions_restarted_per_sequence():
    # RoPE is relative, so with isolated attention a non-restarted position shifts q and k alike and the output
    # hardly moves: check the positions the rotary embedding is given instead.
    model = packed_model("tiny-qwen3")
    seen = []
    model.model.rotary_emb.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    model(**packed_batch(sequences(model.config.vocab_size), 0, with_positions=False))
    expected = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    assert torch.equal(seen[0].cpu(), expected)


def test_packed_forward_builds_no_dense_mask(monkeypatch):
    seen = []
    original = attention.packed_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("cu_seq_lens_q")))
        return original(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.IMPLEMENTATION, spy)
    model = packed_model("tiny-mistral")
    model(**packed_batch(sequences(model.config.vocab_size), 0, with_cu=False))
    assert len(seen) == model.config.num_hidden_layers
    assert all(mask is None and cu is not None for mask, cu in seen)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_forward_skips_hfs_packed_sequence_detection_only_for_this_implementation(name, monkeypatch):
    # HF's find_packed_sequence_indices ends in a host sync (.all()) in every forward without an attention mask;
    # packed attention takes its boundaries from cu_seq_lens_q, so for it the detection is skipped. A model on
    # another implementation still runs it, and packed rows given by position_ids alone still stay apart (the test
    # above, and test_boundaries_from_either_position_ids_or_cu_seq_lens_alone).
    from transformers import masking_utils

    calls = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: calls.append(p) or original(p))
    seqs = sequences(build_model(name, seed=0).config.vocab_size)
    batch = packed_batch(seqs, 0, with_cu=False)
    model = packed_model(name)
    model(**batch, use_cache=False)
    model(input_ids=seqs[1][None], use_cache=False)  # a training forward: no cache, so HF would look
    assert calls == []
    build_model(name, seed=0).to(DEVICE)(input_ids=seqs[1][None], use_cache=False)
    assert len(calls) >= 1


def test_sliding_window_in_a_packed_batch():
    # Mistral-style window shorter than the sequences: packed equals alone, and the window really limits attention.
    model = build_model("tiny-mistral", seed=0, sliding_window=4).to(DEVICE)
    model = chronicals.apply(model, rms_norm=False, swiglu=False, rope=False, linear_cross_entropy=False).train()
    seqs = sequences(model.config.vocab_size)
    assert worst_mismatch(model, seqs) < 1e-4
    model.eval()
    full = build_model("tiny-mistral", seed=0).to(DEVICE).eval()
    assert not torch.allclose(model(input_ids=seqs[1][None]).logits, full(input_ids=seqs[1][None]).logits, atol=1e-3)
    hf = build_model("tiny-mistral", seed=0, sliding_window=4, attn_implementation="eager").to(DEVICE).eval()
    torch.testing.assert_close(model(input_ids=seqs[1][None]).logits, hf(input_ids=seqs[1][None]).logits)


@pytest.mark.parametrize("batch_update, message", [
    ({"cu_seq_lens_q": torch.tensor([0, 7, 7, 21, 30], dtype=torch.int32)}, "sequence 1 length 0"),
    ({"position_ids": torch.arange(30)[None]}, "position_ids disagree with cu_seq_lens_q"),
    ({"attention_mask": torch.cat([torch.ones(1, 25), torch.zeros(1, 5)], 1).long()}, "must not carry padding"),
    ({"cu_seq_lens_k": torch.tensor([0, 30], dtype=torch.int32)}, "cu_seq_lens_k must equal cu_seq_lens_q"),
])
def test_bad_packed_batches_give_clear_errors(batch_update, message):
    model = packed_model("tiny-llama")
    batch = packed_batch(sequences(model.config.vocab_size), 0)
    batch.update({k: v.to(DEVICE) for k, v in batch_update.items()})
    with pytest.raises(ValueError, match=message):
        model(**batch)


def test_padded_batches_and_generation_keep_hf_behaviour():
    model = packed_model("tiny-qwen2").eval()
    hf = build_model("tiny-qwen2", seed=0).to(DEVICE).eval()
    ids = torch.randint(0, 512, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               hf(input_ids=ids, attention_mask=mask).logits)
    gen = dict(max_new_tokens=4, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), hf.generate(ids, **gen))


def test_rows_that_do_not_restart_are_plain_sequences_at_any_offset():
    # position_ids 5..12 (scoring a continuation, say) restart nowhere inside the row: one sequence, as in HF.
    model = packed_model("tiny-llama").eval()
    hf = build_model("tiny-llama", seed=0).to(DEVICE).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), device=DEVICE)
    pos = torch.arange(5, 13, device=DEVICE).expand(2, -1)
    torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits,
                               hf(input_ids=ids, position_ids=pos).logits)


def test_attn_implementation_alone_isolates_sequences_given_cu_seq_lens():
    # Without `chronicals.apply` (no once-per-forward hook): the registered implementation still reads the
    # boundaries, working out max_length itself.
    model = build_model("tiny-llama", seed=0, attn_implementation=attention.IMPLEMENTATION).to(DEVICE).eval()
    seqs = sequences(model.config.vocab_size)[:2]
    batch = packed_batch(seqs, 0)
    del batch["max_length_q"], batch["labels"]
    packed = model(**batch).logits[0]
    torch.testing.assert_close(packed[len(seqs[0]):], model(input_ids=seqs[1][None]).logits[0])


def test_several_packed_rows():
    # [2, T]: each row holds its own sequences; boundaries come from position_ids (row starts included).
    model = packed_model("tiny-qwen3").eval()
    seqs = sequences(model.config.vocab_size)  # lengths 7, 12, 2, 9: two rows of 19, [7 + 12] and [2 + 9 + 8]
    extra = torch.randint(0, model.config.vocab_size, (8,), device=DEVICE)
    rows = [[seqs[0], seqs[1]], [seqs[2], seqs[3], extra]]
    ids = torch.stack([torch.cat(r) for r in rows])
    pos = torch.stack([torch.cat([torch.arange(len(s), device=DEVICE) for s in r]) for r in rows])
    logits = model(input_ids=ids, position_ids=pos).logits
    for b, row in enumerate(rows):
        start = 0
        for s in row:
            torch.testing.assert_close(logits[b, start:start + len(s)], model(input_ids=s[None]).logits[0])
            start += len(s)


def test_backend_preference(monkeypatch):
    # FlashAttention 4 first on Hopper/Blackwell (head dims 8..256, multiples of 8), else FA2 (flash-attn, then
    # torch's varlen_attn); each is found by its own module: flash-attn 4 installs `flash_attn` as a namespace
    # package holding only `cute`, which must not pass for flash-attn 2.
    installed = {"flash_attn.cute"}
    monkeypatch.setattr(attention, "_installed", lambda module: module in installed)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    cuda = torch.device("cuda")
    assert attention.select_backend(cuda, torch.bfloat16, 64) == "flash_attn_cute"
    assert attention.select_backend(cuda, torch.float32, 64) == "sdpa_loop"
    assert attention.select_backend(cuda, torch.bfloat16, 12) == "sdpa_loop"  # not a multiple of 8
    assert attention.select_backend(cuda, torch.bfloat16, 512) == "sdpa_loop"
    capability[0] = (8, 0)  # Ampere: FA4's sm80 path is no faster than FA2's
    assert attention.select_backend(cuda, torch.bfloat16, 64) == "sdpa_loop"
    installed.add("torch.nn.attention.varlen")
    assert attention.select_backend(cuda, torch.bfloat16, 64) == "torch_varlen"
    installed.add("flash_attn.flash_attn_interface")
    assert attention.select_backend(cuda, torch.float16, 64) == "flash_attn"
    capability[0] = (10, 0)
    assert attention.select_backend(cuda, torch.float16, 128) == "flash_attn_cute"
    # Attention dropout: FA4 and torch's varlen_attn have none, FA2's varlen kernel and the SDPA loop do.
    assert attention.select_backend(cuda, torch.float16, 128, dropout=True) == "flash_attn"
    installed.discard("flash_attn.flash_attn_interface")
    assert attention.select_backend(cuda, torch.float16, 128, dropout=True) == "sdpa_loop"
    assert attention.select_backend(torch.device("cpu"), torch.bfloat16, 64) == "sdpa_loop"
    assert not attention.available("magic")


def test_packed_attention_runs_in_autocasts_dtype(monkeypatch):
    # Under autocast with fp32 hidden states HF's RoPE returns fp32 q/k; the varlen call then selected by fp32 (on a GPU
    # the per-sequence SDPA loop, not FlashAttention). It must see autocast's dtype, as SDPA does under autocast.
    seen = []
    real = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda q, k, v, *a, **kw: seen.append(
        (q.dtype, k.dtype, v.dtype)) or real(q, k, v, *a, **kw))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 10, 16, generator=gen).to(DEVICE) for _ in range(2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    kind = torch.device(DEVICE).type
    with torch.autocast(kind, dtype=torch.bfloat16):
        out, _ = attention.packed_attention_forward(None, q, k, v.bfloat16(), None, cu_seq_lens_q=cu, max_length_q=6)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    want, _ = attention.packed_attention_forward(None, q.bfloat16(), k.bfloat16(), v.bfloat16(), None,
                                                 cu_seq_lens_q=cu, max_length_q=6)
    torch.testing.assert_close(out, want)
    out32, _ = attention.packed_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6)
    assert out32.dtype == torch.float32  # without autocast, the inputs' own dtype


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn_cute", "torch_varlen"])
def test_gpu_backends_match_float64_reference(backend):
    lengths, (hq, hkv, d), dtype = [33, 1, 300, 129, 64], (14, 2, 64), torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(sum(lengths), h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad_out = torch.randn(sum(lengths), hq, d, generator=gen, dtype=torch.float64)

    def run(fn, dt):
        leaves = [t.to("cuda", dt).requires_grad_() for t in (q64, k64, v64)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad_out.to("cuda", dt))]

    if not attention.available(backend):
        pytest.skip(f"{backend} is not installed here")
    try:
        ours = run(lambda q, k, v: varlen_attention(q, k, v, layout_of(lengths, "cuda"), backend=backend), dtype)
    except (RuntimeError, NotImplementedError) as exc:  # not every torch build has every backend
        pytest.skip(f"{backend} unavailable here: {exc}")
    native = run(lambda q, k, v: reference(q, k, v, lengths, d ** -0.5, None), dtype)
    truth = run(lambda q, k, v: reference(q, k, v, lengths, d ** -0.5, None), torch.float64)
    for name, o, n, t in zip(("out", "dq", "dk", "dv"), ours, native, truth):
        assert_no_worse(f"{backend} {name}", o, n, t, dtype, factor=2.0)


def test_failing_optional_backend_falls_back_once(monkeypatch):
    # An installed optional kernel that cannot run here (a compile or launch error) must not break training: the
    # automatic choice warns once, marks it broken and takes the next backend; an explicit choice still raises.
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setitem(attention.BACKENDS, "flash_attn", broken)
    monkeypatch.setattr(attention, "_BROKEN", {})
    chosen = iter(["flash_attn", "sdpa_loop", "sdpa_loop"])
    monkeypatch.setattr(attention, "select_backend", lambda *a: next(chosen))
    q = torch.randn(10, 4, 8)
    with pytest.warns(RuntimeWarning, match="flash_attn backend failed .*no kernel for this GPU"):
        out = varlen_attention(q, q, q, layout_of([4, 6], "cpu"))
    loop = attention.BACKENDS["sdpa_loop"]
    torch.testing.assert_close(out, loop(q, q, q, layout_of([4, 6], "cpu"), 8 ** -0.5, -1, 0.0))
    assert calls == [1] and "flash_attn" in attention._BROKEN and not attention.available("flash_attn")
    with pytest.raises(RuntimeError, match="no kernel"):
        varlen_attention(q, q, q, layout_of([4, 6], "cpu"), backend="flash_attn")


# output_attentions: HF's SDPA and flash paths return no weights (a logged warning); the packed implementation runs
# HF's eager attention over its own mask for such a call, so the weights, outputs and gradients are an eager model's.
def attentions_batch(kind, vocab):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 11), generator=gen).to(DEVICE)
    if kind == "padded":
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "packed":  # rows [4 + 7] and [6 + 5]: boundaries from position_ids
        pos = torch.stack([torch.cat([torch.arange(n, device=DEVICE) for n in row]) for row in ([4, 7], [6, 5])])
        return {"input_ids": ids, "position_ids": pos}
    if kind == "cu_seq_lens":  # the same two rows given as a collator's cu_seq_lens_q alone
        return {"input_ids": ids, "cu_seq_lens_q": layout_of([4, 7, 6, 5]).cu_seqlens, "max_length_q": 7}
    return {"input_ids": ids}


def patched_model(name, all_flags=False, **config):
    flags = {} if all_flags else {"rms_norm": False, "swiglu": False, "rope": False, "linear_cross_entropy": False}
    return chronicals.apply(build_model(name, seed=0, **config).to(DEVICE), **flags).train()


@pytest.mark.parametrize("name, kind, window, all_flags", [
    ("tiny-llama", "plain", None, False), ("tiny-qwen2", "padded", None, False), ("tiny-qwen3", "packed", None, False),
    ("tiny-llama", "cu_seq_lens", None, False), ("tiny-mistral", "plain", 3, False),
    ("tiny-mistral", "packed", 3, False), ("tiny-mistral", "padded", 3, False), ("tiny-qwen3", "packed", None, True),
])
def test_output_attentions_returns_the_weights_of_hf_eager_attention(name, kind, window, all_flags):
    if all_flags:
        pytest.importorskip("chronicals.kernels.rope")
    extra = {} if window is None else {"sliding_window": window}
    hf = build_model(name, seed=0, attn_implementation="eager", **extra).to(DEVICE).train()
    model = patched_model(name, all_flags, **extra)
    batch = attentions_batch(kind, model.config.vocab_size)
    ref_batch = dict(batch)
    if kind == "cu_seq_lens":  # HF's eager model reads packed boundaries from position_ids
        del ref_batch["cu_seq_lens_q"], ref_batch["max_length_q"]
        ref_batch["position_ids"] = attentions_batch("packed", model.config.vocab_size)["position_ids"]
    outs = []
    for m, b in ((hf, ref_batch), (model, batch)):
        m.zero_grad(set_to_none=True)
        out = m(**b, labels=b["input_ids"], output_attentions=True, use_cache=False)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = outs
    assert len(got.attentions) == model.config.num_hidden_layers
    for a, b in zip(ref.attentions, got.attentions):
        assert b.shape == a.shape == (2, model.config.num_attention_heads, 11, 11)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if not all_flags:  # the fused loss returns no logits
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_output_attentions_during_generation_match_hf_eager():
    hf = build_model("tiny-mistral", seed=0, attn_implementation="eager", sliding_window=4).to(DEVICE).eval()
    model = patched_model("tiny-mistral", sliding_window=4).eval()
    ids = torch.randint(0, 512, (2, 6), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    gen = dict(max_new_tokens=3, do_sample=False, attention_mask=mask, pad_token_id=0, output_attentions=True,
               return_dict_in_generate=True)
    ref, got = hf.generate(ids, **gen), model.generate(ids, **gen)
    assert torch.equal(got.sequences, ref.sequences) and len(got.attentions) == len(ref.attentions) == 3
    for step_ref, step_got in zip(ref.attentions, got.attentions):
        assert len(step_got) == len(step_ref) == model.config.num_hidden_layers
        for a, b in zip(step_ref, step_got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_without_output_attentions_no_weights_are_computed(monkeypatch):
    calls = []
    real = attention.eager_attention_with_weights
    monkeypatch.setattr(attention, "eager_attention_with_weights", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = packed_model("tiny-qwen2")
    for kind in ("plain", "packed"):
        out = model(**attentions_batch(kind, model.config.vocab_size))
        assert out.attentions is None
    assert calls == []
    model(**attentions_batch("packed", model.config.vocab_size), output_attentions=True)
    assert len(calls) == model.config.num_hidden_layers


def test_output_attentions_refuses_a_packed_sequence_that_runs_into_the_next_row():
    # Varlen attention reads the batch as one stream of tokens; weights are per row, [B, H, S, S].
    model = patched_model("tiny-llama")
    batch = attentions_batch("cu_seq_lens", model.config.vocab_size)
    batch.update(cu_seq_lens_q=layout_of([4, 11, 7]).cu_seqlens, max_length_q=11)
    assert model(**batch).logits.shape[:2] == (2, 11)
    with pytest.raises(ValueError, match="output_attentions needs each packed sequence within one row"):
        model(**batch, output_attentions=True)


def test_attention_dropout_is_unbiased_and_stays_within_each_sequence():
    # HF applies config.attention_dropout to the softmax weights in training (GPT-2's attn_pdrop is on by default);
    # packed attention applies it per sequence: its mean over many draws is the dropout-free attention, and a
    # sequence's output does not depend on another sequence's tokens under the same seed.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, 8, generator=gen) for _ in range(3))
    layout = layout_of([4, 6], "cpu")
    clean = varlen_attention(q, k, v, layout)
    draws = []
    for seed in range(2000):
        torch.manual_seed(seed)
        draws.append(varlen_attention(q, k, v, layout, dropout_p=0.3))
    draws = torch.stack(draws)
    assert not torch.equal(draws[0], clean)
    bound = 5 * draws.std(0) / len(draws) ** 0.5 + 1e-6  # five standard errors of the mean
    assert ((draws.mean(0) - clean).abs() <= bound).all()

    other = [t.clone() for t in (q, k, v)]
    for t in other:
        t[4:] = torch.randn(6, 2, 8, generator=gen)  # the second sequence's tokens only
    torch.manual_seed(7)
    first = varlen_attention(q, k, v, layout, dropout_p=0.3)
    torch.manual_seed(7)
    changed = varlen_attention(*other, layout, dropout_p=0.3)
    torch.testing.assert_close(changed[:4], first[:4], rtol=0, atol=0)


def test_attention_dropout_bad_values_and_backends_without_it():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        varlen_attention(q, q, q, layout_of([4, 6], "cpu"), dropout_p=1.0)
    with pytest.raises(ValueError, match="torch_varlen backend has no attention dropout.*flash_attn, sdpa_loop"):
        varlen_attention(q, q, q, layout_of([4, 6], "cpu"), dropout_p=0.1, backend="torch_varlen")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_a_model_with_attention_dropout_trains_on_packed_batches(name):
    # It was refused ('packed attention has no attention dropout'). In training the dropout is applied, so the loss
    # differs from eval mode's; in eval mode (no dropout) the packed batch still equals its sequences run alone.
    model = chronicals.apply(build_model(name, seed=0, attention_dropout=0.2).to(DEVICE), rms_norm=False,
                             swiglu=False, rope=False, linear_cross_entropy=False)
    seqs = sequences(model.config.vocab_size)
    batch = packed_batch(seqs, 0)
    torch.manual_seed(0)
    trained = model.train()(**batch).loss
    trained.backward()
    assert torch.isfinite(trained)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        evaluated = model.eval()(**batch).loss
    assert not torch.equal(trained.detach(), evaluated)
    assert worst_mismatch(model.eval(), seqs) < 1e-4
