"""Padding-free (varlen) attention for packed batches, and its Hugging Face attention implementation.

A packed batch concatenates sequences into rows (docs/CONTRACTS.md): `position_ids` restart at 0 at each
sequence start and `cu_seq_lens_q` ([n+1], int32) holds the cumulative sequence lengths over the flattened
tokens, so sequence i is tokens cu[i]:cu[i+1]. Attention is causal within a sequence and never crosses a
boundary; no [tokens, tokens] mask is ever built (memory O(tokens)).

Backends, fastest first (`select_backend`): FlashAttention 4's CuTe kernels (`flash_attn.cute`, the
`flash-attn-4` package; Hopper and Blackwell, where FlashAttention-2 runs at about half the matrix units'
rate), flash-attn's `flash_attn_varlen_func`, PyTorch's `torch.nn.attention.varlen.varlen_attn` (both
FlashAttention-2 over [tokens, heads, dim], CUDA half precision), and a loop of per-sequence SDPA calls that
runs anywhere (the CPU path, and any dtype). Left out on measurement: cuDNN's ragged attention
(aten::_cudnn_attention_forward with cum_seq), twice. On the H200 (2026-12-06, benchmarks/packing.py) it took
100-119 ms for what FA4 does in 0.74 ms, and PyTorch's backward for it gave wrong, even infinite, gradients.

Registered with transformers as attn_implementation "chronicals_varlen": batches without `cu_seq_lens_q`
(padded batches, generation) take HF's SDPA path unchanged. A forward called with `output_attentions=True` runs
HF's eager attention over the same mask instead and returns its weights (where HF's SDPA returns none); without
it, the only cost is one dict lookup per layer.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from dataclasses import dataclass
from functools import cache, wraps

import torch
import torch.nn.functional as F

IMPLEMENTATION = "chronicals_varlen"
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PackedLayout:
    cu_seqlens: torch.Tensor  # int32 [n + 1], on the tokens' device
    max_length: int  # a Python int, so no kernel launch has to read it back from the device

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1


def layout_from_position_ids(position_ids: torch.Tensor) -> PackedLayout:
    """Sequence boundaries from `position_ids` [B, S]: a sequence starts wherever the position is 0.

    Within a sequence positions must count up by 1 and every row must start a sequence; anything else is
    an error, because it means the positions (and so RoPE) do not restart per sequence.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2:
        raise ValueError(f"position_ids must be a [batch, seq] tensor, got {_describe(position_ids)}")
    starts = position_ids == 0
    follows = torch.zeros_like(starts)
    follows[:, 1:] = position_ids[:, 1:] == position_ids[:, :-1] + 1
    bad = ~(starts | follows)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        before = "the row start" if col == 0 else f"position {int(position_ids[row, col - 1])}"
        raise ValueError(
            f"position_ids[{row}, {col}] = {int(position_ids[row, col])} after {before}: in a packed batch each "
            "sequence's positions start at 0 and count up by 1 (restart them at every sequence boundary)"
        )
    begins = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([starts.numel()], device=begins.device, dtype=begins.dtype)
    cu_seqlens = torch.cat([begins, total]).to(torch.int32)
    return PackedLayout(cu_seqlens, int(cu_seqlens.diff().max()))


def check_layout(cu_seqlens, max_length, total_tokens: int, position_ids: torch.Tensor | None = None,
                 name: str = "cu_seq_lens_q") -> PackedLayout:
    """Validate a collator's `cu_seqlens` (and `max_length`, `position_ids`) for `total_tokens` packed tokens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor [num_sequences + 1] of cumulative lengths starting "
                         f"at 0, got {_describe(cu_seqlens)}")
    lengths = cu_seqlens.diff()
    first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or last != total_tokens:
        raise ValueError(f"{name} must run from 0 to the number of tokens in the batch ({total_tokens}); "
                         f"it runs from {first} to {last}")
    if shortest <= 0:
        i = int((lengths <= 0).nonzero()[0])
        raise ValueError(f"{name} gives sequence {i} length {int(lengths[i])}; every packed sequence needs at least "
                         "one token (drop empty sequences before packing)")
    if max_length is None:
        max_length = longest
    max_length = int(max_length)
    if max_length < longest:
        raise ValueError(f"max_length {max_length} is shorter than the longest packed sequence ({longest}); "
                         f"pass the maximum of {name}.diff()")
    if position_ids is not None:
        expected = positions_from_cu_seqlens(cu_seqlens, total_tokens)
        wrong = position_ids.reshape(-1) != expected
        if wrong.any():
            t = int(wrong.nonzero()[0])
            raise ValueError(f"position_ids disagree with {name}: token {t} has position "
                             f"{int(position_ids.reshape(-1)[t])} but is token {int(expected[t])} of its sequence "
                             "(positions must restart at 0 at every sequence start)")
    return PackedLayout(cu_seqlens.to(torch.int32), max_length)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Each token's index within its sequence: t - start(sequence of t)."""
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), cu_seqlens.diff().long(), output_size=total_tokens)
    return torch.arange(total_tokens, device=cu_seqlens.device) - starts


# ----------------------------------------------------------------------------------------------------------------
# Backends. Each takes q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv: grouped-query attention shares
# kv head j // (Hq / Hkv) with q head j), a PackedLayout, the softmax scale, `left`: how many earlier tokens a
# query may see (-1: all of them, i.e. plain causal; a sliding window w gives left = w - 1), and the attention
# dropout probability (only the backends in DROPOUT take one above 0).
# ----------------------------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _flash_attn(q, k, v, layout, scale, left, dropout_p):
    from flash_attn import flash_attn_varlen_func

    cu, m = layout.cu_seqlens, layout.max_length
    return flash_attn_varlen_func(q, k, v, cu, cu, m, m, dropout_p=dropout_p, softmax_scale=scale, causal=True,
                                  window_size=(left, 0))


def _flash_attn_cute(q, k, v, layout, scale, left, dropout_p):
    from flash_attn.cute import flash_attn_varlen_func

    cu, m = layout.cu_seqlens, layout.max_length
    out, _ = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m,
                                    softmax_scale=scale, causal=True, window_size=(None if left < 0 else left, 0))
    return out


def _torch_varlen(q, k, v, layout, scale, left, dropout_p):
    from torch.nn.attention.varlen import varlen_attn

    cu, m = layout.cu_seqlens, layout.max_length
    extra = {}
    if k.shape[1] != q.shape[1]:
        mode = _torch_varlen_gqa_mode(q.device)
        if mode == "flag":
            extra["enable_gqa"] = True
        elif mode == "repeat":
            k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    return varlen_attn(q, k, v, cu, cu, m, m, scale=scale, window_size=(left, 0), **extra)


@cache
def _torch_varlen_gqa_mode(device: torch.device) -> str:
    """How this torch's varlen_attn takes fewer K/V heads than Q heads: "flag" (it has `enable_gqa`), "native"
    (older ones: no flag, but FlashAttention shares the heads itself), or "repeat" (K/V must be repeated)."""
    from torch.nn.attention.varlen import varlen_attn

    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return "flag"
    return "native" if _torch_varlen_gqa_native(device) else "repeat"


def _torch_varlen_gqa_native(device: torch.device) -> bool:
    """Whether this torch's varlen_attn (older ones have no `enable_gqa`) gives fewer kv heads than q heads the
    same forward and backward as repeating them. FlashAttention supports it natively, the wrapper may not."""
    from torch.nn.attention.varlen import varlen_attn

    with torch.inference_mode(False), torch.enable_grad():  # the first call may come from an eval forward
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(13, h, 64, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
                   for h in (4, 2, 2))
        cu = torch.tensor([0, 5, 13], device=device, dtype=torch.int32)
        try:
            native = varlen_attn(q, k, v, cu, cu, 8, 8, window_size=(-1, 0))
            grads_native = torch.autograd.grad(native.float().square().sum(), (q, k, v))
        except (RuntimeError, ValueError):
            return False
        repeated = varlen_attn(q, _repeat_kv(k, 2), _repeat_kv(v, 2), cu, cu, 8, 8, window_size=(-1, 0))
        grads_repeated = torch.autograd.grad(repeated.float().square().sum(), (q, k, v))
    return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
               for a, b in zip((native, *grads_native), (repeated, *grads_repeated)))


def _sdpa_loop(q, k, v, layout, scale, left, dropout_p):
    n_rep = q.shape[1] // k.shape[1]
    bounds = layout.cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = q[s:e].transpose(0, 1), _repeat_kv(k[s:e], n_rep).transpose(0, 1), \
            _repeat_kv(v[s:e], n_rep).transpose(0, 1)
        length = e - s
        if 0 <= left < length - 1:  # a window shorter than the sequence: causal band |q - kv| <= left
            idx = torch.arange(length, device=q.device)
            dist = idx[:, None] - idx[None, :]
            band = (dist >= 0) & (dist <= left)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=band, dropout_p=dropout_p, scale=scale)
        else:
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, dropout_p=dropout_p, scale=scale)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


BACKENDS = {"flash_attn_cute": _flash_attn_cute, "flash_attn": _flash_attn, "torch_varlen": _torch_varlen,
            "sdpa_loop": _sdpa_loop}
# The module each backend needs. flash-attn 2 and 4 share the `flash_attn` name (4 installs only flash_attn.cute,
# a namespace package), so each is found by its own submodule.
REQUIRES = {"flash_attn_cute": "flash_attn.cute", "flash_attn": "flash_attn.flash_attn_interface",
            "torch_varlen": "torch.nn.attention.varlen"}
OPTIONAL = ("flash_attn_cute", "flash_attn")  # separate packages, which may install but fail to compile or launch
# The backends with attention dropout (FlashAttention-2's varlen kernel and SDPA); FA4's and torch's varlen have none.
DROPOUT = ("flash_attn", "sdpa_loop")


@cache
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# Backends that raised when chosen automatically (an optional package that installs but cannot compile or launch
# here, say): skipped from then on, with one warning, instead of failing every forward.
_BROKEN: dict[str, str] = {}


def available(backend: str) -> bool:
    return backend in BACKENDS and backend not in _BROKEN and (backend not in REQUIRES or _installed(REQUIRES[backend]))


def select_backend(device: torch.device, dtype: torch.dtype, head_dim: int = 64, dropout: bool = False) -> str:
    """The fastest backend that can run on `device` with `dtype` and `head_dim` (and attention dropout, if asked)."""
    device = torch.device(device)
    usable = lambda name: available(name) and (not dropout or name in DROPOUT)  # noqa: E731
    if device.type == "cuda" and dtype in HALF_DTYPES:
        # FlashAttention 4 has Hopper (sm90) and Blackwell (sm100/sm110) kernels for head dims 8..256 in steps of 8;
        # on older GPUs FlashAttention-2 is the faster one.
        if torch.cuda.get_device_capability(device)[0] in (9, 10, 11) and head_dim % 8 == 0 \
                and 8 <= head_dim <= 256 and usable("flash_attn_cute"):
            return "flash_attn_cute"
        for name in ("flash_attn", "torch_varlen"):
            if usable(name):
                return name
    return "sdpa_loop"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
                     scale: float | None = None, sliding_window: int | None = None, dropout_p: float = 0.0,
                     backend: str | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    `sliding_window` w (HF's meaning): a query sees itself and the w - 1 tokens before it. `dropout_p`: attention
    dropout on the softmax weights (as HF's attention applies config.attention_dropout in training), which only
    FlashAttention-2's varlen kernel and the per-sequence SDPA loop have: with it above 0 the backend is chosen
    among those.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention wants q [T, Hq, D] and k, v [T, Hkv, D] with Hq a multiple of Hkv; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown varlen attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if backend is not None and dropout_p and backend not in DROPOUT:
        raise ValueError(f"the {backend} backend has no attention dropout (dropout_p={dropout_p}); use one of "
                         f"{', '.join(DROPOUT)}, or leave backend unset to choose one")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left = -1 if sliding_window is None else sliding_window - 1
    if backend is not None:
        return BACKENDS[backend](q, k, v, layout, scale, left, dropout_p)
    while True:
        name = select_backend(q.device, q.dtype, q.shape[-1], dropout_p > 0)
        try:
            return BACKENDS[name](q, k, v, layout, scale, left, dropout_p)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # an optional package's failure: fall back to the next backend, once and loudly
            if name not in OPTIONAL:  # torch's own paths: their errors are the caller's
                raise
            _BROKEN[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"packed attention: the {name} backend failed ({_BROKEN[name][:300]}); using "
                          f"{select_backend(q.device, q.dtype, q.shape[-1], dropout_p > 0)} from now on",
                          RuntimeWarning, stacklevel=2)


# ----------------------------------------------------------------------------------------------------------------
# The Hugging Face side: the attention function, its mask function, and the once-per-forward batch preparation.
# ----------------------------------------------------------------------------------------------------------------


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """HF attention interface: query [B, Hq, S, D], key/value [B, Hkv, S, D] -> ([B, S, Hq, D], None).

    Called with `output_attentions=True` (model(..., output_attentions=True)), the layer runs HF's eager attention
    over the same mask instead (causal, within each packed sequence, within the sliding window) and returns its
    weights [B, Hq, S, S_kv], as an eager model would; SDPA and the varlen kernels have no weights to give."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, q_len, head_dim = query.shape
    # What some architectures hand their attention that no path here applies: Gemma-2's logit soft-capping,
    # gpt-oss's sink logits, a relative position bias. Dropped, they would give a wrong attention without a word.
    unapplied = [name for name in ("softcap", "s_aux", "position_bias") if kwargs.get(name) is not None]
    if unapplied:
        raise ValueError(f"chronicals' packed attention does not apply this model's {', '.join(unapplied)}; load the "
                         "model with attn_implementation='eager' and do not pack (use_sequence_packing: false)")
    with_weights = kwargs.get("output_attentions", False)
    if cu_seq_lens_q is not None:
        if max_length_q is None:  # no collator int and no `chronicals.apply` hook: read it (a sync per layer)
            max_length_q = int(cu_seq_lens_q.diff().max())
        layout = PackedLayout(cu_seq_lens_q, int(max_length_q))
    elif attention_mask is None and sliding_window is not None and q_len == key.shape[2] and q_len > sliding_window:
        if dropout and not with_weights:
            # Not a packed batch: attention dropout runs in HF's SDPA over the banded causal mask that packed_mask
            # left out, as an unpatched model's does (the same random numbers, so the same result under one seed).
            band = causal_window(q_len, q_len, sliding_window, query.device).expand(batch, 1, q_len, q_len)
            return sdpa_attention_forward(module, query, key, value, band, dropout=dropout, scaling=scaling,
                                          **kwargs)
        # One sequence per row with a window shorter than the row: SDPA would need a dense banded mask.
        layout = PackedLayout(torch.arange(0, batch * q_len + 1, q_len, device=query.device, dtype=torch.int32), q_len)
    else:
        if with_weights:
            return eager_attention_with_weights(module, query, key, value, attention_mask, dropout, scaling,
                                                sliding_window)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        raise ValueError("a packed batch takes no attention mask: sequence boundaries come from cu_seq_lens_q")
    if kwargs.get("is_causal") is False:
        raise ValueError("packed attention is causal, and this layer asks for bidirectional attention "
                         "(is_causal=False); do not pack this model's batches (use_sequence_packing: false)")
    if with_weights:
        return eager_attention_with_weights(module, query, key, value, None, dropout, scaling, sliding_window, layout)
    if torch.is_autocast_enabled(query.device.type):
        # Under autocast with fp32 hidden states (fp32 master weights), HF's RoPE hands q and k back in fp32. Attention
        # runs in autocast's dtype, as autocast runs SDPA and HF's flash path casts; fp32 would also select the
        # per-sequence SDPA loop instead of a half-precision varlen kernel.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (x.to(dtype) if x.dtype == torch.float32 else x for x in (query, key, value))
    flat = lambda x: x.transpose(1, 2).reshape(batch * q_len, x.shape[1], head_dim)  # noqa: E731
    out = varlen_attention(flat(query), flat(key), flat(value), layout, scale=scaling, sliding_window=sliding_window,
                           dropout_p=dropout)
    return out.view(batch, q_len, -1, head_dim), None


def eager_attention_with_weights(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                 layout: PackedLayout | None = None):
    """HF's eager attention (softmax weights returned) over the mask the other paths apply: `attention_mask` when
    the mask function gave one (HF's SDPA mask: padding, cache offsets, window), else causal with the queries the
    last q_len keys (as SDPA's is_causal where HF leaves the mask out), within `sliding_window` and, given a
    packed `layout`, within each sequence. Dense [B, 1, S, S_kv]: only for output_attentions, which returns as much."""
    from transformers.models.llama.modeling_llama import eager_attention_forward  # the families' eager is one code

    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    device, low = query.device, torch.finfo(query.dtype).min
    if attention_mask is None:
        allowed = causal_window(q_len, kv_len, sliding_window, device)
        if layout is not None:
            lengths = layout.cu_seqlens.diff().long()
            sequence = torch.repeat_interleave(torch.arange(layout.num_sequences, device=device), lengths,
                                               output_size=batch * q_len).view(batch, q_len)
            if batch > 1 and bool((sequence[1:, 0] == sequence[:-1, -1]).any()):
                raise ValueError("output_attentions needs each packed sequence within one row of the batch; "
                                 "cu_seq_lens_q has a sequence that runs on into the next row")
            allowed = allowed & (sequence[:, :, None] == sequence[:, None, :])
        attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=device).masked_fill_(~allowed, low)
        attention_mask = attention_mask.expand(batch, -1, -1)[:, None]
    elif attention_mask.dtype == torch.bool:  # HF's SDPA mask (True: attend) as eager's additive one
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill_(~attention_mask, low)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


def causal_window(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where a query may attend: the queries are the last q_len of the kv_len positions,
    each sees itself and the keys before it, and only the sliding_window - 1 nearest of those when a window is set."""
    distance = torch.arange(kv_len - q_len, kv_len, device=device)[:, None] - torch.arange(kv_len, device=device)
    return (distance >= 0) & (distance < (sliding_window or kv_len + 1))


def packed_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """HF mask interface: no mask at all for a training forward (no padding, no cache), whose causality and
    sequence boundaries `packed_attention_forward` applies itself; HF's SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    plain = attention_mask is None and q_length == kv_length and not torch.is_tensor(q_offset) \
        and q_offset == 0 and kv_offset == 0
    if plain:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def prepare_packed_batch(kwargs: dict) -> dict:
    """Once per forward, before the decoder layers: turn a packed batch into the kwargs the attention reads.

    Given `cu_seq_lens_q`, validate it (and `position_ids`, or derive them from it); given only
    `position_ids` that restart inside a row, derive `cu_seq_lens_q` and `max_length_q` from them. A batch
    with one sequence per row is left to dense causal attention, which is the same and faster.
    """
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return kwargs
    batch, seq = tokens.shape[:2]
    position_ids, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if position_ids is None or kwargs.get("past_key_values") is not None or _has_padding(mask):
            return kwargs
        position_ids = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        if not bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any()):
            return kwargs  # no row restarts inside itself: one sequence per row (at any offset), dense attention
        layout = layout_from_position_ids(position_ids)
    else:
        if kwargs.get("past_key_values") is not None:
            raise ValueError("packed batches (cu_seq_lens_q) run without a KV cache; do not pass past_key_values")
        if _has_padding(mask):
            raise ValueError("a packed batch must not carry padding in attention_mask: sequence boundaries come from "
                             "cu_seq_lens_q (give trailing padding its own sequence, with labels -100)")
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k.to(cu.device), cu):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: packed self-attention has the same "
                             "sequences on both sides")
        if position_ids is not None and position_ids.numel() != batch * seq:
            raise ValueError(f"position_ids has {position_ids.numel()} entries for {batch * seq} tokens")
        # Checked where the collator made them: a batch whose cu_seq_lens_q (and position_ids) are still on the host
        # is validated there, with no device sync, and then copied over (ChronicalsTrainer leaves them there, so
        # that it can run ahead of the GPU); the checks read values, which on the device means a sync.
        if position_ids is not None and position_ids.device != cu.device:
            cu = cu.to(position_ids.device)
        layout = check_layout(cu, kwargs.get("max_length_q"), batch * seq, position_ids)
        layout = PackedLayout(layout.cu_seqlens.to(tokens.device, non_blocking=True), layout.max_length)
        if position_ids is None:  # HF would count 0..T-1 across the whole row: RoPE must restart per sequence
            position_ids = positions_from_cu_seqlens(layout.cu_seqlens, batch * seq).view(batch, seq)
        kwargs["position_ids"] = position_ids.to(tokens.device, non_blocking=True)
    kwargs.update(attention_mask=None, cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
                  max_length_q=layout.max_length, max_length_k=layout.max_length)
    return kwargs


def _has_padding(mask) -> bool:
    return mask is not None and not bool(mask.all())


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _skip_hf_packed_detection(preprocess):
    """Wrap transformers' `_preprocess_mask_arguments` so that, for this implementation only, it does not look for
    packed sequences in `position_ids`. HF's `find_packed_sequence_indices` ends in `.all()`, a host sync in every
    forward without an attention mask, and its result is only ever folded into a mask that `packed_mask` drops:
    this implementation takes sequence boundaries from `cu_seq_lens_q`, which `prepare_packed_batch` derives from
    restarting `position_ids` itself. H100, 2026-12-06 (benchmarks/step_profile.py, Qwen2.5-0.5B 8 x 2048): that
    sync stalls the host mid-forward and the GPU then waits on launches for the rest of the step, 137.9 ms against
    127.8 ms with the sync gone."""

    @wraps(preprocess)
    def preprocess_mask_arguments(config, inputs_embeds, attention_mask, past_key_values, position_ids, *args,
                                  **kwargs):
        if getattr(config, "_attn_implementation", None) == IMPLEMENTATION:
            position_ids = None
        return preprocess(config, inputs_embeds, attention_mask, past_key_values, position_ids, *args, **kwargs)

    preprocess_mask_arguments.chronicals_wrapped = preprocess
    return preprocess_mask_arguments


def register() -> None:
    """Make "chronicals_varlen" a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface, masking_utils
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, packed_mask)
    preprocess = getattr(masking_utils, "_preprocess_mask_arguments", None)
    if preprocess is not None and not hasattr(preprocess, "chronicals_wrapped"):
        masking_utils._preprocess_mask_arguments = _skip_hf_packed_detection(preprocess)


register()
