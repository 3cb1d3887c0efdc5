"""The table printed at the end of a bench: one line per run, speed only for verified runs."""

from __future__ import annotations

from .runner import Outcome


def table(outcomes: list[Outcome]) -> str:
    header = ("backend", "variant", "status", "tokens/s (p20-p80)", "step ms", "TFLOP/s", "MFU meas.", "peak GiB",
              "reason")
    lines = [header]
    for o in outcomes:
        s = o.speed
        peak = next((r["value"] for r in o.rows if r["metric"] == "peak_mem_alloc_gib"), None)
        lines.append((
            o.run.backend, o.run.variant, o.status,
            _spread(s["tokens_per_s"]) if s else "-",
            f"{s['step_time_ms'].median:.1f}" if s else "-",
            f"{s['tflops'].median:.1f}" if s else "-",
            f"{100 * s['mfu_measured'].median:.1f}%" if "mfu_measured" in s else "-",
            f"{peak:.2f}" if peak is not None else "-",
            (o.reason[:77] + "...") if len(o.reason) > 80 else o.reason,
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _spread(x) -> str:
    return f"{x.median:,.0f} ({x.p20:,.0f}-{x.p80:,.0f})"
