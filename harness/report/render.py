"""`python -m harness report`: results files -> reports/figures, reports/tables and reports/REPORT.md.

Nothing is re-run: every number comes from the rows. Speed, memory and MFU figures use ok rows only; every other row
is listed in REPORT.md with its reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import document, figures, style, tables
from .rows import ResultsError, by_device, latest, load, scenario_file, scenarios

ROOT = Path(__file__).resolve().parents[2]
HEADINGS = {
    "throughput": "throughput (higher is better)",
    "memory": "peak memory (lower is better)",
    "mfu": "model FLOPs utilisation (higher is better)",
}
CAPTIONS = {
    "throughput": "Median real tokens/s per backend (whiskers: p20-p80; x: speedup over PyTorch/HF eager).",
    "memory": "Peak memory per backend: PyTorch allocator and whole process (NVML).",
    "mfu": "Model FLOPs utilisation against the datasheet peak and against the measured matmul ceiling.",
}


def render(results: list[Path], out: Path, scenario_dir: Path = ROOT / "scenarios") -> list[Path]:
    """Write every figure (PNG + SVG), its table and REPORT.md under `out`; return the files written."""
    rows = latest(by_device(load(results)))
    if not rows:
        raise ResultsError(f"{', '.join(map(str, results))}: no result rows; run `python -m harness bench` first")
    fig_dir, table_dir = out / "figures", out / "tables"
    written: list[Path] = []
    sections: list[document.Section] = []

    def emit(section: document.Section, name: str, fig, table: str | None, caption: str) -> None:
        if fig is not None:
            written.extend(style.save(fig, fig_dir, name))
        if table is not None:
            written.append(_write(table_dir / f"{name}.md", f"{caption}\n\n{table}"))
        if fig is not None or table is not None:
            section.items.append(document.Figure(name, caption, fig is not None, table))

    # Backends compared first, then the ablation and packing studies, each group in file order.
    special = {sc for sc in scenarios(rows) if figures.is_ablation(rows, sc) or figures.is_packing(rows, sc)}
    for sc in sorted(scenarios(rows), key=lambda sc: sc in special):
        section = document.Section(sc)
        for kind, metrics in figures.SPEED_MEMORY_PANELS.items():
            emit(section, f"{kind}_{sc}", figures.bars(rows, sc, metrics, HEADINGS[kind]),
                 tables.metrics_table(rows, sc, metrics), f"{sc}: {CAPTIONS[kind]}")
        if figures.is_ablation(rows, sc):
            emit(section, f"waterfall_{sc}", figures.ablation_waterfall(rows, sc), tables.ablation_table(rows, sc),
                 f"{sc}: Chronicals' tokens/s as each optimization is switched on; each step's measured gain.")
        if figures.is_packing(rows, sc):
            emit(section, f"packing_{sc}", figures.bars(rows, sc, ("packing_efficiency", "tokens_per_s"),
                                                   "padded against packed batches"),
                 tables.metrics_table(rows, sc, ("packing_efficiency", "tokens_per_s")),
                 f"{sc}: share of processed tokens that are real, and real tokens/s, padded against packed.")
        emit(section, f"loss_{sc}", figures.loss_curves(rows, sc), tables.loss_table(rows, sc),
             f"{sc}: every backend's loss per step over the reference's (below: difference).")
        if section.items:
            sections.append(section)

    headline = tables.headline_table(rows)
    if headline is not None:
        written.append(_write(table_dir / "headline.md", headline))
    overview = figures.speedup_overview(rows)
    if overview is not None:
        written.extend(style.save(overview, fig_dir, "speedup_overview"))
    failures = tables.failures_table(rows, _not_run(rows, scenario_dir))
    if failures is not None:
        written.append(_write(table_dir / "failures.md", failures))
    report = out / "REPORT.md"
    document.write(report, rows, _sources(results), sections, headline, overview is not None, failures, scenario_dir)
    return [*written, report]


def _not_run(rows, scenario_dir: Path) -> list[tuple[str, str, str]]:
    """Runs that a scenario file names but that left no row, in file order (scenario, variant, backend)."""
    from harness import scenario

    done = {r.run for r in rows}
    missing = []
    for name in scenarios(rows):
        path = scenario_file(rows, name, scenario_dir)
        if path is None:
            continue
        try:
            runs = scenario.load(path).runs
        except scenario.ScenarioError:  # edited since, or a checkpoint path gone: which runs it named is unknown
            continue
        # A bench run with --only (provenance "only") was not asked for the other backends: a run is missing only
        # when some bench of this scenario was asked for its backend (every backend, for one without --only).
        asked = [r.provenance.get("only") for r in rows if r.scenario == name]
        chosen = None if any(a is None for a in asked) else {b for a in asked for b in a}
        for run in runs:
            if (name, run.variant, run.backend) not in done and (chosen is None or run.backend in chosen):
                missing.append((name, run.variant, run.backend))
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness report", description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", type=Path, default=[ROOT / "reports" / "results"],
                   help="results JSONL files or folders of them (default: reports/results)")
    p.add_argument("--out", type=Path, default=ROOT / "reports",
                   help="where figures/, tables/ and REPORT.md go (default: reports)")
    p.add_argument("--scenarios", type=Path, default=ROOT / "scenarios",
                   help="scenario TOML folder whose settings the report quotes (default: scenarios)")
    args = p.parse_args(argv)
    try:
        written = render(args.results, args.out, args.scenarios)
    except ResultsError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"report: wrote {len(written)} files; open {args.out / 'REPORT.md'}")
    return 0


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _sources(results: list[Path]) -> list[Path]:
    files = []
    for path in map(Path, results):
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return [_relative(f) for f in files]


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


