"""Result rows (docs/CONTRACTS.md, "Harness results"): JSONL, one row per (scenario, backend, variant, metric[, step]),
appended and flushed to disk the moment a run ends, so a crash later in the matrix loses nothing. A run that
produced no measurement (unavailable, crashed, timed out) gets one row with metric null carrying its status and
reason."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .scenario import Run

FIELDS = ("scenario", "backend", "variant", "flags", "status", "reason", "metric", "value", "unit", "p20", "p80",
          "step", "provenance")


def row(scenario: str, run: Run, status: str, reason: str, provenance: dict, metric: str | None = None,
        value: float | None = None, unit: str = "", p20: float | None = None, p80: float | None = None,
        step: int | None = None) -> dict:
    """A contract row; a non-finite value (a diverged loss) is written as null, as JSON has no NaN."""
    value, p20, p80 = (_finite(x) for x in (value, p20, p80))
    return {"scenario": scenario, "backend": run.backend, "variant": run.variant, "flags": dict(run.flags),
            "status": status, "reason": reason, "metric": metric, "value": value, "unit": unit, "p20": p20,
            "p80": p80, "step": step, "provenance": provenance}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def append(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A line cut short (a process killed mid-write) must not swallow the next row: start on a line of our own.
    torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    # One write of the run's rows, not one per row: a signal between rows left part of a run on disk, which --resume
    # then took for a finished run.
    text = ("\n" if torn else "") + "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class Reference(NamedTuple):
    """What a run is checked against: the reference run's per-step loss and grad_norm ({metric: {step: value}}), its
    trainable parameter count and its loss on the first batch after training (None when not recorded)."""

    curves: dict[str, dict[int, float]]
    params: int | None
    first_batch_after: float | None


def reference_run(path: str | Path, scenario: str, run_id: str, run: Run) -> Reference | None:
    """The reference run's results, read back from the results file (rows of this scenario run, `run_id` in their
    provenance); None when that run did not pass its own verification."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "grad_norm": {}}
    scalars: dict[str, float] = {}
    for r in _scenario_rows(path, scenario):
        if not (r.get("backend") == run.backend and r.get("variant") == run.variant
                and r.get("provenance", {}).get("run_id") == run_id and r.get("status") == "ok"):
            continue
        if r.get("metric") in curves and r.get("step") is not None:
            curves[r["metric"]][r["step"]] = r["value"]
        elif r.get("metric") in ("trainable_params", "first_batch_loss_after"):
            scalars[r["metric"]] = r["value"]
    if not curves["loss"]:
        return None
    params = scalars.get("trainable_params")
    return Reference(curves, None if params is None else int(params), scalars.get("first_batch_loss_after"))


class Recorded(NamedTuple):
    """The latest bench of a scenario in a results file: its provenance (run_id, commit, steps, ...) and the
    (backend, variant) runs it recorded."""

    provenance: dict
    runs: set[tuple[str, str]]


def latest_bench(path: str | Path, scenario: str) -> Recorded | None:
    """The last bench of `scenario` in the results file (the run_id of its last row), or None when it has none."""
    rows = [r for r in _scenario_rows(path, scenario) if r.get("provenance", {}).get("run_id")]
    if not rows:
        return None
    provenance = rows[-1]["provenance"]
    runs = {(r["backend"], r["variant"]) for r in rows if r["provenance"]["run_id"] == provenance["run_id"]}
    return Recorded(provenance, runs)


def _scenario_rows(path: str | Path, scenario: str) -> Iterator[dict]:
    """The rows of `scenario` in the results file, in file order (none when there is no file)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a blank or torn line: the run that wrote it never finished
                continue
            if isinstance(r, dict) and r.get("scenario") == scenario:
                yield r
