"""Triton kernels, one op per file. Names resolve lazily, so importing the package stays cheap and
TRITON_INTERPRET can still be set by a caller before the first kernel module loads."""

from importlib import import_module

_EXPORTS = {
    "fused_rmsnorm": "rms_norm",
    "fused_add_rmsnorm": "rms_norm",
    "FusedRMSNorm": "rms_norm",
    "fused_swiglu": "swiglu",
    "fused_swiglu_mlp": "swiglu_mlp",
    "fused_qk_rope": "rope",
    "fused_linear_cross_entropy": "linear_cross_entropy",
    "fused_cross_entropy": "linear_cross_entropy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
