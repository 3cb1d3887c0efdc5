"""Result rows (docs/CONTRACTS.md, "Harness results"): read JSONL files, check every row, select what a figure needs.

Shared by the report and the gate, so both read results the same way and reject bad files with the same message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

STATUSES = ("ok", "failed-verification", "unavailable", "oom", "crashed", "timeout")
REQUIRED = ("scenario", "backend", "status", "provenance")
# A results file from a run without a GPU names its device with one of these.
CPU_NAMES = (None, "", "none", "cpu")
# A row whose variant is empty belongs to the scenario's only configuration.
DEFAULT_VARIANT = "default"


class ResultsError(ValueError):
    """A results file that does not follow the row contract; the message names the file, line and field."""


@dataclass(frozen=True)
class Row:
    scenario: str
    backend: str
    variant: str
    status: str
    reason: str
    metric: str | None
    value: float | None
    unit: str
    p20: float | None
    p80: float | None
    step: int | None
    flags: dict | list | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def run(self) -> tuple[str, str, str]:
        """The run a row belongs to: (scenario, variant, backend)."""
        return (self.scenario, self.variant, self.backend)

    @property
    def gpu(self) -> str | None:
        """The GPU model the row was measured on, or None for a CPU run."""
        name = self.provenance.get("gpu")
        return None if name in CPU_NAMES or str(name).lower() in CPU_NAMES else str(name)

    def enabled_flags(self) -> frozenset[str]:
        """The optimizations switched on for this run, from `flags` as a {name: bool} map or a list of names."""
        if isinstance(self.flags, dict):
            return frozenset(k for k, v in self.flags.items() if v)
        return frozenset(self.flags or ())


def load(paths: list[Path] | Path) -> list[Row]:
    """Every row of the given JSONL files (or of every *.jsonl file in a given folder), in file order."""
    rows: list[Row] = []
    for path in _expand(paths):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(_parse(line, f"{path}:{lineno}"))
    return rows


def latest(rows: list[Row]) -> list[Row]:
    """The newest measurement of every run. The runner appends, so a scenario run twice leaves both in the file: of
    each (scenario, variant, backend), only the rows of its newest `provenance.run_id` are kept (a run that crashed the
    second time must not keep the first time's speed), then one row per (metric, step), the last.

    Newest is by `provenance.time`, not by where the rows sit: several files may be given in any order (or a folder
    whose names sort differently from when they were written). Runs with equal times, and rows written without a
    time, keep file order: the run with the latest time wins, unless a run without one comes after it in file order."""
    newest = {run: _newest_run_id(groups) for run, groups in _run_groups(rows).items()}
    keep: dict[tuple, Row] = {}
    for row in rows:
        if row.provenance.get("run_id") == newest[row.run]:
            keep[(*row.run, row.metric, row.step)] = row
    return list(keep.values())


def by_device(rows: list[Row]) -> list[Row]:
    """Rows of one scenario measured on several devices (a results file appended to on an H200, then on an H100 by
    `bench --only`) split into one scenario per device: `latest` keeps the newest run per backend, so a scenario's
    runs could come from different GPUs and their speedups compare one GPU with another, while the report named one
    device. The device of the scenario's newest row keeps the name; the others' rows become `<scenario>@<gpu-slug>`
    (`cpu` for a CPU run), each compared within itself."""
    newest: dict[str, tuple] = {}
    for position, r in enumerate(rows):
        key = (_time(r.provenance.get("time")) or datetime.min.replace(tzinfo=timezone.utc), position)
        if r.scenario not in newest or key >= newest[r.scenario][0]:
            newest[r.scenario] = (key, r.gpu)
    return [r if r.gpu == newest[r.scenario][1] else replace(r, scenario=f"{r.scenario}@{slug(r.gpu or 'cpu')}")
            for r in rows]


def _run_groups(rows: list[Row]) -> dict[tuple[str, str, str], dict]:
    """Per run (scenario, variant, backend): {run_id: [position of its last row, its latest time or None]}."""
    groups: dict[tuple[str, str, str], dict] = {}
    for position, row in enumerate(rows):
        group = groups.setdefault(row.run, {}).setdefault(row.provenance.get("run_id"), [position, None])
        group[0] = position
        when = _time(row.provenance.get("time"))
        if when is not None and (group[1] is None or when > group[1]):
            group[1] = when
    return groups


def _newest_run_id(groups: dict) -> str | None:
    """The run_id with the latest time (ties: the later in file order), replaced by a run_id without a time that
    comes after it in file order (those are compared by file order only, as before times were recorded)."""
    timed = [(when, position, run_id) for run_id, (position, when) in groups.items() if when is not None]
    candidates = [(position, run_id) for run_id, (position, when) in groups.items() if when is None]
    if timed:
        _, position, run_id = max(timed, key=lambda t: (t[0], t[1]))
        candidates.append((position, run_id))
    return max(candidates, key=lambda c: c[0])[1]


def _time(value) -> datetime | None:
    """`provenance.time` (ISO 8601; UTC when it names no zone) as an aware datetime; None when missing or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def scenarios(rows: list[Row]) -> list[str]:
    """Scenario names in order of first appearance."""
    return list(dict.fromkeys(r.scenario for r in rows))


def scenario_file(rows: list[Row], name: str, scenario_dir: Path) -> Path | None:
    """Scenario `name`'s TOML: the file the runner recorded in the provenance when it is here, else
    <scenario_dir>/<name>.toml; None when neither exists."""
    recorded = next(r.provenance.get("scenario_file") for r in rows if r.scenario == name)
    return next((p for p in (Path(recorded or ""), scenario_dir / f"{name}.toml") if p.is_file()), None)


def variants(rows: list[Row]) -> list[str]:
    """Variant names in order of first appearance (the order the scenario lists them)."""
    return list(dict.fromkeys(r.variant for r in rows))


def measured(rows: list[Row], metric: str, scenario: str | None = None) -> dict[tuple[str, str, str], Row]:
    """The ok, scalar (not per-step) rows of one metric, keyed by run (scenario, variant, backend)."""
    return {
        r.run: r
        for r in rows
        if r.ok and r.metric == metric and r.step is None and (scenario is None or r.scenario == scenario)
    }


def gpu_of(rows: list[Row], source: str) -> str | None:
    """The one GPU model all rows were measured on (None: CPU); a file mixing devices cannot be compared as a whole."""
    gpus = {r.gpu for r in rows}
    if len(gpus) > 1:
        names = ", ".join(sorted(str(g or "cpu") for g in gpus))
        raise ResultsError(f"{source}: rows come from several devices ({names}); gate one device's results at a time")
    if not gpus:
        raise ResultsError(f"{source}: no result rows; run a scenario first (python -m harness bench ...)")
    return gpus.pop()


def slug(gpu: str) -> str:
    """File-name form of a GPU model: 'NVIDIA H200' -> 'nvidia-h200'."""
    return "-".join("".join(c if c.isalnum() else " " for c in gpu.lower()).split())


def _expand(paths: list[Path] | Path) -> list[Path]:
    files: list[Path] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if path.is_dir():
            files.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise ResultsError(f"{path}: no such results file or folder; give a JSONL file written by "
                               "`python -m harness bench`")
    return files


def _parse(line: str, where: str) -> Row:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{where}: not a JSON object ({e.msg}); each line must be one result row") from None
    if not isinstance(raw, dict):
        raise ResultsError(f"{where}: not a JSON object; each line must be one result row")
    for name in REQUIRED:
        if raw.get(name) in (None, ""):
            raise ResultsError(f"{where}: field '{name}' is missing; every row needs {', '.join(REQUIRED)}")
    if raw["status"] not in STATUSES:
        raise ResultsError(f"{where}: field 'status' is {raw['status']!r}; expected one of {', '.join(STATUSES)}")
    if not isinstance(raw["provenance"], dict):
        raise ResultsError(f"{where}: field 'provenance' must be an object with gpu, versions, commit, time")
    if raw["status"] == "ok":
        if not raw.get("metric"):
            raise ResultsError(f"{where}: an ok row needs field 'metric' (e.g. tokens_per_s)")
        if not _is_number(raw.get("value")):
            raise ResultsError(f"{where}: field 'value' is {raw.get('value')!r}; an ok row needs a finite number")
    step = raw.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise ResultsError(f"{where}: field 'step' is {step!r}; expected an integer step or null")
    return Row(
        scenario=str(raw["scenario"]),
        backend=str(raw["backend"]),
        variant=str(raw.get("variant") or DEFAULT_VARIANT),
        status=raw["status"],
        reason=str(raw.get("reason") or ""),
        metric=raw.get("metric"),
        # A failed run's value is kept only when it is a number (a diverged loss curve is still worth plotting).
        value=_number(raw.get("value"), "value", where) if raw["status"] == "ok" else _finite_or_none(raw.get("value")),
        unit=str(raw.get("unit") or ""),
        p20=_number(raw.get("p20"), "p20", where),
        p80=_number(raw.get("p80"), "p80", where),
        step=step,
        flags=raw.get("flags"),
        provenance=raw["provenance"],
    )


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite_or_none(x) -> float | None:
    return float(x) if _is_number(x) else None


def _number(x, name: str, where: str) -> float | None:
    if x is None:
        return None
    if not _is_number(x):
        raise ResultsError(f"{where}: field '{name}' is {x!r}; expected a finite number or null")
    return float(x)
