#!/usr/bin/env bash
# One GPU call that decides the fast-sigmoid branch (and, on an H200, gives issue 4's kernel table). From the repo
# root of this branch, with `scripts/ab_step.sh prepare main` run first (main's tree in .ab-base/) and
# `.gpu-carry` + `.ab-base` carried:   source .gpu-carry/unpack.sh; bash scripts/fast_sigmoid_gpu.sh
# 1. The SwiGLU / LoRA SwiGLU tests on CUDA (the approximate sigmoid's tails against tl.sigmoid, float64 hypothesis
#    tests) and RoPE's bit-widening identity test.
# 2. On an H200: benchmarks/kernel_ops.py, all four ops, from this tree when 1 passed, else from main's.
#    On another GPU: SwiGLU alone at 5 rounds (the `chronicals[precise sigmoid]` variant is the same-round A/B).
# 3. scripts/lora_swiglu_ab.py: the fused LoRA SwiGLU kernels, approximate against precise sigmoid.
# Logs and JSON under $OUT/res; stages.txt has each stage's exit status and seconds.
set -uo pipefail
res="${OUT:-/tmp/out}/res"; mkdir -p "$res"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$res/gpu.txt"
# The commit recorded in the results: pass CHRONICALS_COMMIT (the GPU host's copy of .git may not be this tree's).
export CHRONICALS_COMMIT=${CHRONICALS_COMMIT:-unknown}
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS; timeout "$limit" "$@" > "$res/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$res/stages.txt"; tail -4 "$res/$name.log"; return $rc
}
tests="env CHRONICALS_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -p no:cacheprovider -rfE -x"
stage gputests 120 $tests tests/kernels/test_swiglu.py tests/kernels/test_lora_swiglu.py \
  tests/kernels/test_rope.py::test_bit_widening_equals_the_cvt_at_every_launch_shape; passed=$?
if grep -q H200 "$res/gpu.txt"; then
  if [ $passed = 0 ]; then
    stage kernels 300 python3 benchmarks/kernel_ops.py --out "$res/all"
  else
    (cd .ab-base && CHRONICALS_COMMIT=$(cat COMMIT) PYTHONPATH=$PWD stage kernels-main 300 \
      python3 benchmarks/kernel_ops.py --out "$res/all-main")
  fi
  stage lora-ab 60 python3 scripts/lora_swiglu_ab.py "$res/lora_swiglu_ab.json"
else
  stage lora-ab 60 python3 scripts/lora_swiglu_ab.py "$res/lora_swiglu_ab.json"
  stage kernels 150 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import kernel_ops as k; k.ROUNDS = 5; \
sys.exit(k.main(['--out', '$res/all', '--ops', 'swiglu']))"
fi
