"""Sessions run in the current environment (`bash setup.sh` makes it), so that a GPU host's own CUDA torch
is never replaced by a fresh virtualenv's download. Every tool is started with the interpreter that runs nox
(`.venv/bin/nox` -> `.venv/bin/python`), so no session depends on what PATH holds."""

import importlib.util
import os
import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]
PY = sys.executable


@nox.session
def tests(session):
    """CPU unit and property tests; Triton kernels run under TRITON_INTERPRET=1."""
    env = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    workers = ["-n", "2"] if importlib.util.find_spec("xdist") else []
    session.run(PY, "-m", "pytest", "-q", *workers, *session.posargs, env=env)


@nox.session
def bench(session):
    """GPU host: run a scenario matrix (nox -s bench -- --scenario scenarios/NAME.toml)."""
    session.run(PY, "-m", "harness", "bench", *session.posargs)


@nox.session
def report(session):
    """Render reports/ (figures, tables, REPORT.md) from results files, without re-running anything."""
    session.run(PY, "-m", "harness", "report", *session.posargs)


@nox.session
def gate(session):
    """Regression gate: compare a results file with the committed baseline for its GPU (or golden CPU losses)."""
    session.run(PY, "-m", "harness", "gate", *session.posargs)


@nox.session
def lint(session):
    """Ruff over the packages, tests, benchmarks and scripts."""
    session.run(PY, "-m", "ruff", "check", "chronicals", "harness", "tests", "benchmarks", "scripts", "noxfile.py")


@nox.session
def demo(session):
    """The main job on embedded defaults: a short fine-tune of a small model on shipped text."""
    session.run(PY, "-m", "chronicals", "train", *session.posargs, env={"PYTHONUNBUFFERED": "1", **os.environ})
