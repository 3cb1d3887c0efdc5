#!/usr/bin/env bash
# Quick start, step 1: make .venv, install Chronicals with its test tools, then run the demo fine-tune
# (a small model built from a config, trained on text that ships with Python; no download of weights).
#   bash setup.sh            set up and run the demo
#   bash setup.sh --no-demo  set up only (what .ci/run does)
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
constraints=()
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch                    # a CUDA build for this GPU host
  else
    "${pip[@]}" torch==2.13.0            # no GPU: the CPU build, not a multi-GB CUDA one
    constraints=(-c requirements/cpu-constraints.txt)
  fi
fi
"${pip[@]}" "${constraints[@]}" -e ".[dev]"
if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/chronicals train
fi
