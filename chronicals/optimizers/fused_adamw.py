"""FusedAdamW: AdamW whose update runs as PyTorch's fused multi-tensor kernel wherever PyTorch has one."""

from __future__ import annotations

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def _param_list(params) -> list:
    """`params` as a list, each group dict copied with its "params" as a list: the device checks read the groups
    before torch.optim does, and a generator there (`{"params": model.parameters()}`) would be used up by the
    check, leaving torch.optim an empty group that trains nothing."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or parameter-group dicts (e.g. model.parameters()), "
                        "got a single tensor; wrap it in a list")
    out = []
    for p in params:
        if isinstance(p, dict) and "params" in p:
            group = p["params"]
            if isinstance(group, (set, frozenset)):  # torch.optim's own check, which the list below would bypass
                raise TypeError("a parameter group's params must be an ordered collection (a list), not a set: a "
                                "set's order changes between runs, and a saved optimizer state maps onto it by order")
            p = {**p, "params": [group] if isinstance(group, torch.Tensor) else list(group)}
        out.append(p)
    return out


def _tensors(params) -> list[torch.Tensor]:
    out = []
    for p in params:
        if isinstance(p, dict):
            out += _tensors(p["params"])
            continue
        t = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, tensor) pairs, at the top level or in a group
        if not isinstance(t, torch.Tensor):
            hint = "; pass model.parameters(), not the module" if isinstance(t, torch.nn.Module) else ""
            raise TypeError("optimizer params must be tensors, (name, tensor) pairs or parameter-group dicts, "
                            f"got a {type(t).__name__}{hint}")
        out.append(t)
    return out


def _dense(t: torch.Tensor) -> bool:
    """True when `t`'s elements fill numel() consecutive memory slots (in some dimension order), as PyTorch's fused
    AdamW assumes: it walks the raw memory of each parameter, grad and moment."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fused_available(params) -> bool:
    """True when every parameter is a dense floating tensor on one device type that has PyTorch's fused AdamW
    (a strided view such as `buffer[:, ::2]` is not dense: the fused kernel would write between its elements)."""
    return _why_not_fused(params) is None


def _why_not_fused(params) -> str | None:
    """Why PyTorch's fused AdamW cannot take `params` (the end of a sentence "... for parameters <this>"); None when
    it can."""
    tensors = _tensors(params)
    devices = sorted({t.device.type for t in tensors})
    others = sorted({str(t.dtype) for t in tensors if not torch.is_floating_point(t)})
    views = [tuple(t.stride()) for t in tensors if not _dense(t)]
    if others:
        return f"of dtype {others} (it takes floating-point ones)"
    if len(devices) != 1 or devices[0] not in _get_fused_kernels_supported_devices():
        return f"on {devices}"
    if views:
        return f"that are strided views (strides {views[0]}; it would write between their elements)"
    return None


def _has_tensor_hyper(group: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in (group.get("lr"), *group.get("betas", ())))


def _match_layout(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t` (p's grad or a moment of p) with p's strides: a copy where they differ."""
    if t.stride() == p.stride() or t.shape != p.shape:
        return t
    if not _dense(p):
        raise ValueError(f"FusedAdamW: a parameter of shape {tuple(p.shape)} is a strided view (strides "
                         f"{p.stride()}), which PyTorch's fused AdamW would update at the wrong memory; make the "
                         "optimizer with fused=False")
    return torch.empty_like(p, dtype=t.dtype).copy_(t)


def _check_saved_state(state_dict: dict, param_groups: list[dict]) -> None:
    """Refuse a saved state that is not AdamW's for these parameters, before torch.optim loads it: moments whose
    shapes differ from the parameters they map onto (by position, as torch.optim maps them: another model, or another
    parameter order), which the fused kernel read and wrote past (NaN weights, then "free(): invalid size"); or the
    state of another optimizer (bitsandbytes' 8-bit Adam keeps state1/state2), which failed the first step with
    KeyError: 'exp_avg'."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, param_groups)):
        return  # torch.optim says so
    params = {i: (n, j, p) for n, (s, g) in enumerate(zip(saved_groups, param_groups))
              for j, (i, p) in enumerate(zip(s["params"], g["params"]))}
    for index, state in state_dict.get("state", {}).items():
        if index not in params or not state:
            continue
        n, j, p = params[index]
        if not {"exp_avg", "exp_avg_sq"} <= set(state):
            raise ValueError(f"the optimizer state is not AdamW's: parameter {j} of group {n} holds "
                             f"{sorted(state)}, not exp_avg and exp_avg_sq (bitsandbytes' 8-bit Adam keeps state1 and "
                             "state2); load it into the optimizer it was saved from (use_8bit_optimizer as then)")
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(f"the optimizer state does not fit these parameters: its {key!r} for parameter {j} "
                                 f"of group {n} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}; it was "
                                 "saved for another model, or with the parameters in another order")


class FusedAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay). `fused=None` picks PyTorch's fused implementation when the parameters
    allow it (CUDA, and CPU in recent PyTorch) and the foreach implementation otherwise; `fused=True` insists."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 amsgrad: bool = False, *, maximize: bool = False, fused: bool | None = None):
        # amsgrad and maximize as torch.optim.AdamW takes them (the fused kernel has both): a drop-in replacement
        # failed with "unexpected keyword argument 'amsgrad'".
        params = _param_list(params)
        if not params:
            raise ValueError("FusedAdamW got no parameters; pass the model's trainable parameters")
        available = fused_available(params)
        if fused and not available:
            raise ValueError("FusedAdamW(fused=True): PyTorch has no fused AdamW for parameters "
                             f"{_why_not_fused(params)}; leave fused=None to fall back to the foreach implementation")
        use_fused = available if fused is None else fused
        # foreach takes no tensor lr or betas (torch.optim raises); with foreach=None torch.optim runs its
        # single-tensor loop for them, as torch.optim.AdamW does.
        tensor_hyper = _has_tensor_hyper({"lr": lr, "betas": betas}) or any(
            _has_tensor_hyper(g) for g in params if isinstance(g, dict))
        foreach = None if use_fused or tensor_hyper else True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, fused=True if use_fused else None, foreach=foreach)

    def add_param_group(self, param_group: dict) -> None:
        # A group added after construction takes the implementation chosen for the first parameters. A tensor lr or
        # betas there failed the first step under foreach ("lr as a Tensor is not supported for capturable=False and
        # foreach=True") where torch.optim.AdamW runs it, and parameters the fused kernel cannot take failed with
        # "`fused=True` requires ...", which the caller never asked for.
        if isinstance(param_group, dict) and "params" in param_group:
            param_group = _param_list([param_group])[0]
            if param_group.get("fused", self.defaults["fused"]) and not fused_available([param_group]):
                raise ValueError("FusedAdamW.add_param_group: this optimizer runs PyTorch's fused AdamW, chosen for "
                                 f"its first parameters, which has no kernel for parameters "
                                 f"{_why_not_fused([param_group])}; make the optimizer with fused=False to mix them")
            if "foreach" not in param_group and self.defaults["foreach"] and _has_tensor_hyper(param_group):
                param_group["foreach"] = None
        super().add_param_group(param_group)

    def _init_group(self, group, *args, **kwargs):
        # PyTorch's fused kernel walks a parameter's memory and its grad's in step: where their strides differ (a
        # grad assigned by hand, or made by torch.compile or by a size-1 dimension in a batched matmul) the CPU
        # kernel paired the wrong elements, silently, and the CUDA one raises "params, grads, exp_avgs, and
        # exp_avg_sqs must have same dtype, device, and layout". Such a grad is copied into the parameter's layout
        # here, where step collects the grads (after a closure has run; overriding step itself would run the step
        # hooks twice, torch.optim having wrapped Adam.step for them).
        if group["fused"]:
            for p in group["params"]:
                if p.grad is not None and p.grad.stride() != p.stride():
                    p.grad = _match_layout(p, p.grad)
        return super()._init_group(group, *args, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        # A saved group carries its optimizer's fused/foreach choice (torch.optim.AdamW saves fused=None), which
        # torch.optim would copy into ours: the fused kernel was dropped silently, and GradScaler, which hands a
        # fused optimizer its scale, then failed in the single-tensor loop. Keep the choice made for these
        # parameters (and so place each "step" where that implementation wants it).
        groups = [{**saved, "fused": ours["fused"], "foreach": ours["foreach"]}
                  for saved, ours in zip(state_dict["param_groups"], self.param_groups)]
        _check_saved_state(state_dict, self.param_groups)
        super().load_state_dict({**state_dict, "param_groups": groups + state_dict["param_groups"][len(groups):]})
        # A moment saved with other strides than the parameter has here (e.g. made contiguous by a checkpoint
        # tool, for a channels_last or transposed parameter) takes its layout, as step does for grads.
        for group in self.param_groups:
            if group["fused"]:
                for p in group["params"]:
                    state = self.state.get(p, {})
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor) and key != "step":
                            state[key] = _match_layout(p, value)
