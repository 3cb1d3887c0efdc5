"""Triton kernels, one op per file. Names resolve lazily, so importing the package stays cheap and
TRITON_INTERPRET can still be set by a caller before the first kernel module loads."""

from importlib import import_module

_EXPORTS = {
    "fused_rmsnorm": "rms_norm",
    "fused_add_rmsnorm": "rms_norm",
    "fused_rmsnorm_residual": "rms_norm",
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
        # Kept as a module global once resolved: the patched forwards import these names on every call, and each
        # miss ran this hook and import_module (148 times in one forward of Qwen2.5-0.5B, ~1 ms of host time under
        # cProfile on the H100 host, where the whole forward's host time was 42 ms).
        value = globals()[name] = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
