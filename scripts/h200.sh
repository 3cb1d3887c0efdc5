#!/usr/bin/env bash
# Runs the GPU work on an H200 host in one call, stage by stage, each under its own time limit, so one failing
# stage costs only itself. Results land in $OUT/res (JSON/JSONL per stage, a log per stage) and are packed into
# $OUT/res.tgz (the device tool brings back few files). Usage, from the repo root:
#   source .gpu-carry/unpack.sh; CHRONICALS_COMMIT=<hash of the tree sent> bash scripts/h200.sh [--quick] STAGE[:SECONDS] ...
# (the host gets a copy of the working tree without .git, so the result rows learn their commit from that variable)
#   ONLY=chronicals bash scripts/h200.sh --quick packing-matrix:150   (scenario stages only)
# Stages: tests, kernels, memory, lce, packing, lora, trainer, profile, scaling, full, lora-matrix, shapes, ablation,
# packing-matrix.
set -uo pipefail
quick=()
[ "${1:-}" = "--quick" ] && { quick=(--quick); shift; }
# ONLY=backend,... limits the scenario matrices to those backends (the reference always runs).
matrix=("${quick[@]}")
[ -n "${ONLY:-}" ] && matrix+=(--only "$ONLY")
res="${OUT:-/tmp/out}/res"; mkdir -p "$res"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pip_install() { python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"; }
pip_install
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$res/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-4s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$res/stages.txt"
}
for spec in "$@"; do
  name=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=240
  case $name in
    # The suites that have not yet run on a GPU come first; no -x, so one failure does not hide the rest.
    tests) stage tests "$limit" env CHRONICALS_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpu python3 -m pytest -q \
             -p no:cacheprovider tests/lora tests/optimizers tests/training tests/models tests/test_attention.py \
             tests/kernels ;;
    kernels) stage kernels "$limit" python3 benchmarks/kernel_ops.py --out "$res" "${quick[@]}" ;;
    memory) stage memory "$limit" python3 benchmarks/step_memory.py --out "$res" "${quick[@]}" ;;
    lce) stage lce "$limit" python3 benchmarks/linear_cross_entropy.py --out "$res" "${quick[@]}" ;;
    packing) stage packing "$limit" python3 benchmarks/packing.py --out "$res" "${quick[@]}" ;;
    lora) stage lora "$limit" python3 benchmarks/lora_step.py --out "$res" "${quick[@]}" ;;
    trainer) stage trainer "$limit" python3 benchmarks/trainer.py --out "$res" "${quick[@]}" ;;
    # Where a step's time goes (kernels, GPU idle gaps, host ops) and the speed levers A/B'd; VARIANTS overrides.
    profile) stage profile "$limit" python3 benchmarks/step_profile.py --out "$res" --attention \
               --variants "${VARIANTS:-full,lora,lora_kconcat,lora_unfused}" --profile full,lora --phases ;;
    # Host cost against GPU cost: the same step at batch 8 and 16 (GPU work scales with tokens, host work does not),
    # each timed alone and back to back; the limit is per batch size.
    scaling) for b in 8 16; do
               stage "scaling-b$b" "$limit" python3 benchmarks/step_profile.py --out "$res/scaling-b$b" \
                 --variants "${VARIANTS:-lora,full}" --profile "" --batch "$b" --steps 20
             done ;;
    full) stage full "$limit" python3 -m harness bench --scenario scenarios/h200-full.toml --out "$res/h200-full.jsonl" "${matrix[@]}" ;;
    lora-matrix) stage lora-matrix "$limit" python3 -m harness bench --scenario scenarios/h200-lora.toml --out "$res/h200-lora.jsonl" "${matrix[@]}" ;;
    # Shapes the headline scenarios do not cover (Qwen3 full and LoRA, Llama-3.2-1B full, Qwen2.5 LoRA); the
    # limit is per scenario. On the H100 with --quick each took 120-175 s.
    shapes) for sc in qwen3-full llama1b-full qwen25-lora qwen3-lora; do
              stage "$sc" "$limit" python3 -m harness bench --scenario "scenarios/$sc.toml" --out "$res/$sc.jsonl" "${matrix[@]}"
            done ;;
    ablation) stage ablation "$limit" python3 -m harness bench --scenario scenarios/ablation.toml --out "$res/ablation.jsonl" "${matrix[@]}" ;;
    packing-matrix) stage packing-matrix "$limit" python3 -m harness bench --scenario scenarios/packing.toml --out "$res/packing.jsonl" "${matrix[@]}" ;;
    *) echo "unknown stage $name" | tee -a "$res/stages.txt" ;;
  esac
done
tar czf "${OUT:-/tmp/out}/res.tgz" -C "$res" .
cat "$res/stages.txt"
for f in "$res"/*.log; do echo "== $f"; tail -n 6 "$f"; done
