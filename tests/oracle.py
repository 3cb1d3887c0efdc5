"""The numerical oracle for fused kernels.

A kernel in dtype D is judged against a float64 ground truth; its error may be no larger than what
PyTorch's own native-dtype computation of the same function makes against that ground truth, plus a
small stated slack. Relative error is ||out - ref|| / ||ref|| over the whole tensor (METHOD.md).
"""

from __future__ import annotations

import torch

# Slack on top of native PyTorch's own error, per dtype of the inputs. It absorbs differences in
# summation order (a Triton reduction sums in a different order than ATen), not algorithmic error.
SLACK = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0.0 else diff / denom


def assert_no_worse(name: str, out: torch.Tensor, native: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                    factor: float = 1.0, slack: float | None = None) -> None:
    """Kernel output `out` must be as close to `ref64` as the native-dtype `native` is (times factor), plus slack."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    e_out = rel_err(out, ref64)
    e_nat = rel_err(native, ref64)
    bound = factor * e_nat + (SLACK[dtype] if slack is None else slack)
    assert e_out <= bound, f"{name}: rel err {e_out:.3e} > bound {bound:.3e} (native {dtype} error {e_nat:.3e})"
