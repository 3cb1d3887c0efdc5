"""REPORT.md: a paper-style write-up that states the method, embeds the figures with their tables, and lists every run
that failed or was unavailable. Text only; the figures and tables are made by the caller and passed in."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from .figures import is_ablation, is_packing, reference_run
from .rows import Row, measured, scenario_file, scenarios
from .style import label
from .tables import markdown

METHOD = """\
- **One loop for every backend.** A backend only builds the model and names the parameters to train; the data, the
  optimizer, the training loop and the timing belong to the harness (`harness/loop.py`), and each run is its own
  subprocess from the same initial weights and batches, so all backends do the same work per step.
- **Tokens counted.** A token counts when it is a loss term: a label after the causal shift that is neither padding
  nor `ignore_index` (-100). Tokens/s is real training tokens per second, counted by the harness from the data, so
  padding never inflates a number (this is what separates padded from packed runs).
- **FLOP convention** (`harness/metrics.py`). Model FLOPs per step, recomputation never counted. N = parameters of
  every linear layer, `lm_head` included: 6N per token the model runs on (every position of a sequence of L
  tokens, L in all: one more per sequence than the L - 1 tokens counted above) for full fine-tuning; for LoRA 4N for
  the frozen weights (no weight gradient) plus 6 N_lora for the adapters. Attention adds 6 L^2 H_q d_head per layer and
  sequence of L tokens (QK^T and PV, halved for the causal mask, training = 3x forward); padding is not counted.
  MFU is stated twice: against the GPU's datasheet dense BF16 peak (989 TFLOP/s for an H200) and against a bf16
  matmul ceiling measured on the same GPU at the start of the same scenario run.
- **Timing.** CUDA events around each optimizer step (wall clock on CPU). The first `train.warmup` steps are left
  out (they include `torch.compile` and Triton autotuning); every number is the median of the timed steps, with the
  20th and 80th percentiles as the range (whiskers in the figures, parentheses in the tables).
- **Memory.** Peak allocated by PyTorch's caching allocator (`peak_mem_alloc_gib`) and peak of the whole process as
  NVML sees it (`peak_mem_nvml_gib`: includes the allocator's cache, the CUDA context and workspaces).
- **Verification before speed.** Every run's per-step loss and gradient norm are checked against the reference
  run's (`verify.loss_rtol`, `verify.grad_norm_rtol` of the scenario), its weights must have changed, and its loss
  on the first batch, evaluated again after training, must have fallen at least `verify.min_learnt_fraction` as far
  as the reference's did. A run that fails is drawn in no speed or memory figure and is listed under *Failed and
  unavailable runs* with its reason.
  Loss curves of failed runs are still drawn (dashed) so the divergence can be seen.
- **Repeated runs.** When a results file holds the same run twice, only the newer run's rows are used. A scenario
  measured on several GPUs is reported once per GPU (the newest GPU's under its name, the others' as
  `<scenario>@<gpu>`): no speedup compares one GPU with another.
"""


@dataclass
class Figure:
    name: str  # file stem under figures/ and tables/
    caption: str
    drawn: bool  # False when only the table has something to show
    table: str | None


@dataclass
class Section:
    title: str
    items: list[Figure] = field(default_factory=list)


def write(path: Path, rows: list[Row], sources: list[Path], sections: list[Section], headline: str | None,
          overview: bool, failures: str | None, scenario_dir: Path) -> None:
    parts = ["# Chronicals on one GPU: throughput, memory and correctness against its peers\n"]
    parts.append(
        "Rendered by `nox -s report` from the results files below, without re-running anything. "
        "Tables of every figure's numbers are also written under `tables/`.\n\n"
        + "".join(f"- `{s}`\n" for s in sources)
    )
    if headline:
        parts.append("## Headline\n\nMedian real tokens/s and peak allocated memory per backend; speedups are ratios "
                     "of tokens/s on the same scenario and variant.\n\n" + headline)
        parts.append("".join(f"- {line}\n" for line in findings(rows)))
    if overview:
        parts.append("![Speedup over PyTorch/HF eager](figures/speedup_overview.png)\n\n*Every backend's median "
                     "tokens/s over PyTorch/HF eager's on the same scenario; runs that failed verification or did not "
                     "finish have no bar.* (SVG: `figures/speedup_overview.svg`)\n")
    parts.append("## Method\n\n" + METHOD)
    parts.append("### Hardware and software\n\n" + _provenance(rows))
    settings = _scenario_settings(rows, scenario_dir)
    if settings:
        parts.append("### Scenario settings\n\nAs in each `scenarios/<name>.toml`: model, batch shape, steps and "
                     "`train.warmup` (the warm-up steps left out of every speed number); a run made with "
                     "`bench --quick` records fewer steps than the file's `train.steps`, as the second column shows."
                     "\n\n" + settings)
    parts.append("## Results\n")
    for s in sections:
        parts.append(f"### {s.title}\n")
        for item in s.items:
            if item.drawn:
                parts.append(f"![{item.caption}](figures/{item.name}.png)\n\n"
                             f"*{item.caption}* (SVG: `figures/{item.name}.svg`)\n")
            else:
                parts.append(f"*{item.caption}*\n")
            if item.table:
                parts.append(f"{item.table}\n(`tables/{item.name}.md`)\n")
    parts.append("## Failed and unavailable runs\n\n"
                 + (failures or "Every run finished and passed verification.\n"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")


def findings(rows: list[Row]) -> list[str]:
    """One sentence per compared scenario and variant: Chronicals' speed and memory against the reference and the
    fastest other backend, in numbers from the rows."""
    tps, mem = measured(rows, "tokens_per_s"), measured(rows, "peak_mem_alloc_gib")
    out = []
    for sc, v, b in tps:
        if b != "chronicals" or is_ablation(rows, sc) or is_packing(rows, sc):
            continue
        mine = tps[(sc, v, b)]
        text = f"**{sc}** ({v}): Chronicals {mine.value:,.0f} tokens/s"
        ref = reference_run(tps, sc, v)
        if ref is not None:
            text += f", x{mine.value / ref.value:.2f} {label(ref.backend)}"
        others = [r for (s2, v2, b2), r in tps.items() if (s2, v2) == (sc, v) and b2 != b]
        if others:
            best = max(others, key=lambda r: r.value)
            text += f" and x{mine.value / best.value:.2f} the fastest other verified backend ({label(best.backend)})"
        m, m_ref = mem.get((sc, v, b)), mem.get((sc, v, ref.backend)) if ref is not None else None
        if m is not None and m_ref is not None:
            text += f"; peak memory {m.value:.1f} GiB against {m_ref.value:.1f} GiB"
        out.append(text + ".")
    return out


def _provenance(rows: list[Row]) -> str:
    """One line per scenario: device, measured matmul ceiling, commit, time span and versions, as recorded."""
    body = []
    for sc in scenarios(rows):
        prov = [r.provenance for r in rows if r.scenario == sc]
        first = prov[0]
        times = sorted(str(p["time"]) for p in prov if p.get("time"))
        versions = first.get("versions")
        # Packages that were not installed are recorded as null; the report names only what was there.
        version_text = (", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
                        if isinstance(versions, dict) else "-")
        other = ", ".join(f"{k}={v}" for k, v in first.items()
                          if k not in ("gpu", "commit", "time", "versions", "run_id") and v is not None)
        ceiling = next((r.value for r in rows if r.scenario == sc and r.ok and r.metric == "matmul_ceiling_tflops"),
                       None)
        if isinstance(versions, dict):
            version_text += _differing_versions([r for r in rows if r.scenario == sc], versions)
        body.append([
            sc, str(first.get("gpu") or "cpu"), f"{ceiling:.0f}" if ceiling else "-",
            _commits([r for r in rows if r.scenario == sc]), f"{times[0]} .. {times[-1]}" if times else "-",
            version_text, other or "-",
        ])
    return markdown(["scenario", "device", "matmul ceiling [TFLOP/s]", "commit", "time", "versions", "other"], body)


def _backends_by(rows: list[Row], value) -> dict[str, list[str]]:
    """{str(value(row)): the backends (labels, each once, in row order) of the rows with that value}."""
    by: dict[str, list[str]] = {}
    for r in rows:
        names = by.setdefault(str(value(r)), [])
        if label(r.backend) not in names:
            names.append(label(r.backend))
    return by


def _commits(rows: list[Row]) -> str:
    """The commit the scenario's runs were made at; when they were made at several (a bench re-run with --only), each
    commit with the backends measured there. The first row's alone named one commit for runs of three."""
    by = _backends_by(rows, lambda r: r.provenance.get("commit") or "not recorded")
    if len(by) == 1:
        return next(iter(by))
    return "; ".join(f"{c} ({', '.join(names)})" for c, names in by.items())


def _differing_versions(rows: list[Row], first: dict) -> str:
    """Packages whose recorded version differs between the scenario's runs, each other version with its backends."""
    notes = []
    for package in first:
        version = lambda r, p=package: (r.provenance.get("versions") or {}).get(p)  # noqa: E731
        other = _backends_by([r for r in rows if version(r) != first[package]], version)
        notes += [f"{package} {v} ({', '.join(names)})" for v, names in other.items()]
    return f"; other versions: {', '.join(notes)}" if notes else ""


def _scenario_settings(rows: list[Row], scenario_dir: Path) -> str | None:
    """The settings of each scenario's file (`rows.scenario_file` says which file that is)."""
    body = []
    for name in scenarios(rows):
        path = scenario_file(rows, name, scenario_dir)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError:  # edited since the run; the settings it ran with are unknown
            continue
        body.append([name, _steps_recorded(rows, name), ", ".join(_settings(data))])
    return markdown(["scenario", "steps recorded per run", "settings"], body) if body else None


def _steps_recorded(rows: list[Row], scenario: str) -> str:
    """Steps each run actually logged (warm-up included): fewer than the file's train.steps after `bench --quick`."""
    steps = [r.step for r in rows if r.scenario == scenario and r.metric == "loss" and r.step is not None]
    return str(max(steps) + 1) if steps else "-"


def _settings(data: dict, prefix: str = "") -> list[str]:
    """`key=value` for scalars and lists of scalars, tables flattened as `table.key`; the per-backend [[variants]]
    are left out (their names and flags are in the rows and the tables above)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict):
            out += _settings(v, f"{prefix}{k}.")
        elif isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
            out.append(f"{prefix}{k}=[{', '.join(map(str, v))}]")
        elif not isinstance(v, list):
            out.append(f"{prefix}{k}={v}")
    return out
