"""Runs a scenario's matrix: the initial weights and the data are made once, then every run trains in its own
subprocess (peers patch libraries globally) under the scenario's timeout. Each run's rows are verified and appended
to the results file as soon as it ends; an unavailable backend, an out-of-memory error, a crash or a timeout is a
row with its status and reason, and the matrix goes on."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, data, metrics, results, verify
from .backends import REGISTRY
from .provenance import commit, now, versions
from .scenario import Run, Scenario

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
UNITS = {"tokens_per_s": "tokens/s", "step_time_ms": "ms", "tflops": "TFLOP/s", "mfu_datasheet": "fraction",
         "mfu_measured": "fraction", "peak_mem_alloc_gib": "GiB", "peak_mem_nvml_gib": "GiB",
         "matmul_ceiling_tflops": "TFLOP/s", "packing_efficiency": "fraction", "loss": "nats/token",
         "grad_norm": "", "trainable_params": "parameters", "first_batch_loss_after": "nats/token"}


@dataclass
class Launched:
    """What came back from a subprocess: its JSON result (None if it wrote none), whether it timed out, its log."""

    result: dict | None
    timed_out: bool
    returncode: int | None
    log_tail: str


@dataclass
class Outcome:
    run: Run
    status: str
    reason: str
    speed: dict = field(default_factory=dict)  # metric -> metrics.Summary, ok runs only
    rows: list[dict] = field(default_factory=list)


def launch(module: str, args: list[str], timeout_s: float, env: dict, log_path: Path,
           result_path: Path) -> Launched:
    """Run `python -m module *args` in its own session; on timeout, kill its whole process group. Its own session
    keeps a Ctrl-C at the terminal from reaching it, so when the bench itself is stopped (KeyboardInterrupt, or
    SIGTERM turned into SystemExit by bench.main) the group is killed here too: an orphaned run would go on holding
    the GPU and skew the next bench's numbers."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:
            _kill_group(proc)
            raise
    result = None
    if result_path.is_file():
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    return Launched(result=result, timed_out=timed_out, returncode=proc.returncode, log_tail=tail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended on its own in the meantime
        pass
    proc.wait()


def child_env(scenario: Scenario) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    if scenario.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TRITON_INTERPRET"] = "1"  # Triton kernels (Chronicals') run under the interpreter on CPU
    else:
        env.pop("TRITON_INTERPRET", None)  # inherited from a CPU test session, it would time the interpreter
    return env


def run_scenario(scenario: Scenario, out: str | Path, *, log: Callable[[str], None] = print,
                 launcher: Callable[..., Launched] = launch, logs_dir: Path | None = None,
                 only: list[str] | None = None, resume: bool = False) -> list[Outcome]:
    """Run every cell of the matrix, reference first; returns the outcomes of the runs made (rows are already on
    disk). `only`: the backends `bench --only` kept, recorded so the report does not take the runs it left out for a
    stopped bench. `resume`: continue the scenario's last bench in `out` (see `resumed`): its recorded runs are kept
    and skipped, the others run under its run_id, so they are verified against its reference."""
    base = {"run_id": uuid.uuid4().hex[:12], "scenario_file": scenario.path, "commit": commit(),
            "versions": versions(), "host": platform.node(), "train_steps": scenario.train.steps,
            "workload": workload(scenario)}
    if only:
        base["only"] = list(only)
    done: set[tuple[str, str]] = set()
    if resume:
        base["run_id"], done = resumed(scenario, out, base)
        if all((r.backend, r.variant) in done for r in scenario.runs):
            log(f"{scenario.name}: the bench resumed recorded every run; nothing left to run")
            return []
    run_id = base["run_id"]
    env = child_env(scenario)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        tmp = Path(tmp)
        logs = Path(logs_dir) if logs_dir else tmp
        logs.mkdir(parents=True, exist_ok=True)
        log(f"{scenario.name}: preparing initial weights ({scenario.model.label}, seed {scenario.seed}) and data")
        ckpt = checkpoint.prepare(scenario, tmp)
        cfg = checkpoint.config(ckpt)
        t = scenario.train
        steps = data.make_steps(scenario.data.kind, t.steps, t.batch_size, t.seq_len, scenario.data.min_len,
                                cfg["vocab_size"], scenario.seed)
        torch.save(steps, tmp / "data.pt")
        shape = metrics.Shape.from_config(cfg)
        flops = [metrics.step_flops(shape, [s.numel() for s in seqs], t.mode, t.lora_rank) for seqs in steps]
        device = {"gpu": None, "driver": None, "cuda": None}
        ceiling = None
        if scenario.device == "cuda":
            probe = launcher("harness.probe", [str(tmp / "probe.json")], min(scenario.timeout_s, 300), env,
                             logs / "probe.log", tmp / "probe.json")
            if probe.result:
                ceiling = probe.result.pop("matmul_ceiling_tflops")
                device = probe.result
                log(f"{device['gpu']}: matmul ceiling {ceiling:.0f} TFLOP/s (bf16, 8192^3)")
            else:
                log(f"matmul ceiling probe failed; MFU vs measured ceiling omitted:\n{probe.log_tail}")
        context = _Context(scenario, Path(out), run_id, base, device, ceiling, steps, flops)
        for i, run in enumerate(scenario.ordered_runs(), 1):
            if (run.backend, run.variant) in done:
                log(f"[{i}/{len(scenario.runs)}] {run.backend} ({run.variant}): recorded by the bench resumed, kept")
                continue
            name = f"{i:02d}-{run.backend}-{run.variant}"
            job_path, result_path = tmp / f"{name}.job.json", tmp / f"{name}.result.json"
            job_path.write_text(json.dumps(_job(scenario, run, ckpt, cfg["model_type"], tmp / "data.pt")),
                                encoding="utf-8")
            log(f"[{i}/{len(scenario.runs)}] {run.backend} ({run.variant}, {run.layout}) ...")
            launched = launcher("harness.worker", [str(job_path), str(result_path)], scenario.timeout_s, env,
                                logs / f"{name}.log", result_path)
            outcome = context.outcome(run, launched)
            results.append(out, outcome.rows)
            log(f"    {outcome.status}" + (f": {outcome.reason}" if outcome.reason else ""))
            outcomes.append(outcome)
    return outcomes


def workload(scenario: Scenario) -> dict:
    """What a run's speed and memory depend on besides the code: model, precision, batch, data, optimizer. The gate
    compares a scenario's runs with its baseline only when these match (a scenario file edited since, say to another
    batch size, keeps its name)."""
    m, t, d = scenario.model, scenario.train, scenario.data
    return {"model": m.label, "dtype": m.dtype, "mode": t.mode, "lora_rank": t.lora_rank, "lora_alpha": t.lora_alpha,
            "batch_size": t.batch_size, "seq_len": t.seq_len, "lr": t.lr, "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm, "data": d.kind, "min_len": d.min_len, "seed": scenario.seed}


class ResumeError(ValueError):
    """`bench --resume` found nothing, or something else, to continue."""


def resumed(scenario: Scenario, out: str | Path, base: dict) -> tuple[str, set[tuple[str, str]]]:
    """(run_id, recorded runs) of the scenario's last bench in `out`, refused (ResumeError) when there is none or when
    it ran other code or another number of steps: its rows and the new ones must be one matrix. Weights and data
    are rebuilt from the scenario's seed, so they are the same."""
    last = results.latest_bench(out, scenario.name)
    if last is None:
        raise ResumeError(f"--resume: {out} holds no bench of scenario {scenario.name!r} to continue; run it without "
                         "--resume")
    for key, what in (("commit", "code"), ("train_steps", "number of steps (give --quick as that bench did)")):
        if last.provenance.get(key) != base[key]:
            raise ResumeError(f"--resume: the last bench of {scenario.name!r} in {out} ran another {what}: {key} "
                             f"{last.provenance.get(key)!r} there, {base[key]!r} now; run it again without --resume")
    if last.provenance.get("workload") not in (None, base["workload"]):  # None: rows from before it was recorded
        raise ResumeError(f"--resume: the last bench of {scenario.name!r} in {out} ran other settings (workload "
                          f"{last.provenance['workload']} there, {base['workload']} now: the scenario file changed); "
                          "run it again without --resume")
    return last.provenance["run_id"], last.runs


def _job(scenario: Scenario, run: Run, ckpt: Path, model_type: str, data_path: Path) -> dict:
    """What a worker needs: the backend's import target, the build spec, the data file and the optimizer settings.
    The parent's sys.path travels too, so a backend registered from anywhere the parent can import is found."""
    t = scenario.train
    return {"target": REGISTRY[run.backend], "data": str(data_path), "sys_path": sys.path,
            "build": {"checkpoint": str(ckpt), "model_type": model_type, "device": scenario.device,
                      "dtype": scenario.model.dtype, "mode": t.mode, "lora_rank": t.lora_rank,
                      "lora_alpha": t.lora_alpha, "seq_len": t.seq_len, "seed": scenario.seed, "layout": run.layout,
                      "flags": run.flags},
            "optimizer": {"lr": t.lr, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm}}


@dataclass
class _Context:
    scenario: Scenario
    out: Path
    run_id: str
    base: dict
    device: dict
    ceiling: float | None
    steps: list
    flops: list[float]

    def outcome(self, run: Run, launched: Launched) -> Outcome:
        sc = self.scenario
        res = launched.result
        if launched.timed_out:
            status, reason = "timeout", f"no result within timeout_s = {sc.timeout_s:g} s"
        elif res is None:
            status = "crashed"
            last = launched.log_tail.strip().splitlines()[-1:] or [""]
            reason = f"the run's process exited with code {launched.returncode} and no result: {last[0]}"
        else:
            status, reason = res["status"], res["reason"]
        records = (res or {}).get("steps", [])
        if status == "ok":
            reference, no_reference = None, []
            if run is not sc.reference_run:
                reference = results.reference_run(self.out, sc.name, self.run_id, sc.reference_run)
                if reference is None:  # the run's own checks still run: its own faults are named too
                    no_reference = [f"the reference run ({sc.reference}, {sc.reference_run.variant}) did not pass, "
                                    "so this run's loss and gradient norm cannot be checked"]
            failures = verify.check(records, res.get("weights_changed"), sc.train.steps, sc.verify, reference,
                                    res.get("trainable_params"), res.get("first_batch_loss_after"),
                                    res.get("packed_leak"))
            if failures or no_reference:
                status, reason = "failed-verification", "; ".join(no_reference + failures)
        provenance = {**self.base, **self.device, **((res or {}).get("device") or {}), "time": now()}
        outcome = Outcome(run=run, status=status, reason=reason)

        def add(metric, value, p20=None, p80=None, step=None):
            outcome.rows.append(results.row(sc.name, run, status, reason, provenance, metric, value,
                                            UNITS[metric], p20, p80, step))

        for i, r in enumerate(records):
            add("loss", r["loss"], step=i)
            add("grad_norm", r["grad_norm"], step=i)
            if status == "ok":  # every step's time, warm-up included, for spreads the median hides
                add("step_time_ms", r["time_ms"], step=i)
        if status == "ok":
            warm = sc.train.warmup
            outcome.speed = metrics.speed(records[warm:], self.flops[warm:], provenance.get("gpu"), self.ceiling)
            for metric, s in outcome.speed.items():
                add(metric, s.median, s.p20, s.p80)
            for metric in ("peak_mem_alloc_gib", "peak_mem_nvml_gib", "trainable_params", "first_batch_loss_after"):
                if res.get(metric) is not None:
                    add(metric, res[metric])
            if self.ceiling:
                add("matmul_ceiling_tflops", self.ceiling)
            if sc.data.kind != "fixed":
                real = sum(s.numel() for seqs in self.steps for s in seqs)
                add("packing_efficiency", real / sum(r["processed_tokens"] for r in records))
        if not outcome.rows:
            outcome.rows.append(results.row(sc.name, run, status, reason, provenance))
        return outcome
