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


def fused_available(params) -> bool:
    """True when every parameter is a floating tensor on one device type that has PyTorch's fused AdamW."""
    tensors = _tensors(params)
    types = {t.device.type for t in tensors}
    return (
        len(types) == 1
        and types <= set(_get_fused_kernels_supported_devices())
        and all(torch.is_floating_point(t) for t in tensors)
    )


class FusedAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay). `fused=None` picks PyTorch's fused implementation when the parameters
    allow it (CUDA, and CPU in recent PyTorch) and the foreach implementation otherwise; `fused=True` insists."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 *, fused: bool | None = None):
        params = _param_list(params)
        if not params:
            raise ValueError("FusedAdamW got no parameters; pass the model's trainable parameters")
        available = fused_available(params)
        if fused and not available:
            tensors = _tensors(params)
            devices = sorted({t.device.type for t in tensors})
            others = sorted({str(t.dtype) for t in tensors if not torch.is_floating_point(t)})
            what = f"of dtype {others} (it takes floating-point ones)" if others else f"on {devices}"
            raise ValueError(f"FusedAdamW(fused=True): PyTorch has no fused AdamW for parameters {what}; "
                             "leave fused=None to fall back to the foreach implementation")
        use_fused = available if fused is None else fused
        # foreach takes no tensor lr or betas (torch.optim raises); with foreach=None torch.optim runs its
        # single-tensor loop for them, as torch.optim.AdamW does.
        hyper = [lr, *betas] + [v for g in params if isinstance(g, dict) for v in (g.get("lr"), *g.get("betas", ()))]
        foreach = None if use_fused or any(isinstance(v, torch.Tensor) for v in hyper) else True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         fused=True if use_fused else None, foreach=foreach)

    def load_state_dict(self, state_dict: dict) -> None:
        # A saved group carries its optimizer's fused/foreach choice (torch.optim.AdamW saves fused=None), which
        # torch.optim would copy into ours: the fused kernel was dropped silently, and GradScaler, which hands a
        # fused optimizer its scale, then failed in the single-tensor loop. Keep the choice made for these
        # parameters (and so place each "step" where that implementation wants it).
        groups = [{**saved, "fused": ours["fused"], "foreach": ours["foreach"]}
                  for saved, ours in zip(state_dict["param_groups"], self.param_groups)]
        super().load_state_dict({**state_dict, "param_groups": groups + state_dict["param_groups"][len(groups):]})
