"""Decoder layers replayed as CUDA graphs: `apply(model, cuda_graphs=True)`.

Why: a patched decoder layer is ~40 kernel launches plus the Python of HF's forward and of our autograd Functions.
At Qwen2.5-0.5B's shape (8 x 2048) the host needs about as long to enqueue a step as the GPU needs to run it (H100,
commit 88c92bf: 117 ms of GPU work a step, steps of 125 ms back to back and 137-140 ms timed one at a time, which
leaves the GPU waiting on launches at each step's start). With every layer's forward and backward one graph launch
each, the host's work per layer is one copy (its input; the positions and cos/sin are copied once a forward, at
layer 0, into one static copy that every layer's graph reads) and two replays. Measured (H100, same host and call,
step_profile): 132.3 -> 122.9 ms a step timed one at a time, 122.9 -> 123.8 back to back (the copies in and the
gradients' clones cost ~1 ms), GPU idle under the profiler 43 -> 3 ms a step; peak memory 15.86 -> 17.83 GiB (each
graph keeps its own copy of its input and its gradient outputs, ~0.7 GiB each over 24 layers). LoRA at Llama-3.2-1B
is GPU-bound: 189.5 -> 190.7 ms, no gain. Copying the per-forward tensors once a forward instead of in every layer
(the profile counted 120 device-to-device copies a step, 5 a layer) changed nothing measurable: 123.75 -> 123.79 ms,
back to back 124.89 -> 124.55 (H100, a6d84c0 against a14f86a).

How: torch.cuda.make_graphed_callables captures all layers together (one memory pool, forwards in order, backwards
in reverse: the order a training step runs them) once layer 0 has seen the same call signature (the shapes, dtypes
and strides of its tensor arguments and the values of the others) in two forwards in a row, so data whose shapes
change from step to step (packed rows of varying sequence lengths) does not pay for a capture it cannot reuse; after
graphs are dropped for a new signature the next capture waits for four times as long a run (8, then 32, ...).

A call runs the layer's ordinary (patched) forward instead whenever a graph would compute something else or lose
data:
- not a training forward with autograd on (eval, no_grad), or under torch.compile, gradient checkpointing,
  saved-tensor hooks (activation offload), or another CUDA graph's capture;
- an autocast state other than the captured one (whether autocast is on, and its dtype, are part of the signature;
  the graphs are captured under the caller's autocast with its cache of cast weights off, as make_graphed_callables
  requires: each replay casts the weights again, as an eager step does on its first use of them);
- a KV cache passed in (past_key_values: apply sets config.use_cache = False for training; generate() passes
  its own cache, under no_grad anyway);
- a signature other than the captured one (after four such forwards of layer 0 in a row the graphs are dropped and
  their memory freed, and the next stable signature is captured as above);
- module hooks on the layer (transformers records hidden states and attentions through them), or parameters that
  are no longer the captured ones (moved, replaced, adapters added after the capture);
- the layer's previous graphed forward still waits for its backward: a graph keeps one set of activations, so a
  second forward before the first one's backward (two losses summed, say) runs eagerly;
- a model whose first layers have nothing to train and no input gradient (adapters on later layers only): no
  graphs are captured at all (each graph must have a backward), the reason kept in `LayerGraphs.failed`.
A graphed layer's output is the graph's static buffer (as make_graphed_callables returns it): the next layer's
replay copies it in, and the next forward overwrites it, so only code that keeps a layer's output past the next
forward (without hooks) would see it change.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from functools import partial

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

# Keyword arguments that transformers hands every layer for the loss alone (the layers ignore them): left out of the
# signature, or a trainer's per-step count of label tokens (ChronicalsTrainer, HF Trainer) would make every step new.
_LOSS_ONLY = frozenset({"num_items_in_batch"})
_RECAPTURE_AFTER = 4  # forwards of layer 0 in a row with another signature before the graphs are dropped


class GraphsUnsupported(ValueError):
    """apply(cuda_graphs=True) refused for this model; the message says why and what to pass instead."""


class LayerGraphs:
    """The graph state of one model's decoder layers; each layer's forward is `partial(graphed_forward, graphs, i)`."""

    def __init__(self, layers, forwards):
        self.layers = list(layers)
        self.forwards = list(forwards)  # each layer's forward before this patch (HF's or ours)
        self.graphed = None  # one callable per layer once captured
        self.keys = None  # per layer, the captured call signature (they differ in the input's requires_grad)
        self.params = None  # per layer, the captured parameters
        self.shared = None  # the tensors after the hidden states that every layer's graph reads (captured once)
        self.passed = None  # those that layer 0's replay of this forward copied into `shared`
        self.in_flight = [None] * len(self.layers)  # per layer, a weakref to the last graphed forward's _Flight
        self.candidate, self.streak = None, 0  # layer 0's last signature and how many forwards in a row had it
        self.needed = 2  # forwards in a row with one signature before a capture; x4 after each drop
        self.misses = 0
        self.failed = None  # why capturing failed (then every call runs eagerly)

    # Pickling / deepcopy of a patched model: the layers and forwards, never the graphs (state, not __reduce__
    # arguments: the layers' forwards refer back to this object, a cycle only state restores).
    def __getstate__(self):
        return {"layers": self.layers, "forwards": self.forwards}

    def __setstate__(self, state):
        self.__init__(**state)

    def drop(self):
        self.graphed = self.keys = self.params = self.shared = self.passed = None
        self.in_flight = [None] * len(self.layers)
        self.misses = 0
        self.needed *= 4  # shapes that changed once may change again: ask for a longer run before the next capture


class _Flight:
    """Alive while a graphed forward's autograd graph is; `done` once its backward has started."""

    __slots__ = ("done", "__weakref__")

    def __init__(self):
        self.done = False


class _LayerCall(torch.nn.Module):
    """One decoder layer's call with tensors in, positionally, and the rest fixed at capture. It runs the forward the
    layer had before graphed_forward wrapped it; a module, so that _call_with can stand its parameters' aliases in."""

    def __init__(self, layer, forward, spec, fixed: list):
        super().__init__()
        self.layer = layer  # a submodule: its parameters are this module's, named "layer.<name>"
        self.call, self.spec, self.fixed = forward, spec, fixed

    def forward(self, *tensors):
        it = iter(tensors)
        leaves = [next(it) if f is _TENSOR else f for f in self.fixed]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.call(*args, **kwargs)


_TENSOR = object()  # marks a tensor leaf in _LayerCall.fixed


def _signature(args: tuple, kwargs: dict):
    """(key, tensor leaves, spec, fixed leaves) of one call, or None where a graph cannot stand in for it: a leaf
    that is neither a CUDA tensor nor a hashable constant (a KV cache object, a CPU tensor whose values the capture
    would bake in)."""
    leaves, spec = tree_flatten((args, kwargs))
    key, tensors, fixed = [spec], [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not leaf.is_cuda:
                return None
            key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
            tensors.append(leaf)
            fixed.append(_TENSOR)
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append((type(leaf), leaf))
            fixed.append(leaf)
    key.append(_autocast_state())
    return tuple(key), tensors, spec, fixed


def _autocast_state():
    """CUDA autocast's dtype, or None with autocast off."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _eager_only(layer) -> bool:
    """True where a graph must not run this call (see the module docstring)."""
    return (not torch.is_grad_enabled() or not layer.training or torch.compiler.is_compiling()
            or getattr(layer, "gradient_checkpointing", False)
            or torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
            or torch.cuda.is_current_stream_capturing()
            or bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks)
            or bool(torch.nn.modules.module._global_forward_hooks
                    or torch.nn.modules.module._global_forward_pre_hooks))


def graphed_forward(graphs: LayerGraphs, index: int, *args, **kwargs):
    layer = graphs.layers[index]
    eager = graphs.forwards[index]
    if index == 0:
        graphs.passed = None  # set again below if layer 0 replays its graph
    if (not args or not isinstance(args[0], torch.Tensor) or not args[0].is_cuda or graphs.failed is not None
            or _eager_only(layer)):
        return eager(*args, **kwargs)
    sig = _signature(args, {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY})
    if sig is None:
        return eager(*args, **kwargs)
    key, tensors = sig[0], sig[1]
    if graphs.graphed is not None and key != graphs.keys[0] and index == 0:
        graphs.misses += 1
        if graphs.misses >= _RECAPTURE_AFTER and not any(_pending(f) for f in graphs.in_flight):
            graphs.drop()  # frees the pool once its graphs are released; a new stable signature is captured below
    if graphs.graphed is None:
        if index != 0:
            return eager(*args, **kwargs)
        graphs.streak = graphs.streak + 1 if graphs.candidate == key else 1
        graphs.candidate = key
        if graphs.streak < graphs.needed:
            return eager(*args, **kwargs)
        if not _capture(graphs, sig):
            return eager(*args, **kwargs)
    if key != graphs.keys[index] or _pending(graphs.in_flight[index]) or not _same_params(layer, graphs.params[index]):
        return eager(*args, **kwargs)
    if index == 0:
        graphs.misses = 0
        graphs.passed = tensors[1:]
    else:
        tensors = [tensors[0], *_shared_in_place(graphs, tensors[1:])]
    out = graphs.graphed[index](*tensors, *(p for p, _ in graphs.params[index]))
    grad_out = next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
    if grad_out is not None:
        flight = _Flight()
        grad_out.grad_fn.metadata["chronicals_cuda_graph"] = flight  # dies with the autograd graph
        grad_out.register_hook(lambda grad, flight=flight: setattr(flight, "done", True))
        graphs.in_flight[index] = weakref.ref(flight)
    return out


def _shared_in_place(graphs: LayerGraphs, tensors):
    """The call's tensors after the hidden states, each replaced by the graphs' shared static copy where it is the
    tensor layer 0 was passed in this forward (positions, cos/sin, sequence boundaries): layer 0's replay already
    copied it there, and a replay skips the copy of an input already in place. Without this every layer copied each
    again (H100, Qwen2.5-0.5B 8 x 2048: 120 copies a step, 5 per layer). A tensor that requires grad is passed as it
    is: its gradient must reach the caller's tensor, not the static copy."""
    if graphs.passed is None:
        return list(tensors)
    return [s if t is p and not t.requires_grad else t for t, p, s in zip(tensors, graphs.passed, graphs.shared)]


def _pending(ref) -> bool:
    flight = ref() if ref is not None else None
    return flight is not None and not flight.done


def _same_params(layer, captured) -> bool:
    now = list(layer.parameters())
    return len(now) == len(captured) and all(p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(now, captured))


def _call_with(call: _LayerCall, names: list, n_tensors: int, *inputs):
    """The layer on the call's tensors with its parameters replaced by `inputs[n_tensors:]`, in `names`' order.

    The graphs are captured over aliases of the parameters (the same storage, fresh autograd leaves) passed in as
    inputs, and replayed with the parameters themselves in those places: the captured backward then never reaches a
    parameter's own AccumulateGrad node. That node is made by the first eager step, on the default stream, and lives
    as long as any autograd graph through the parameter does (a training loop's `loss` holds the last step's until
    the next forward returns); the capture's backward, on its own stream, would synchronise with it on the default
    stream and so invalidate the capture (H100, harness at 3e83ffb, Qwen2.5-0.5B: "operation failed due to a previous
    error during capture", after torch's warning of an AccumulateGrad stream mismatch). At replay the parameters'
    storage is the aliases', so nothing is copied in, and their gradients reach them through the outer graph."""
    return torch.func.functional_call(call, dict(zip(names, inputs[n_tensors:])), inputs[:n_tensors])


def _capture(graphs: LayerGraphs, sig) -> bool:
    """Capture every layer with layer 0's call signature; False (and every later call eager) if it cannot be."""
    key, tensors, spec, fixed = sig
    hidden = tensors[0]
    calls, samples, keys, params = [], [], [], []
    grad_in = hidden.requires_grad
    # The graphs' own copies of the other tensors, shared by all layers: a replay copies its inputs into its sample
    # tensors, which must not be the caller's (a buffer the caller keeps, such as a cached position table, would be
    # overwritten by a later call's values).
    shared = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors[1:]]
    for layer, forward in zip(graphs.layers, graphs.forwards):
        trainable = any(p.requires_grad for p in layer.parameters())
        if not (trainable or grad_in):
            graphs.failed = "a layer without trainable parameters and without an input gradient"
            return False
        # Each layer's sample input is a copy of layer 0's (real values: the warm-up runs on real numbers and draws no
        # random numbers), with the requires_grad that layer will see; the other tensors (positions, cos/sin, masks,
        # sequence boundaries) are the shared copies above.
        sample = hidden.detach().clone().requires_grad_(grad_in)
        call = _LayerCall(layer, forward, spec, fixed)
        named = list(call.named_parameters())
        aliases = [p.detach().requires_grad_(p.requires_grad) for _, p in named]
        calls.append(partial(_call_with, call, [name for name, _ in named], len(tensors)))
        samples.append((sample, *shared, *aliases))
        params.append([(p, p.data_ptr()) for _, p in named])  # replayed in the aliases' places, in this order
        keys.append((key[0], (*key[1][:-1], grad_in), *key[2:]))  # key[1] is the hidden states'
        grad_in = grad_in or trainable
    # The graphs get a memory pool of their own, which cannot use the blocks the eager steps before left cached in
    # the default pool: without giving those back first the process would hold both (H100, Qwen2.5-0.5B 8 x 2048,
    # harness run at e338b3b: 39.6 GiB by NVML against 17.8 GiB of tensors and graph pool).
    torch.cuda.empty_cache()
    amp = key[-1]
    try:
        with torch.autocast("cuda", dtype=amp, cache_enabled=False) if amp is not None else contextlib.nullcontext():
            graphed = torch.cuda.make_graphed_callables(tuple(calls), tuple(samples), allow_unused_input=True)
    except Exception as e:  # a host sync or an uncapturable op in some layer's forward or backward
        graphs.failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"chronicals cuda_graphs: capturing the decoder layers failed, they run eagerly "
                      f"({graphs.failed})", stacklevel=3)
        return False
    graphs.graphed = list(graphed)
    graphs.keys = keys
    graphs.params = params
    graphs.shared = shared
    return True
