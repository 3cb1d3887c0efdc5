"""Markdown tables holding the numbers behind every figure, plus the failures list and the headline comparison."""

from __future__ import annotations

from . import style, units
from .figures import ablation_steps, is_ablation, is_packing, loss_series, reference_curve, reference_run
from .rows import Row, measured, variants


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def fmt(row: Row | None) -> str:
    """A measured value in the shown unit, with its p20-p80 range when the row has one."""
    if row is None:
        return "-"
    y = units.shown(row)
    text = _num(y)
    whisker = units.spread(row)
    if whisker and whisker[0] != whisker[1]:
        text += f" ({_num(whisker[0])}-{_num(whisker[1])})"
    return text


def metrics_table(rows: list[Row], scenario: str, metrics: tuple[str, ...]) -> str | None:
    """One line per (variant, backend): each metric as median (p20-p80); tokens/s also as a speedup over the
    reference. Runs that produced no number show their status."""
    present = [m for m in metrics if measured(rows, m, scenario)]
    if not present:
        return None
    got = {m: measured(rows, m, scenario) for m in present}
    in_scenario = [r for r in rows if r.scenario == scenario]
    header = ["variant", "backend"] + [f"{units.title(m)} [{units.unit(m)}]" for m in present]
    if "tokens_per_s" in present:
        header.append(f"speedup vs {style.REFERENCE_BACKEND}")
    body = []
    for v in variants(in_scenario):
        for b in style.backend_order(r.backend for r in in_scenario if r.variant == v):
            line = [v, b]
            if not any((scenario, v, b) in got[m] for m in present):
                status = next((r.status for r in in_scenario if r.variant == v and r.backend == b and not r.ok), None)
                if status is None:
                    continue  # this run only produced other metrics (e.g. loss), shown in their own table
                line += [status] * len(present)
            else:
                line += [fmt(got[m].get((scenario, v, b))) for m in present]
            if "tokens_per_s" in present:
                line.append(_speedup(got["tokens_per_s"], scenario, v, b))
            body.append(line)
    return markdown(header, body)


def ablation_table(rows: list[Row], scenario: str, backend: str = "chronicals") -> str | None:
    steps = ablation_steps(rows, scenario, backend)
    if not steps:
        return None
    first = steps[0][1].value
    body = [
        [
            v,
            ", ".join(sorted(added)) or "-",
            fmt(row),
            f"{delta:+,.0f}" if i else "-",
            f"{delta / steps[i - 1][1].value:+.1%}" if i else "-",
            f"x{row.value / first:.3f}",
        ]
        for i, (v, row, delta, added) in enumerate(steps)
    ]
    header = ["variant", "flags added", "tokens/s (p20-p80)", "gain [tokens/s]", "gain", "cumulative"]
    return markdown(header, body)


def loss_table(rows: list[Row], scenario: str) -> str | None:
    """Per curve: steps, first and last loss, and the largest distance from the reference curve."""
    curves = loss_series(rows, scenario)
    if not curves:
        return None
    # A diverged step's loss is written as null and has no point on the curve; left out here, a run whose loss went
    # nan would show only its finite steps and a small distance from the reference.
    nonfinite: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        if r.scenario == scenario and r.metric == "loss" and r.step is not None and r.value is None:
            nonfinite.setdefault((r.variant, r.backend), []).append(r.step)
    body = []
    for v in [v for v in variants([r for r in rows if r.scenario == scenario]) if v in curves]:
        ref_name, ref_points = reference_curve(curves, v)
        ref = dict(ref_points)
        for b in style.backend_order(curves[v]):
            points, failed = curves[v][b]
            bad = sorted(nonfinite.get((v, b), []))
            diffs = [(abs(x - ref[s]), s) for s, x in points if s in ref]
            is_ref = b == ref_name and points == ref_points
            worst = max(diffs) if diffs and not is_ref else None
            if bad:
                distance = f"non-finite loss at step {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            else:
                distance = "reference" if is_ref else (f"{worst[0]:.2e} (step {worst[1]})" if worst else "-")
            last = "non-finite" if bad and bad[-1] > points[-1][0] else f"{points[-1][1]:.5f}"
            body.append([
                v, b, str(len(points) + len(bad)), f"{points[0][1]:.5f}", last, distance,
                "failed verification" if failed else "ok",
            ])
    header = ["variant", "backend", "steps", "first loss", "last loss", "max abs diff vs reference", "status"]
    return markdown(header, body)


def failures_table(rows: list[Row], not_run: list[tuple[str, str, str]] = ()) -> str | None:
    """Every run that did not finish ok, once, with the reason the runner gave; then every run its scenario file
    names that left no row at all (`not_run`, as (scenario, variant, backend)): a bench stopped before it ended."""
    seen: dict[tuple, Row] = {}
    for r in rows:
        if not r.ok:
            seen.setdefault((*r.run, r.status, r.reason), r)
    body = [[r.scenario, r.variant, r.backend, r.status, r.reason or "(no reason recorded)"] for r in seen.values()]
    body += [[sc, v, b, "not run", "the scenario names this run but the results hold no row of it (the bench was "
              "stopped before it finished)"] for sc, v, b in not_run]
    if not body:
        return None
    return markdown(["scenario", "variant", "backend", "status", "reason"], body)


def headline_table(rows: list[Row]) -> str | None:
    """The README's results table: tokens/s and peak memory of every backend, per scenario and variant, and
    Chronicals' speedup over the reference and over the fastest other backend. Ablation and packing scenarios
    compare Chronicals with itself and have their own tables."""
    tps = measured(rows, "tokens_per_s")
    mem = measured(rows, "peak_mem_alloc_gib")
    special = {sc for sc, _, _ in tps if is_ablation(rows, sc) or is_packing(rows, sc)}
    runs = [k for k in tps if k[0] not in special]
    if not runs:
        return None
    compared = {(k[0], k[1]) for k in runs}
    # Every backend that ran in these scenarios has a column; one that produced no number shows its status.
    status = {r.run: r.status for r in rows if not r.ok and (r.scenario, r.variant) in compared}
    bs = style.backend_order({k[2] for k in runs} | {k[2] for k in status})
    body = []
    for sc, v in dict.fromkeys((k[0], k[1]) for k in runs):
        line = [sc, v]
        for b in bs:
            t, m = tps.get((sc, v, b)), mem.get((sc, v, b))
            if t is None:
                line.append(status.get((sc, v, b), "-"))
            else:
                line.append(f"{_num(t.value)} / {_num(m.value)}" if m else _num(t.value))
        mine = tps.get((sc, v, "chronicals"))
        others = [r.value for (s2, v2, b), r in tps.items() if (s2, v2) == (sc, v) and b != "chronicals"]
        line.append(_speedup(tps, sc, v, "chronicals"))
        line.append(f"x{mine.value / max(others):.2f}" if mine and others else "-")
        body.append(line)
    header = ["scenario", "variant"] + [f"{style.label(b)} [tok/s / GiB]" for b in bs]
    header += ["Chronicals vs PyTorch", "Chronicals vs fastest other verified"]
    return markdown(header, body)


def _speedup(tps: dict, scenario: str, variant: str, backend: str) -> str:
    ref, mine = reference_run(tps, scenario, variant), tps.get((scenario, variant, backend))
    return f"x{mine.value / ref.value:.2f}" if ref and mine else "-"


def _num(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"
