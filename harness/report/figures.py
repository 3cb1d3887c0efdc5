"""The report's figures, each drawn from result rows alone. Every function returns a matplotlib Figure, or None when
the rows hold nothing for it (a scenario that was not run), so the caller can skip it."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import style, units
from .rows import DEFAULT_VARIANT, Row, measured, variants

SPEED_MEMORY_PANELS = {
    "throughput": ("tokens_per_s",),
    "memory": ("peak_mem_alloc_gib", "peak_mem_nvml_gib"),
    "mfu": ("mfu_datasheet", "mfu_measured"),
}


def bars(rows: list[Row], scenario: str, metrics: tuple[str, ...], heading: str):
    """One panel per metric present: bars per backend, grouped by variant, with p20-p80 whiskers and values on top.
    Each group has a slot for every backend that has a run in that variant; a run that did not produce a number
    shows its status (oom, crashed, ...) in its slot."""
    panels = [m for m in metrics if measured(rows, m, scenario)]
    if not panels:
        return None
    in_scenario = [r for r in rows if r.scenario == scenario]
    vs = variants(in_scenario)
    all_bs = style.backend_order(r.backend for r in in_scenario)
    slots = {v: style.backend_order(r.backend for r in in_scenario if r.variant == v) for v in vs}
    widest = max(len(b) for b in slots.values())
    width = 0.8 / widest
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(4.5, 1.1 + 0.45 * sum(map(len, slots.values()))) * len(panels), 3.8),
        squeeze=False,
    )
    for ax, metric in zip(axes[0], panels):
        got = measured(rows, metric, scenario)
        for j, v in enumerate(vs):
            ref = reference_run(got, scenario, v)
            for i, b in enumerate(slots[v]):
                x = j + (i - (len(slots[v]) - 1) / 2) * width
                row = got.get((scenario, v, b))
                if row is None:
                    _mark_missing(ax, x, in_scenario, v, b)
                else:
                    _bar(ax, x, width, row, style.colour(b, all_bs), ref)
        ax.set_xticks(range(len(vs)), vs, rotation=15 if len(vs) > 3 else 0)
        ax.set_ylabel(units.axis_label(metric))
        ax.set_title(units.title(metric))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the value labels
    _legend(fig, all_bs)
    fig.suptitle(f"{scenario}: {heading}", fontsize=11)
    return fig


def speedup_overview(rows: list[Row]):
    """The headline in one picture: every backend's tokens/s over the reference's, per compared scenario (ablation
    and packing scenarios compare Chronicals with itself and are left to their own figures)."""
    tps = measured(rows, "tokens_per_s")
    groups = [(sc, v) for sc, v in dict.fromkeys((k[0], k[1]) for k in tps)
              if not (is_ablation(rows, sc) or is_packing(rows, sc)) and reference_run(tps, sc, v) is not None]
    if not groups:
        return None
    shown = [r for r in rows if (r.scenario, r.variant) in groups]
    bs = style.backend_order(r.backend for r in shown)
    width = 0.8 / len(bs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.5 * len(bs) * len(groups)), 3.8))
    for j, (sc, v) in enumerate(groups):
        ref = reference_run(tps, sc, v)
        for i, b in enumerate(bs):
            row, x = tps.get((sc, v, b)), j + (i - (len(bs) - 1) / 2) * width
            if row is None:
                _mark_missing(ax, x, [r for r in shown if r.scenario == sc], v, b)
            else:
                y = row.value / ref.value
                ax.bar(x, y, width, color=style.colour(b, bs))
                ax.annotate(f"x{y:.2f}", (x, y), xytext=(0, 2), textcoords="offset points", ha="center",
                            fontsize=7)
    ax.axhline(1.0, color=style.colour(style.REFERENCE_BACKEND), lw=1, ls="--")
    ax.set_xticks(range(len(groups)), [sc if v == DEFAULT_VARIANT else f"{sc}\n{v}" for sc, v in groups])
    ax.set_ylabel(f"Speedup over {style.label(style.REFERENCE_BACKEND)} (x, tokens/s ratio)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax.set_title("Throughput relative to PyTorch/HF eager (verified runs; others show their status)")
    _legend(fig, bs)
    return fig


def reference_run(found: dict, scenario: str, variant: str):
    """What a run is compared with: the reference backend's run in the same variant, or, when the reference ran
    only once in the scenario (variants that belong to one backend, as in the ablation), that one run."""
    same = found.get((scenario, variant, style.REFERENCE_BACKEND))
    if same is not None:
        return same
    theirs = [r for (sc, _, b), r in found.items() if sc == scenario and b == style.REFERENCE_BACKEND]
    return theirs[0] if len(theirs) == 1 else None


def ablation_waterfall(rows: list[Row], scenario: str, backend: str = "chronicals"):
    """Chronicals' tokens/s as its optimizations are switched on one at a time: the first bar is the variant with the
    fewest flags on, each next bar floats from the previous total and is labelled with its measured gain."""
    steps = ablation_steps(rows, scenario, backend)
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * (len(steps) + 1)), 4.2))
    colour = style.colour(backend)
    first = steps[0][1]
    ax.bar(0, first.value, 0.6, color=colour, alpha=0.55)
    ax.annotate(style.short_number(first.value), (0, first.value), xytext=(0, 2), textcoords="offset points",
                ha="center", fontsize=7)
    for i, (_, row, delta, _) in enumerate(steps[1:], 1):
        before = steps[i - 1][1].value
        ax.bar(i, delta, 0.6, bottom=before, color=style.GAIN if delta >= 0 else style.LOSS)
        ax.annotate(f"{delta:+,.0f}\n({delta / before:+.1%})", (i, max(before, row.value)), xytext=(0, 2),
                    textcoords="offset points", ha="center", fontsize=7)
        ax.plot([i - 1.3, i + 0.3], [before, before], color="black", lw=0.6, ls=":")
    last = steps[-1][1]
    n = len(steps)
    ax.bar(n, last.value, 0.6, color=colour)
    ax.annotate(f"{style.short_number(last.value)}\n(x{last.value / first.value:.2f})", (n, last.value),
                xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    reference = measured(rows, "tokens_per_s", scenario)
    ref = next((r for k, r in reference.items() if k[2] == style.REFERENCE_BACKEND), None)
    if ref is not None:
        ax.axhline(ref.value, color=style.colour(ref.backend), ls="--", lw=1,
                   label=f"{style.label(ref.backend)}: {style.short_number(ref.value)}")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ticks = [f"{steps[0][0]}\n(start)"] + [_step_name(v, a) for v, _, _, a in steps[1:]]
    ax.set_xticks(range(n + 1), ticks + [f"total\n({steps[-1][0]})"], fontsize=7)
    ax.set_ylabel(units.axis_label("tokens_per_s"))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax.set_title(f"{scenario}: {style.label(backend)} tokens/s, one optimization added per step")
    return fig


def _step_name(variant: str, added: frozenset[str]) -> str:
    """The variant's name, followed by the flags it adds unless the name already says them."""
    if all(flag in variant for flag in added) and added:
        return variant
    return f"{variant}\n(+{', '.join(sorted(added)) or 'no new flag'})"


def is_ablation(rows: list[Row], scenario: str, backend: str = "chronicals") -> bool:
    """A scenario runs an ablation when the backend has measured variants with different sets of flags on."""
    runs = [r for k, r in measured(rows, "tokens_per_s", scenario).items() if k[2] == backend]
    return len({r.enabled_flags() for r in runs}) > 1


def is_packing(rows: list[Row], scenario: str) -> bool:
    """A scenario compares batch layouts when its runs trained the same data with different shares of padding (a
    packed run has none). Every run on variable-length data records packing_efficiency, so its presence alone would
    take a backend comparison on varlen or text data (every run padded) for a packing study."""
    return len({round(r.value, 9) for r in measured(rows, "packing_efficiency", scenario).values()}) > 1


def ablation_steps(rows: list[Row], scenario: str, backend: str = "chronicals"):
    """[(variant, row, gain over the previous step in tokens/s, flags added)] ordered by how many flags are on
    (ties in the order the scenario lists them)."""
    got = [r for k, r in measured(rows, "tokens_per_s", scenario).items() if k[2] == backend]
    order = {v: i for i, v in enumerate(variants([r for r in rows if r.scenario == scenario]))}
    got.sort(key=lambda r: (len(r.enabled_flags()), order[r.variant]))
    steps = []
    for i, row in enumerate(got):
        prev = got[i - 1] if i else None
        delta = row.value - prev.value if prev else 0.0
        added = row.enabled_flags() - prev.enabled_flags() if prev else row.enabled_flags()
        steps.append((row.variant, row, delta, added))
    return steps


def loss_curves(rows: list[Row], scenario: str, columns: int = 4):
    """Per variant: every backend's loss per step drawn over the reference's, and below it the difference from the
    reference. Curves that failed verification are drawn dashed, so a divergence is visible rather than hidden."""
    curves = loss_series(rows, scenario)
    if not curves:
        return None
    order = variants([r for r in rows if r.scenario == scenario])
    # A variant holding only the reference's own curve is skipped when it is drawn in every other panel anyway.
    vs = [v for v in order if v in curves and (set(curves[v]) != {style.REFERENCE_BACKEND} or len(curves) == 1)]
    all_bs = style.backend_order({b for per in curves.values() for b in per})
    ncols, nrows = min(columns, len(vs)), -(-len(vs) // columns)
    fig = plt.figure(figsize=(4.6 * ncols, 5.2 * nrows))
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3, 1.4] * nrows)
    for k, v in enumerate(vs):
        r, col = divmod(k, columns)
        top = fig.add_subplot(grid[2 * r, col])
        bottom = fig.add_subplot(grid[2 * r + 1, col], sharex=top)
        ref_name, ref_points = reference_curve(curves, v)
        ref = dict(ref_points)
        drawn = [(ref_name, (ref_points, False))] + [(b, c) for b, c in curves[v].items() if b != ref_name]
        for b, (points, failed) in drawn:
            steps, losses = zip(*points)
            is_ref = b == ref_name
            kw = dict(color=style.colour(b, all_bs), ls="--" if failed else "-", lw=2.6 if is_ref else 1.3,
                      alpha=0.6 if is_ref else 0.95, zorder=1 if is_ref else 2)
            top.plot(steps, losses, **kw)
            common = [(s, x - ref[s]) for s, x in points if s in ref]
            if common and not is_ref:
                bottom.plot(*zip(*common), **kw)
        bottom.axhline(0, color=style.colour(ref_name, all_bs), lw=1)
        top.set_title(f"{v} (reference: {style.label(ref_name)})")
        top.set_ylabel(units.axis_label("loss"))
        bottom.set_ylabel("loss - reference")
        bottom.set_xlabel("optimizer step")
        top.grid(True, axis="both", alpha=0.3)
        bottom.grid(True, axis="both", alpha=0.3)
    _legend(fig, all_bs, dashed_note=any(f for per in curves.values() for _, f in per.values()))
    fig.suptitle(f"{scenario}: loss curves against the reference", fontsize=11)
    return fig


def loss_series(rows: list[Row], scenario: str) -> dict[str, dict[str, tuple[list[tuple[int, float]], bool]]]:
    """{variant: {backend: ([(step, loss)] by step, failed verification?)}} from per-step loss rows with a value."""
    out: dict[str, dict[str, tuple[list, bool]]] = {}
    for r in rows:
        if r.scenario == scenario and r.metric == "loss" and r.step is not None and r.value is not None:
            if r.status in ("ok", "failed-verification"):
                points, failed = out.setdefault(r.variant, {}).get(r.backend, ([], False))
                points.append((r.step, r.value))
                out[r.variant][r.backend] = (points, failed or r.status != "ok")
    for per_backend in out.values():
        for points, _ in per_backend.values():
            points.sort()
    return out


def reference_curve(curves: dict, variant: str) -> tuple[str, list[tuple[int, float]]]:
    """(backend, points) a variant's curves are compared with: the reference backend's curve in the same variant, or
    its only curve in the scenario; failing both, the first backend of the variant in the fixed order."""
    ref = style.REFERENCE_BACKEND
    if ref in curves[variant]:
        return ref, curves[variant][ref][0]
    theirs = [per[ref][0] for per in curves.values() if ref in per]
    if len(theirs) == 1:
        return ref, theirs[0]
    first = style.backend_order(curves[variant])[0]
    return first, curves[variant][first][0]


def _bar(ax, x, width, row: Row, colour: str, ref: Row | None) -> None:
    y = units.shown(row)
    whisker = units.spread(row)
    err = [[max(0.0, y - whisker[0])], [max(0.0, whisker[1] - y)]] if whisker else None
    ax.bar(x, y, width, color=colour, yerr=err, capsize=2, error_kw={"lw": 0.8})
    text = style.short_number(y) + ("%" if units.unit(row.metric) == "%" else "")
    if row.metric == "tokens_per_s" and ref is not None and ref is not row:
        text += f"\nx{row.value / ref.value:.2f}"
    top = whisker[1] if whisker else y
    ax.annotate(text, (x, max(y, top)), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                fontsize=6.5)


def _mark_missing(ax, x, rows: list[Row], variant: str, backend: str) -> None:
    status = next((r.status for r in rows if r.variant == variant and r.backend == backend and not r.ok), None)
    if status is not None:
        ax.annotate(status, (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    rotation=90, fontsize=7, color="#888888")


def _legend(fig, backends, dashed_note: bool = False) -> None:
    # Below the panels, outside them, so it never covers a bar or a curve; saving with a tight box keeps it.
    handles = [Patch(color=style.colour(b, backends), label=style.label(b)) for b in backends]
    if dashed_note:
        handles.append(Line2D([], [], color="black", ls="--", label="failed verification"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False, fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
