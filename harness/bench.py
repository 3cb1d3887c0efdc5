"""`python -m harness bench --scenario scenarios/NAME.toml [--out FILE.jsonl]`: run a scenario's matrix, append its
rows to the results file and print a summary table. Exits non-zero on a missing or invalid scenario (the message
names the file and the field), and says plainly when a GPU scenario is run on a machine without one."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

from . import scenario as scenarios

QUICK_TIMED = 5


def narrowed(sc: scenarios.Scenario, only: list[str] | None, quick: bool) -> scenarios.Scenario:
    """The scenario restricted to some backends (reference kept) and/or to fewer steps."""
    if only:
        known = {r.backend for r in sc.runs}
        for b in only:
            if b not in known:
                raise scenarios.ScenarioError(f"--only names backend {b!r}, which {sc.path} does not run; its "
                                              f"backends: {', '.join(sorted(known))}")
        sc = dataclasses.replace(sc, runs=tuple(r for r in sc.runs if r.backend in {*only, sc.reference}))
    if quick:
        steps = min(sc.train.steps, sc.train.warmup + QUICK_TIMED)
        sc = dataclasses.replace(sc, train=dataclasses.replace(sc.train, steps=steps))
    return sc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness bench", description=__doc__)
    p.add_argument("--scenario", required=True, help="a scenario TOML file, e.g. scenarios/smoke-cpu.toml")
    p.add_argument("--out", help="results JSONL to append to, or a folder for <scenario name>.jsonl "
                                 "(default: reports/results/<scenario name>.jsonl)")
    p.add_argument("--only", help="comma-separated backends to run (the reference always runs: the others are "
                                  "verified against it)")
    p.add_argument("--quick", action="store_true", help=f"at most warm-up + {QUICK_TIMED} timed steps per run")
    p.add_argument("--resume", action="store_true",
                   help="continue the scenario's last bench in the results file (one that was stopped): the runs it "
                        "recorded are kept, the others run and are verified against its reference; same code and "
                        "--quick as that bench")
    args = p.parse_args(argv)
    try:
        sc = scenarios.load(args.scenario)
        sc = narrowed(sc, args.only.split(",") if args.only else None, args.quick)
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
    out = Path(args.out or "reports/results")
    if out.is_dir() or args.out is None or args.out.endswith("/"):
        out = out / f"{sc.name}.jsonl"
    from .runner import ResumeError, run_scenario
    from .summary import table

    # SIGTERM (kill, a job scheduler's stop) would end this process at once, leaving the running worker (in its own
    # session) orphaned on the GPU; as SystemExit it unwinds like Ctrl-C, and the runner kills the worker.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        outcomes = run_scenario(sc, out, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                                logs_dir=out.parent / f"{out.stem}-logs",
                                only=sorted({r.backend for r in sc.runs}) if args.only else None, resume=args.resume)
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM as above
        print(f"\n{sc.name}: stopped; the runs that ended are in {out}. Continue with the same command and --resume.",
              file=sys.stderr)
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\n{sc.name}: {len(outcomes)} runs, rows appended to {out}")
    print(table(outcomes))
    return 0


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)
