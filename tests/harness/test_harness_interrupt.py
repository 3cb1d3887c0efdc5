"""A bench stopped mid-matrix (Ctrl-C, SIGTERM) takes its running worker with it: the worker runs in its own session,
so nothing else would stop it, and an orphan would go on holding the GPU. The rows of the runs that ended stay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.runner import launch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_interrupted_launch_kills_its_worker(tmp_path):
    (tmp_path / "sleeper.py").write_text(
        "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    pid_file = tmp_path / "pid"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(KeyboardInterrupt):
            launch("sleeper", [str(pid_file)], 60, env, tmp_path / "log", tmp_path / "result.json")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pid_file.read_text())
    orphaned = _alive(pid)
    if orphaned:  # without the fix: do not leave it behind
        os.kill(pid, signal.SIGKILL)
    assert not orphaned, "the worker outlived the interrupted bench"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_bench_kills_the_running_worker_and_keeps_finished_rows(tmp_path):
    toml = tmp_path / "stop.toml"
    toml.write_text('device = "cpu"\nbackends = ["fake_oom", "fake_hang"]\nreference = "fake_oom"\n'
                    '[model]\npreset = "tiny-llama"\ndtype = "float32"\n'
                    "[train]\nbatch_size = 1\nseq_len = 8\nsteps = 2\nwarmup = 1\n")
    out = tmp_path / "stop.jsonl"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fake_backends; fake_backends.register_all(); "
            "from harness import bench; sys.exit(bench.main(sys.argv[2:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    bench = subprocess.Popen([sys.executable, "-c", code, str(HERE), "--scenario", str(toml), "--out", str(out)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    # the first run's row is on disk and the hanging second run has started
    worker = int(_wait_for(lambda: out.is_file() and children.read_text().split())[0])
    try:
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        _wait_for(lambda: not _alive(worker), timeout_s=10)
    finally:
        if bench.poll() is None:
            bench.kill()
        if _alive(worker):  # without the fix: do not leave the orphan behind
            os.killpg(worker, signal.SIGKILL)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["backend"], r["status"]) for r in rows] == [("fake_oom", "oom")]
    assert "stopped; the runs that ended are in" in bench.stderr.read().decode()  # and how to continue: --resume


def test_a_run_s_rows_reach_the_file_all_together_or_not_at_all(tmp_path):
    """Rows were written one by one: a run cut short between them (here a row that cannot be written, a NaN) left its
    first rows on disk, and --resume then took the run for finished."""
    from harness import results

    out = tmp_path / "r.jsonl"
    results.append(out, [{"metric": "loss", "value": 1.0}])
    with pytest.raises(ValueError):
        results.append(out, [{"metric": "loss", "value": 2.0}, {"metric": "grad_norm", "value": float("nan")}])
    assert out.read_text() == '{"metric": "loss", "value": 1.0}\n'
