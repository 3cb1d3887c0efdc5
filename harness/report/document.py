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

from .rows import Row, scenarios
from .tables import markdown

METHOD = """\
- **One loop for every backend.** A backend only builds the model and names the parameters to train; the data, the
  optimizer, the training loop and the timing belong to the harness (`harness/loop.py`), so all backends do the same
  work per step.
- **Tokens counted.** Only label tokens that are neither padding nor `ignore_index` (-100) count: tokens/s is real
  training tokens per second, so padding never inflates a number (this is what separates padded from packed runs).
- **FLOP convention.** 6N FLOPs per counted token for full fine-tuning and 4N for LoRA (frozen weights get no weight
  gradient), N = parameters in the matmuls, plus causal attention (half of the full score and value matmuls);
  recomputation (activation checkpointing) is not counted. MFU is stated twice: against the GPU's datasheet dense
  BF16 peak and against a matmul ceiling measured on the same GPU in the same session.
- **Timing.** CUDA events around each optimizer step. Warm-up steps are excluded (they include `torch.compile` and
  Triton autotuning, which can take minutes); every number is the median of the timed steps, with the 20th and 80th
  percentiles as the range (whiskers in the figures, parentheses in the tables).
- **Memory.** Peak allocated by PyTorch's caching allocator (`peak_mem_alloc_gib`) and peak of the whole process as
  NVML sees it (`peak_mem_nvml_gib`, includes the allocator's cache, CUDA context and workspaces).
- **Verification before speed.** Each run's gradients, weight update and loss are checked against the reference; a
  run that fails is drawn in no speed or memory figure and is listed under *Failed and unavailable runs* with its
  reason. Loss curves of failed runs are still drawn (dashed) so the divergence can be seen.
- **Repeated runs.** When a results file holds the same run twice, the later rows (the newer run) are used.
"""


@dataclass
class Section:
    title: str
    figures: list[tuple[str, str]] = field(default_factory=list)  # (relative path of the PNG, caption)
    tables: list[tuple[str, str]] = field(default_factory=list)  # (caption, Markdown table)


def write(path: Path, rows: list[Row], sources: list[Path], sections: list[Section], headline: str | None,
          failures: str | None, scenario_dir: Path) -> None:
    parts = ["# Chronicals on one GPU: throughput, memory and correctness against its peers\n"]
    parts.append(
        "Rendered by `nox -s report` from the results files below, without re-running anything. "
        "Tables of every figure's numbers are also written under `tables/`.\n\n"
        + "".join(f"- `{s}`\n" for s in sources)
    )
    if headline:
        parts.append("## Headline\n\nMedian real tokens/s and peak allocated memory per backend; speedups are ratios "
                     "of tokens/s on the same scenario and variant.\n\n" + headline)
    parts.append("## Method\n\n" + METHOD)
    parts.append("### Hardware and software\n\n" + _provenance(rows))
    settings = _scenario_settings(scenarios(rows), scenario_dir)
    if settings:
        parts.append("### Scenario settings\n\nTop-level settings of each scenario file (warm-up and timed steps, "
                     "batch shape, model).\n\n" + settings)
    parts.append("## Results\n")
    for s in sections:
        parts.append(f"### {s.title}\n")
        for png, caption in s.figures:
            parts.append(f"![{caption}]({png})\n\n*{caption}* (SVG: `{Path(png).with_suffix('.svg')}`)\n")
        for caption, table in s.tables:
            parts.append(f"{caption}\n\n{table}")
    parts.append("## Failed and unavailable runs\n\n"
                 + (failures or "Every run finished and passed verification.\n"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")


def _provenance(rows: list[Row]) -> str:
    """One line per scenario: device, commit, time span and versions, as the runner recorded them."""
    body = []
    for sc in scenarios(rows):
        prov = [r.provenance for r in rows if r.scenario == sc]
        first = prov[0]
        times = sorted(str(p["time"]) for p in prov if p.get("time"))
        versions = first.get("versions")
        version_text = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else "-"
        other = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("gpu", "commit", "time", "versions"))
        body.append([
            sc, str(first.get("gpu") or "cpu"), str(first.get("commit", "-")),
            f"{times[0]} .. {times[-1]}" if times else "-", version_text, other or "-",
        ])
    return markdown(["scenario", "device", "commit", "time", "versions", "other"], body)


def _scenario_settings(names: list[str], scenario_dir: Path) -> str | None:
    body = []
    for name in names:
        path = scenario_dir / f"{name}.toml"
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            data = tomllib.load(f)
        scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
        body.append([name, ", ".join(f"{k}={v}" for k, v in scalars.items()) or "(all settings are per run)"])
    return markdown(["scenario", "settings"], body) if body else None
