"""What each metric is called in figures and tables, and its value in the unit shown there."""

from __future__ import annotations

from .rows import Row

# metric -> (title, short name for an axis, unit shown). Ratios are shown in percent.
METRICS = {
    "tokens_per_s": ("Throughput in real tokens (non-padding labels)", "Throughput", "tokens/s"),
    "step_time_ms": ("Step time (median)", "Step time", "ms"),
    "peak_mem_alloc_gib": ("Peak memory, PyTorch allocator", "Peak allocated", "GiB"),
    "peak_mem_nvml_gib": ("Peak memory, whole process (NVML)", "Peak process memory", "GiB"),
    "tflops": ("Achieved model TFLOP/s", "Model FLOP rate", "TFLOP/s"),
    "mfu_datasheet": ("MFU vs datasheet peak", "MFU", "%"),
    "mfu_measured": ("MFU vs measured matmul ceiling", "MFU", "%"),
    "matmul_ceiling_tflops": ("Measured matmul ceiling", "Matmul ceiling", "TFLOP/s"),
    "packing_efficiency": ("Packing efficiency (real / processed tokens)", "Packing efficiency", "%"),
    "loss": ("Training loss (cross-entropy)", "Loss", "nats/token"),
    "grad_norm": ("Gradient norm", "Gradient norm", ""),
}
# Rows may state a ratio as a fraction (0.41) or in percent (41.0); their `unit` says which.
PERCENT_UNITS = ("%", "percent", "pct")


def title(metric: str) -> str:
    return METRICS.get(metric, (metric,))[0]


def unit(metric: str, row: Row | None = None) -> str:
    if metric in METRICS:
        return METRICS[metric][2]
    return row.unit if row is not None else ""


def axis_label(metric: str) -> str:
    name, u = METRICS.get(metric, (metric, metric))[1], unit(metric)
    return f"{name} ({u})" if u else name


def shown(row: Row, x: float | None = None) -> float | None:
    """`x` (default: the row's value) in the unit the report shows for the row's metric."""
    x = row.value if x is None else x
    if x is None:
        return None
    if unit(row.metric or "") == "%" and row.unit.lower() not in PERCENT_UNITS:
        return 100.0 * x
    return x


def spread(row: Row) -> tuple[float, float] | None:
    """(p20, p80) in the shown unit, when the row has them."""
    if row.p20 is None or row.p80 is None:
        return None
    return shown(row, row.p20), shown(row, row.p80)
