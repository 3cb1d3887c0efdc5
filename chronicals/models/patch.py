"""`apply` patches a Hugging Face model instance in place, one flag per optimization so that an ablation is a
list of flag sets; `apply_to_classes` makes every model of a family created afterwards come out patched.

Patching binds new forwards on the module instances (parameters, state dict and checkpoints are untouched):
- rms_norm: every RMSNorm (Qwen3's q_norm/k_norm included) -> fused_rmsnorm, and each decoder layer's
  residual add + post-attention norm -> fused_add_rmsnorm;
- swiglu: each MLP's silu(gate) * up -> fused_swiglu;
- rope: each attention's rotary embedding of q and k -> fused_qk_rope;
- linear_cross_entropy: the causal-LM forward computes the training loss with fused_linear_cross_entropy and
  returns no logits (HF's forward otherwise);
- packed_attention: attn_implementation "chronicals_varlen" (chronicals.attention) plus a once-per-forward
  step on the base model that validates or derives cu_seq_lens_q for packed batches.
Where the kernels cannot run (a CPU without TRITON_INTERPRET) each patched forward computes HF's math in
plain PyTorch (chronicals.models.dispatch).
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from .causal_lm import causal_lm_forward
from .registry import FAMILIES, family_for
from .rms_norm import decoder_layer_forward, rms_norm_forward
from .rope import rope_attention_forward
from .swiglu import SILU_NAMES, swiglu_mlp_forward

FLAGS = ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "packed_attention")

# flag -> (class-name suffix, patched forward); a flag may patch several module kinds.
_FORWARDS = {
    "rms_norm": (("RMSNorm", rms_norm_forward), ("DecoderLayer", decoder_layer_forward)),
    "swiglu": (("MLP", swiglu_mlp_forward),),
    "rope": (("Attention", rope_attention_forward),),
    "linear_cross_entropy": (("ForCausalLM", causal_lm_forward),),
}


def _causal_lm(model: nn.Module):
    """The transformers model inside `model` (which may be a PEFT wrapper)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    if hasattr(model, "get_base_model"):
        return _causal_lm(model.get_base_model())
    raise TypeError(f"chronicals.apply needs a Hugging Face causal LM (e.g. AutoModelForCausalLM), "
                    f"got {type(model).__name__}")


def _packed_batch_hook(module, args, kwargs):
    from chronicals.attention import prepare_packed_batch

    if args:  # a bare decoder called as model(input_ids, attention_mask, position_ids): read its inputs by name
        kwargs, args = _as_keywords(module.forward, args, kwargs), ()
    return args, prepare_packed_batch(kwargs)


def _as_keywords(forward, args: tuple, kwargs: dict) -> dict:
    """`forward(*args, **kwargs)`'s arguments as keywords only, bound as the call would bind them (so an argument
    given twice is still the caller's TypeError)."""
    signature = inspect.signature(forward)
    keywords = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            keywords.update(value)
        else:
            keywords[name] = value
    return keywords


def apply(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
          linear_cross_entropy: bool = True, packed_attention: bool = True, cuda_graphs: bool = False) -> nn.Module:
    """Patch `model` (a Llama 3.x, Qwen2/2.5, Qwen3 or Mistral causal LM or bare AutoModel, optionally PEFT-wrapped)
    in place. A model of another architecture takes packed_attention alone (every kernel flag False), where its
    attention goes through transformers' attention interface.

    cuda_graphs (off by default) replays each decoder layer's forward and backward as CUDA graphs in training
    steps whose shapes repeat, and runs the layers as usual everywhere else (chronicals.models.cuda_graphs says
    when); it cuts the host's launch work, which bounds small models' steps. It sets config.use_cache = False (a
    forward that fills a KV cache cannot be a graph; training needs no cache, and generate() asks for one itself).
    It is not one of FLAGS (not a patch of a module kind) and is kept across later applies once on.

    Returns the same model. Flags left False keep HF's behaviour for that part; applying again can add patches,
    never remove them (build a fresh model for a different flag set).
    """
    flags = dict(rms_norm=rms_norm, swiglu=swiglu, rope=rope, linear_cross_entropy=linear_cross_entropy,
                 packed_attention=packed_attention)
    for name, value in {**flags, "cuda_graphs": cuda_graphs}.items():
        if not isinstance(value, bool):
            raise TypeError(f"chronicals.apply: flag {name} must be True or False, got {value!r}")
    lm = _causal_lm(model)
    kernels = [name for name in FLAGS if name != "packed_attention" and flags[name]]
    if kernels or lm.config.model_type in FAMILIES:
        _patch_forwards(lm, flags, kernels)
    elif packed_attention:
        # Packed attention alone is no family's: it stands in for any attention that goes through transformers'
        # attention interface, so a model of an architecture without kernels here still trains on packed rows.
        _check_generic_packed_attention(lm)
    if packed_attention:
        _install_packed_attention(lm)
    if cuda_graphs or getattr(lm, "chronicals_cuda_graphs", None) is not None:
        _install_cuda_graphs(lm)

    previous = getattr(lm, "chronicals_patches", {})
    lm.chronicals_patches = {k: v or previous.get(k, False) for k, v in flags.items()}
    return model


def _patch_forwards(lm, flags: dict, kernels: list[str]) -> None:
    try:
        family = family_for(lm.config.model_type)
    except ValueError as e:
        off = ", ".join(f"{name}=False" for name in kernels)
        raise ValueError(f"{e}. With {off}, packed_attention alone patches any model whose attention goes through "
                         "transformers' attention interface") from None
    if flags["swiglu"] and lm.config.hidden_act not in SILU_NAMES:
        raise ValueError(f"swiglu=True fuses silu(gate) * up, but this model's hidden_act is "
                         f"{lm.config.hidden_act!r}; pass swiglu=False")

    targets = [(family.cls(suffix), forward) for flag, pairs in _FORWARDS.items() if flags[flag]
               for suffix, forward in pairs]
    for module in lm.modules():
        for cls, forward in targets:
            if isinstance(module, cls):
                # A partial rather than types.MethodType: a bound method pickles as getattr(module, "<function
                # name>"), which fails on load, so torch.save / pickle of a patched model could not be read back.
                patched = functools.partial(forward, module)
                if hasattr(module, "_hf_hook") and "_old_forward" in vars(module):
                    # accelerate's hook (from_pretrained with a device_map: devices, offloading) replaced forward
                    # with one that moves inputs and loads weights, then calls `_old_forward`: patch inside it.
                    module._old_forward = patched
                else:
                    module.forward = patched


def _install_packed_attention(lm) -> None:
    import chronicals.attention as attention

    base = lm.base_model  # the decoder stack: `model` of a ForCausalLM, or the model itself (AutoModel)
    if getattr(base, "_chronicals_packed_hook", None) is None:
        base._chronicals_packed_hook = base.register_forward_pre_hook(_packed_batch_hook, with_kwargs=True)
    lm.set_attn_implementation(attention.IMPLEMENTATION)


def _install_cuda_graphs(lm) -> None:
    """Each decoder layer's forward -> graphed_forward around the forward it has now (HF's or a patched one). Run
    again (a later apply that re-patched the layers) it wraps the new forwards and drops any captured graphs."""
    from .cuda_graphs import GraphsUnsupported, LayerGraphs, graphed_forward

    layers = getattr(lm.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise GraphsUnsupported(f"cuda_graphs: {type(lm.base_model).__name__} has no decoder layers at .layers to "
                                "graph; pass cuda_graphs=False")
    if any(hasattr(layer, "_hf_hook") for layer in layers):
        raise GraphsUnsupported("cuda_graphs: the decoder layers carry accelerate hooks (a model loaded with a "
                                "device_map moves inputs or weights between devices per call, which a graph cannot); "
                                "load it onto one GPU without a device_map, or pass cuda_graphs=False")
    previous = getattr(lm, "chronicals_cuda_graphs", None)
    forwards = []
    for i, layer in enumerate(layers):
        # The instance's patched forward, or the class's bound as a partial (which pickles, see _patch_forwards).
        current = vars(layer).get("forward") or functools.partial(type(layer).forward, layer)
        wrapped = isinstance(current, functools.partial) and current.func is graphed_forward
        forwards.append(previous.forwards[i] if wrapped else current)
    graphs = LayerGraphs(layers, forwards)
    for i, layer in enumerate(layers):
        layer.forward = functools.partial(graphed_forward, graphs, i)
    lm.chronicals_cuda_graphs = graphs
    lm.config.use_cache = False


def _check_generic_packed_attention(lm) -> None:
    """Refuse, before anything is patched, a model of an architecture without kernels here whose attention packed
    attention cannot stand in for; the supported families were checked one by one."""
    name, config = type(lm).__name__, lm.config
    if not type(lm).is_backend_compatible():
        raise ValueError(f"packed_attention: {name}'s attention does not go through transformers' attention interface, "
                         "so chronicals' packed attention cannot replace it; pass packed_attention=False (train on "
                         "padded batches)")
    accepts = inspect.signature(lm.base_model.forward).parameters
    if "position_ids" not in accepts or not any(p.kind is p.VAR_KEYWORD for p in accepts.values()):
        raise ValueError(f"packed_attention: {type(lm.base_model).__name__}.forward takes no position_ids or no "
                         "attention keywords, so packed sequences cannot restart their positions; pass "
                         "packed_attention=False")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"packed_attention: this {config.model_type} model soft-caps its attention logits "
                         f"(config.attn_logit_softcapping={config.attn_logit_softcapping}), which packed attention "
                         "does not; pass packed_attention=False")


def apply_to_classes(model_type: str, **flags):
    """Patch every `model_type` causal LM created from now on (same flags as `apply`).

    Wraps the family's ForCausalLM constructor so that each new instance is passed through `apply`, before
    any weights are loaded into it. Returns a function that undoes this (models already created stay patched).
    """
    unknown = set(flags) - {*FLAGS, "cuda_graphs"}
    if unknown:
        raise TypeError(f"apply_to_classes: unknown flag(s) {', '.join(sorted(unknown))}; "
                        f"flags are: {', '.join(FLAGS)}, cuda_graphs")
    for name, value in flags.items():  # refused now, not in the constructor of every model made later
        if not isinstance(value, bool):
            raise TypeError(f"apply_to_classes: flag {name} must be True or False, got {value!r}")
    cls = family_for(model_type).cls("ForCausalLM")
    original = cls.__init__

    def patched_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        apply(self, **flags)

    cls.__init__ = patched_init

    def undo():
        cls.__init__ = original

    return undo
