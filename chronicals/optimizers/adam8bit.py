"""Adam8bit: bitsandbytes' 8-bit AdamW (block-wise quantized moments), GPU only."""

from __future__ import annotations

import torch

from .fused_adamw import _param_list, _tensors


class Adam8bit:
    """8-bit Adam with decoupled weight decay: constructing it returns a `bitsandbytes.optim.AdamW8bit`
    (a torch.optim.Optimizer), so it saves, loads and steps as that class does. It needs bitsandbytes and a
    CUDA GPU holding the parameters; otherwise it raises a clear error instead of failing inside a kernel."""

    def __new__(cls, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        params = _param_list(params)
        if not torch.cuda.is_available():
            raise RuntimeError("Adam8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizers run there); "
                               "use optimizer 'adamw_fused' on this machine")
        off_gpu = sorted({t.device.type for t in _tensors(params) if t.device.type != "cuda"})
        if off_gpu:
            raise ValueError(f"Adam8bit: parameters on {off_gpu}; move the model to CUDA before making the optimizer")
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("Adam8bit needs bitsandbytes: pip install 'bitsandbytes>=0.43' "
                              "(or pip install 'chronicals[gpu]')") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
