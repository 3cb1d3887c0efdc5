"""Route PEFT's LoRA layers through the fused autograd ops of chronicals.kernels.lora.

PEFT's modules and parameter names stay in place (so saving stays PEFT's own format); only forwards change:
- a SwiGLU MLP whose gate/up/down all carry adapters runs as one fused op (replacing HF's or a patched forward);
- q/k/v (and gate/up, when the MLP as a whole cannot fuse) form a shared-input group: the first of them called
  with a tensor computes all the group's outputs in one op and hands each sibling its output when the sibling is
  called with that same tensor. So any attention forward (HF's, or chronicals.apply's) gets its q, k, v from one
  fused op without being rewritten;
- every other adapted linear (o_proj, ...) runs the fused single-projection op, or DoRA's.
Each call checks that the fused path applies now (dropout 0 or eval mode, one active unmerged adapter, frozen
nn.Linear base in the compute dtype: the input's, or autocast's when autocast is on) and otherwise runs PEFT's
own forward. Under autocast the input is cast to autocast's dtype and the op runs with autocast off, the same
result F.linear would give. install_fused(model, kconcat=True) selects the ops' K-concatenated forwards
(LoRAConfig.fused_kconcat); the flag is kept on each rerouted module.
"""

from __future__ import annotations

import functools

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from chronicals.kernels.lora import dora_linear, lora_projections, lora_swiglu_mlp
from chronicals.models.projections import no_hooks, plain_linear
from chronicals.models.swiglu import SILU_MODULES, plain_silu, swiglu_mlp_forward

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _run_fused(op, x: torch.Tensor, *args, **kwargs):
    dt = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return op(x.to(dt), *args, **kwargs)


def _adapter(module: PeftLoraLinear, dt: torch.dtype, *, dora: bool = False):
    """(weight, bias, A, B, scale[, magnitude]) when the fused path applies to `module` computing in `dt`."""
    if not isinstance(module, PeftLoraLinear):  # PEFT's merge_and_unload / unload put the base layer back
        return None
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or module.lora_bias[name] or module.fan_in_fan_out:
        return None
    if (name in module.lora_variant) != dora or (dora and name not in module.lora_magnitude_vector):
        return None
    if module.training and not isinstance(module.lora_dropout[name], nn.Identity):
        return None
    base = module.get_base_layer()
    # Its weight is read, not called: a hooked or replaced base layer (a user's hook, accelerate's) is PEFT's to run.
    if not plain_linear(base) or base.weight.requires_grad or base.weight.dtype != dt:
        return None
    if base.bias is not None and (base.bias.requires_grad or base.bias.dtype != dt):
        return None
    args = (base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
    return (*args, module.lora_magnitude_vector[name].weight) if dora else args


def _plain(module: nn.Module, x, *args, **kwargs):
    return type(module).forward(module, x, *args, **kwargs)


def _linear_forward(self: PeftLoraLinear, x, *args, **kwargs):
    if not args and not kwargs:
        dt = compute_dtype(x)
        params = _adapter(self, dt)
        if params is not None:
            return _run_fused(lora_projections, x, [params], kconcat=self.__dict__.get("_chronicals_kconcat", False))[0]
        params = _adapter(self, dt, dora=True)
        if params is not None:
            return _run_fused(dora_linear, x, *params)
    return _plain(self, x, *args, **kwargs)


class SharedInputGroup:
    """Sibling projections of one input, computed together by whichever sibling is called first."""

    def __init__(self, modules: list[PeftLoraLinear], kconcat: bool = False):
        self.modules = modules
        self.kconcat = kconcat
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, index: int, x, *args, **kwargs):
        hit = self.pending.pop(index, None)
        if hit is not None and hit[0] is x:
            return hit[1]
        module = self.modules[index]
        params = None if (args or kwargs) else [_adapter(m, compute_dtype(x)) for m in self.modules]
        if params is None or any(p is None for p in params):
            self.pending.clear()
            return _linear_forward(module, x, *args, **kwargs)
        outs = _run_fused(lora_projections, x, params, kconcat=self.kconcat)
        self.pending = {j: (x, out) for j, out in enumerate(outs) if j != index}
        return outs[index]


def _grouped_forward(self: PeftLoraLinear, x, *args, **kwargs):
    # The group lives on the module (not in a closure) so that copy.deepcopy of the model copies it too.
    return self._chronicals_group(self._chronicals_group_index, x, *args, **kwargs)


def _mlp_forward(self: nn.Module, x, *args, residual=None, **kwargs):
    # The one op stands in for the calls of act_fn and the three adapted layers: it applies only while none of them
    # has hooks (or act_fn a replacement), which would otherwise be skipped. `residual`: residual + mlp(x), from
    # chronicals' patched decoder layer (models.rms_norm.mlp_with_residual), added inside down's matmul.
    parts = [getattr(self, n) for n in MLP_PARTS]
    fusable = not (args or kwargs) and plain_silu(self.act_fn) and all(no_hooks(m) for m in parts)
    params = [_adapter(m, compute_dtype(x)) for m in parts] if fusable else None
    if params is None or any(p is None for p in params):
        out = self._chronicals_unfused_forward(x, *args, **kwargs)
        return out if residual is None else residual + out
    return _run_fused(lora_swiglu_mlp, x, *params, kconcat=self.__dict__.get("_chronicals_kconcat", False),
                      residual=residual)


_mlp_forward.adds_residual = True


def _hf_mlp_forward(self, x):  # HF's LlamaMLP / Qwen2MLP / Qwen3MLP / MistralMLP, and their copies in other models
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _hf_mlp_forward_return(self, x):  # the same computation written as one return (Qwen2.5-VL's MLP, ...)
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _same_code(fn, reference) -> bool:
    """`fn` compiles to `reference`'s bytecode (same operations on the same attribute names; argument names and
    a docstring may differ)."""
    code, ref = getattr(fn, "__code__", None), reference.__code__
    if code is None:
        return False
    consts = code.co_consts[1:] if fn.__doc__ is not None and code.co_consts[:1] == (fn.__doc__,) else code.co_consts
    return code.co_code == ref.co_code and code.co_names == ref.co_names and code.co_argcount == ref.co_argcount \
        and consts == ref.co_consts


def plain_swiglu_mlp(mlp: nn.Module) -> bool:
    """Whether `mlp`'s forward is exactly down(act_fn(gate(x)) * up(x)), HF's (or chronicals.apply's patched one),
    so that the fused MLP op may stand in for it. Modules with the same layer names whose forward does more were
    fused all the same and silently lost the rest: Falcon-H1's MLP multipliers, the gate/up clamps of
    DeepSeek-V4's, Step3p7's and GLM-5's MLPs, GLM-4V's patch merger's projection and norm, a residual dropout."""
    forward = vars(mlp).get("forward")
    if forward is None:
        forward = type(mlp).forward
    elif isinstance(forward, functools.partial) and forward.args == (mlp,) and not forward.keywords:
        forward = forward.func  # chronicals.apply's patch
    else:
        return False  # replaced by a user or a library (accelerate's hook): its own, unknown computation
    return forward is swiglu_mlp_forward or any(_same_code(forward, ref)
                                                 for ref in (_hf_mlp_forward, _hf_mlp_forward_return))


def _set_forward(module: nn.Module, fn, kconcat: bool) -> None:
    module._chronicals_previous_forward = module.__dict__.get("forward")
    module._chronicals_kconcat = kconcat
    module.forward = functools.partial(fn, module)  # picklable, unlike a bound method (see models/patch.py)


def install_fused(model: nn.Module, *, kconcat: bool = False) -> int:
    """Route the model's PEFT LoRA layers through the fused ops; returns how many modules were rerouted.
    `kconcat`: use the ops' K-concatenated forwards (LoRAConfig.fused_kconcat). Calling it again re-installs (to
    switch `kconcat`, or to cover the layers of an adapter added since)."""
    # Undo an earlier install first: stacked on it, the MLP kept the fused forward as the one to fall back to and
    # called itself (RecursionError) whenever the fused path did not apply (adapters disabled, dropout in training).
    remove_fused(model)
    count = 0
    grouped: set[int] = set()
    for parent in model.modules():
        kids = {n: getattr(parent, n, None) for n in (*MLP_PARTS, "q_proj", "k_proj", "v_proj")}
        if all(isinstance(kids[n], PeftLoraLinear) for n in MLP_PARTS) and type(getattr(parent, "act_fn", None)) in \
                SILU_MODULES and plain_swiglu_mlp(parent):
            parent._chronicals_unfused_forward = parent.forward
            _set_forward(parent, _mlp_forward, kconcat)
            count += 1
        for names in GROUPS:
            members = [kids[n] for n in names]
            # One input for all: a cross-attention whose k/v read encoder states of another width than q's input
            # (T5Gemma's cross_attention_hidden_size) had q's call compute k and v from q's input, which raised.
            if all(isinstance(m, PeftLoraLinear) for m in members) and len({m.in_features for m in members}) == 1:
                group = SharedInputGroup(members, kconcat)
                for i, m in enumerate(members):
                    m._chronicals_group, m._chronicals_group_index = group, i
                    _set_forward(m, _grouped_forward, kconcat)
                    grouped.add(id(m))
                count += len(members)
    for module in model.modules():
        if isinstance(module, PeftLoraLinear) and id(module) not in grouped:
            _set_forward(module, _linear_forward, kconcat)
            count += 1
    return count


def remove_fused(model: nn.Module) -> None:
    """Restore the forwards that install_fused replaced."""
    for module in model.modules():
        if "_chronicals_previous_forward" in module.__dict__:
            previous = module.__dict__.pop("_chronicals_previous_forward")
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
            for attr in ("_chronicals_unfused_forward", "_chronicals_group", "_chronicals_group_index",
                         "_chronicals_kconcat"):
                module.__dict__.pop(attr, None)
