"""`python -m harness gate`: the per-commit regression gate.

A results file passes when no run failed verification and
- GPU results: every run in the committed baseline for that GPU model (reports/baselines/<gpu-slug>.json) is still
  measured (not crashed, oom, ...), its tokens/s dropped by no more than the allowed share and its peak memory rose
  by no more than its share;
- CPU results (smoke-cpu): every loss curve in reports/golden/<scenario>.json is matched at the same steps.
Exit status: 0 pass, 1 regression, 2 refused (bad input, no baseline, another GPU model than the baseline's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.report.rows import ResultsError, Row, gpu_of, latest, load, measured, scenarios, slug

ROOT = Path(__file__).resolve().parents[1]
# A throughput drop beyond 7% is beyond run-to-run noise on an otherwise idle H200 (medians of >=20 timed steps).
# When a run's own p20-p80 spread is wider, the allowance widens to the two runs' spreads added, so a noisy
# measurement does not fail the gate by itself.
THROUGHPUT_DROP = 0.07
# Peak memory is nearly deterministic for a fixed shape; 7% still leaves room for allocator fragmentation.
MEMORY_RISE = 0.07
# CPU float32 losses repeat to ~1e-6 on the same torch build; 1e-4 catches any real change of the math.
LOSS_ATOL = 1e-4
LOSS_RTOL = 1e-4
# A run that computes the wrong thing fails the gate wherever it is. A run that crashed, ran out of memory or was
# unavailable fails it only when the baseline expects that run (a peer that cannot run a shape is a finding, not a
# regression), so it is compared as "missing" below.
WRONG = "failed-verification"
# The printed table lists speed and memory changes from this share up; smaller ones are counted only.
MOVED = 0.01
# metric -> +1 if higher is better, -1 if lower is better.
GATED = {"tokens_per_s": +1, "peak_mem_alloc_gib": -1, "peak_mem_nvml_gib": -1}


class Refused(ValueError):
    """The results cannot be compared (no baseline, another GPU model); the message says why and what to do."""


@dataclass(frozen=True)
class Check:
    run: str
    metric: str
    baseline: float | None
    current: float | None
    allowed: str
    passed: bool
    note: str = ""

    @property
    def change(self) -> str:
        if self.baseline is None or self.current is None:
            return "-"
        if self.metric == "loss":
            return f"{self.current - self.baseline:+.2e}"
        return f"{(self.current - self.baseline) / self.baseline:+.1%}" if self.baseline else "-"


@dataclass(frozen=True)
class Tolerances:
    throughput_drop: float = THROUGHPUT_DROP
    memory_rise: float = MEMORY_RISE
    loss_atol: float = LOSS_ATOL
    loss_rtol: float = LOSS_RTOL


def failed_verification(rows: list[Row]) -> list[Check]:
    """One failing check per run that failed verification."""
    seen: dict[tuple, Check] = {}
    for r in rows:
        if r.status == WRONG:
            seen.setdefault(r.run, Check(_name(*r.run), "status", None, None, "ok", False,
                                         f"{r.status}: {r.reason or 'no reason recorded'}"))
    return list(seen.values())


def unmeasured(rows: list[Row], expected: set[tuple[str, str, str]]) -> list[str]:
    """Notes for runs that did not finish (oom, crashed, ...) and that the reference does not expect either."""
    seen = {}
    for r in rows:
        if not r.ok and r.status != WRONG and r.run not in expected:
            seen.setdefault(r.run, f"{_name(*r.run)}: {r.status}: {r.reason or 'no reason recorded'} "
                                   "(not in the reference either, so not gated)")
    return list(seen.values())


def compare_gpu(rows: list[Row], baseline: dict, tol: Tolerances) -> list[Check]:
    checks: list[Check] = []
    for sc in scenarios(rows):
        if sc not in baseline["scenarios"]:
            raise Refused(f"the baseline for {baseline['gpu']} has no scenario '{sc}'; record one with "
                          f"`python -m harness gate --results <{sc}.jsonl> --update-baseline`")
        then = baseline["scenarios"][sc].get("provenance", {}).get("workload")
        now = _first(rows, sc).provenance.get("workload")
        if then and now and then != now:  # baselines recorded before provenance had "workload" are not checked
            changed = ", ".join(f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(then) | set(now))
                                if then.get(k) != now.get(k))
            raise Refused(f"scenario '{sc}' was measured with other settings than its baseline ({changed}); speeds "
                          "of different workloads are not comparable. If the change is intended, record a new "
                          f"baseline with `python -m harness gate --results <{sc}.jsonl> --update-baseline`")
        runs = baseline["scenarios"][sc]["runs"]
        got = {m: measured(rows, m, sc) for m in GATED}
        for variant, backends in runs.items():
            for backend, metrics in backends.items():
                for metric, base in metrics.items():
                    row = got[metric].get((sc, variant, backend))
                    checks.append(_compare(sc, variant, backend, metric, base, row, rows, tol))
        for metric, found in got.items():
            for (_, variant, backend), row in found.items():
                if metric not in runs.get(variant, {}).get(backend, {}):
                    checks.append(Check(_name(sc, variant, backend), metric, None, row.value, "-", True,
                                        "new: not in the baseline"))
    return checks


def compare_golden(rows: list[Row], golden: dict, tol: Tolerances) -> list[Check]:
    """Every golden loss curve, step by step: |loss - golden| <= atol + rtol * |golden|. One check per curve, on
    its worst step."""
    sc = golden["scenario"]
    current = _loss_curves([r for r in rows if r.scenario == sc])
    allowed = f"{tol.loss_atol:g} + {tol.loss_rtol:g}*|loss|"
    checks = []
    for variant, backends in golden["losses"].items():
        for backend, curve in backends.items():
            mine = current.get((variant, backend), {})
            missing = [s for s in curve if int(s) not in mine]
            extra = [str(s) for s in sorted(mine) if str(s) not in curve]
            if missing or extra:
                note = (f"steps {', '.join(missing)} missing{_status_note(rows, sc, variant, backend)}" if missing
                        else f"steps {', '.join(extra)} not in the golden curve (did the scenario change?)")
                checks.append(Check(_name(sc, variant, backend), "loss", None, None, allowed, False, note))
                continue
            worst = max(curve, key=lambda s: abs(mine[int(s)] - curve[s]) - tol.loss_rtol * abs(curve[s]))
            g, x = curve[worst], mine[int(worst)]
            ok = all(abs(mine[int(s)] - v) <= tol.loss_atol + tol.loss_rtol * abs(v) for s, v in curve.items())
            checks.append(Check(_name(sc, variant, backend), "loss", g, x, allowed, ok,
                                f"worst at step {worst} of {len(curve)}"))
    return checks


def make_baseline(rows: list[Row], gpu: str, previous: dict | None) -> dict:
    """The baseline for one GPU model: the gated metrics of every ok run, per scenario. Scenarios not in `rows`
    are kept from the previous baseline, so each scenario can be re-recorded on its own."""
    out = previous or {"gpu": gpu, "scenarios": {}}
    for sc in scenarios(rows):
        runs: dict = {}
        for metric in GATED:
            for (_, variant, backend), r in measured(rows, metric, sc).items():
                runs.setdefault(variant, {}).setdefault(backend, {})[metric] = {
                    "value": r.value, "p20": r.p20, "p80": r.p80}
        out["scenarios"][sc] = {"provenance": _first(rows, sc).provenance, "runs": runs}
    return out


def make_golden(rows: list[Row], scenario: str) -> dict:
    curves: dict = {}
    for (variant, backend), points in _loss_curves([r for r in rows if r.scenario == scenario]).items():
        curves.setdefault(variant, {})[backend] = {str(s): x for s, x in sorted(points.items())}
    if not curves:
        raise ResultsError(f"scenario '{scenario}' has no ok per-step loss rows to make golden values from")
    provenance = _first(rows, scenario).provenance
    return {"scenario": scenario, "provenance": provenance, "losses": curves,
            "scenario_sha256": _scenario_digest(provenance)}


def gate(results: list[Path], baseline_path: Path, golden_dir: Path, tol: Tolerances) -> tuple[list[Check], list[str]]:
    """All checks for the results, and notes worth printing (e.g. a torch version other than the golden's)."""
    rows = latest(load(results))
    gpu = gpu_of(rows, ", ".join(map(str, results)))
    checks, notes, expected = failed_verification(rows), [], set()
    if gpu is None:
        for sc in scenarios(rows):
            golden = _read(_golden_file(golden_dir, sc), "golden losses")
            notes += _version_notes(_first(rows, sc).provenance, golden["provenance"])
            digest = _scenario_digest(_first(rows, sc).provenance)
            if digest and golden.get("scenario_sha256") and digest != golden["scenario_sha256"]:
                notes.append(f"{_first(rows, sc).provenance['scenario_file']} changed since the golden losses were "
                             "recorded; if that change is intended, re-record them with --update-baseline")
            checks += compare_golden(rows, golden, tol)
            expected |= {(sc, v, b) for v, per in golden["losses"].items() for b in per}
    else:
        path = _baseline_file(baseline_path, gpu)
        baseline = _read(path, "baseline")
        if baseline["gpu"] != gpu:
            raise Refused(f"results were measured on {gpu} but {path} is the baseline for {baseline['gpu']}; "
                          "speeds of different GPU models are not comparable. Pass that GPU's baseline, or record "
                          "one with --update-baseline")
        checks += compare_gpu(rows, baseline, tol)
        expected |= {(sc, v, b) for sc, entry in baseline["scenarios"].items()
                     for v, per in entry["runs"].items() for b in per}
    return checks, notes + unmeasured(rows, expected)


def update(results: list[Path], baseline_path: Path, golden_dir: Path) -> list[Path]:
    """Write the baseline (GPU) or golden losses (CPU) from the ok runs of results where no run failed verification
    (runs that did not finish are left out of the reference, so they are not expected later)."""
    rows = latest(load(results))
    gpu = gpu_of(rows, ", ".join(map(str, results)))
    broken = failed_verification(rows)
    if broken:
        raise Refused("results with a run that failed verification cannot become the reference: "
                      + "; ".join(f"{c.run}: {c.note}" for c in broken))
    if gpu is None:
        written = []
        for sc in scenarios(rows):
            written.append(_write(_golden_file(golden_dir, sc), make_golden(rows, sc)))
        return written
    path = baseline_path / f"{slug(gpu)}.json" if baseline_path.is_dir() or not baseline_path.suffix else baseline_path
    previous = _read(path, "baseline") if path.is_file() else None
    if previous is not None and previous["gpu"] != gpu:
        raise Refused(f"{path} is the baseline for {previous['gpu']}, not {gpu}; write to another file")
    return [_write(path, make_baseline(rows, gpu, previous))]


def table(checks: list[Check], everything: bool = False) -> str:
    """What moved, failures first: run, metric, baseline, current, change, allowed, verdict. Speed and memory checks
    that moved less than 1% are only counted, unless `everything`."""
    shown = [c for c in checks if everything or _moved(c)]
    header = ("run", "metric", "baseline", "current", "change", "allowed", "verdict", "note")
    body = [(c.run, c.metric, _num(c.baseline), _num(c.current), c.change, c.allowed,
             "PASS" if c.passed else "FAIL", c.note) for c in sorted(shown, key=lambda c: c.passed)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(shown) < len(checks):
        lines.append(f"({len(checks) - len(shown)} checks moved less than {MOVED:.0%} and passed; --all lists them)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness gate", description=__doc__.splitlines()[0],
                                epilog="Exit status: 0 pass, 1 regression, 2 refused.")
    p.add_argument("--results", nargs="+", type=Path, required=True, help="results JSONL files (or folders)")
    p.add_argument("--baseline", type=Path, default=ROOT / "reports" / "baselines",
                   help="baseline file, or folder holding <gpu-slug>.json (default: reports/baselines)")
    p.add_argument("--golden", type=Path, default=ROOT / "reports" / "golden",
                   help="folder of <scenario>.json golden CPU losses (default: reports/golden)")
    p.add_argument("--throughput-drop", type=_share, default=THROUGHPUT_DROP,
                   help="allowed tokens/s drop, a share (0.07 for 7%%)")
    p.add_argument("--memory-rise", type=_share, default=MEMORY_RISE,
                   help="allowed peak memory rise, a share (0.07 for 7%%)")
    p.add_argument("--loss-atol", type=_tolerance, default=LOSS_ATOL, help="allowed absolute loss difference")
    p.add_argument("--loss-rtol", type=_tolerance, default=LOSS_RTOL, help="allowed relative loss difference")
    p.add_argument("--all", action="store_true", help="list every check, not only those that moved")
    p.add_argument("--update-baseline", action="store_true",
                   help="write the baseline (GPU) or golden losses (CPU) from these results instead of gating")
    args = p.parse_args(argv)
    try:
        if args.update_baseline:
            for path in update(args.results, args.baseline, args.golden):
                print(f"gate: wrote {path}")
            return 0
        tol = Tolerances(args.throughput_drop, args.memory_rise, args.loss_atol, args.loss_rtol)
        checks, notes = gate(args.results, args.baseline, args.golden, tol)
    except (ResultsError, Refused) as e:
        print(f"gate: refused: {e}", file=sys.stderr)
        return 2
    print(table(checks, args.all))
    for note in notes:
        print(f"note: {note}")
    failures = [c for c in checks if not c.passed]
    print(f"gate: {'FAIL' if failures else 'PASS'} ({len(failures)} of {len(checks)} checks failed)")
    return 1 if failures else 0


def _tolerance(text: str) -> float:
    """A finite, non-negative number: nan would fail every check and a negative one every unchanged run."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return x


def _share(text: str) -> float:
    """A share of the baseline below 1: '7' meant as 7% would allow a 700% change, and the gate could never fail."""
    x = _tolerance(text)
    if x >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is a share of the baseline, below 1 (0.07 for 7%)")
    return x


def _compare(sc, variant, backend, metric, base: dict, row: Row | None, rows, tol: Tolerances) -> Check:
    name = _name(sc, variant, backend)
    if row is None:
        return Check(name, metric, base["value"], None, "-", False,
                     f"missing: in the baseline, not measured now{_status_note(rows, sc, variant, backend)}")
    share = tol.throughput_drop if GATED[metric] > 0 else tol.memory_rise
    noise = _spread(base) + _spread({"value": row.value, "p20": row.p20, "p80": row.p80})
    allowed = max(share, noise)
    change = (row.value - base["value"]) / base["value"]
    passed = change >= -allowed if GATED[metric] > 0 else change <= allowed
    word = "drop" if GATED[metric] > 0 else "rise"
    return Check(name, metric, base["value"], row.value, f"{word} <= {allowed:.1%}", passed,
                 "widened by run noise" if noise > share else "")


def _moved(c: Check) -> bool:
    if not c.passed or c.note or c.metric == "loss" or c.baseline is None or c.current is None:
        return True
    return abs(c.current - c.baseline) >= MOVED * abs(c.baseline)


def _spread(m: dict) -> float:
    """A run's p20-p80 width as a share of its median (0 when not recorded)."""
    if m.get("p20") is None or m.get("p80") is None or not m["value"]:
        return 0.0
    return (m["p80"] - m["p20"]) / m["value"]


def _loss_curves(rows: list[Row]) -> dict[tuple[str, str], dict[int, float]]:
    curves: dict = {}
    for r in rows:
        if r.ok and r.metric == "loss" and r.step is not None:
            curves.setdefault((r.variant, r.backend), {})[r.step] = r.value
    return curves


def _status_note(rows, sc, variant, backend) -> str:
    r = next((r for r in rows if r.run == (sc, variant, backend) and not r.ok), None)
    return f" ({r.status}: {r.reason})" if r else ""


def _scenario_digest(provenance: dict) -> str | None:
    """SHA-256 of the scenario file the runner recorded, when it is here: a changed file explains changed losses."""
    name = provenance.get("scenario_file")
    path = Path(name) if name else None
    if path is not None and not path.is_absolute():
        path = ROOT / path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def _version_notes(now: dict, then: dict) -> list[str]:
    a, b = now.get("versions") or {}, then.get("versions") or {}
    return [f"golden losses were made with {k} {b[k]}, these results with {k} {a[k]}; if only that moved the "
            "losses, re-record them with --update-baseline" for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def _baseline_file(path: Path, gpu: str) -> Path:
    if path.is_file():
        return path
    candidate = path / f"{slug(gpu)}.json"
    if not candidate.is_file():
        others = sorted(p.name for p in path.glob("*.json")) if path.is_dir() else []
        raise Refused(f"no baseline for GPU model {gpu} at {candidate} (baselines here: "
                      f"{', '.join(others) or 'none'}); numbers from another GPU model are not comparable. "
                      "Record one with --update-baseline")
    return candidate


def _golden_file(folder: Path, scenario: str) -> Path:
    return folder / f"{scenario}.json"


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise Refused(f"no {what} at {path}; record it with "
                      "`python -m harness gate --results <results.jsonl> --update-baseline`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise Refused(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                      "re-record it with --update-baseline") from None
    need = ("scenario", "provenance", "losses") if what == "golden losses" else ("gpu", "scenarios")
    lacking = [k for k in need if k not in data]
    if lacking:
        raise Refused(f"{path}: {what} file lacks {', '.join(lacking)}; re-record it with --update-baseline")
    return data


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _first(rows: list[Row], scenario: str) -> Row:
    return next(r for r in rows if r.scenario == scenario)


def _name(scenario: str, variant: str, backend: str) -> str:
    return f"{scenario}/{variant}/{backend}"


def _num(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.1f}" if abs(x) >= 100 else f"{x:.6g}")
