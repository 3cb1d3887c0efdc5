"""When a patched module runs a Triton kernel and when it falls back to plain PyTorch.

The kernels need a CUDA tensor (or TRITON_INTERPRET=1, set before import, which runs them on CPU for
testing) in float32, bfloat16 or float16. Anywhere else (a CPU without the interpreter, a machine without
Triton, a float64 model) the patched modules compute the same math as Hugging Face in plain PyTorch, so a
patched model still runs and gives the same numbers; only the speed-up is lost.
"""

from __future__ import annotations

import importlib.util

import torch

from chronicals.kernels._utils import INTERPRET, SUPPORTED_DTYPES

# Known once at import: a plain bool is also what torch.compile can read without tracing a cached function.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def kernels_usable(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on tensor `t` (a float64 model, say, keeps PyTorch's math)."""
    return (t.is_cuda or INTERPRET) and t.dtype in SUPPORTED_DTYPES and TRITON_INSTALLED
