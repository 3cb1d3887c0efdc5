"""`python -m harness bench --scenario scenarios/NAME.toml [--out FILE.jsonl]`: run a scenario's matrix, append its
rows to the results file and print a summary table. Exits non-zero on a missing or invalid scenario (the message
names the file and the field), and says plainly when a GPU scenario is run on a machine without one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import scenario as scenarios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness bench", description=__doc__)
    p.add_argument("--scenario", required=True, help="a scenario TOML file, e.g. scenarios/smoke-cpu.toml")
    p.add_argument("--out", help="results JSONL to append to (default: reports/results/<scenario name>.jsonl)")
    args = p.parse_args(argv)
    try:
        sc = scenarios.load(args.scenario)
    except scenarios.ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sc.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"error: scenario {sc.path} runs on device = \"cuda\", but this machine has no usable CUDA GPU "
                  "(torch.cuda.is_available() is False). Run it on a GPU host, or run a CPU scenario such as "
                  "scenarios/smoke-cpu.toml.", file=sys.stderr)
            return 2
    out = Path(args.out or f"reports/results/{sc.name}.jsonl")
    from .runner import run_scenario
    from .summary import table

    outcomes = run_scenario(sc, out, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                            logs_dir=out.parent / f"{out.stem}-logs")
    print(f"\n{sc.name}: {len(outcomes)} runs, rows appended to {out}")
    print(table(outcomes))
    return 0
