#!/usr/bin/env bash
# FlashAttention 4 (CuTe DSL kernels; sm90 forward and backward, varlen, GQA) for the GPU host, which reaches no
# registry. Its compiler library (nvidia-cutlass-dsl-libs-cu13) alone packs to ~60 MB, more than one device call
# may carry next to .gpu-carry, so the packed site is split in two parts sent by two calls on the warm machine:
#   bash scripts/fa4_carry.sh                 # here: writes .fa4-carry/part-00, part-01 (ignored by git)
#   call 1 (carry .fa4-carry with part-00):   mkdir -p /tmp/fa4 && cp .fa4-carry/part-* /tmp/fa4/
#   call 2 (carry .fa4-carry with part-01):   source scripts/fa4_unpack.sh
# On a host with a registry: pip install flash-attn-4 (chronicals.attention then picks it on Hopper/Blackwell).
set -euo pipefail
out="$PWD/.fa4-carry"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$work/wheels" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 \
  einops==0.8.2
mkdir -p "$work/site" "$out"
for w in "$work"/wheels/*.whl; do (cd "$work/site" && python3 -m zipfile -e "$w" .); done
rm -rf "$work/site"/nvidia_cutlass_dsl/cu13/lib/stubs  # QNX / aarch64 stubs
tar cf - -C "$work/site" . | xz -T0 -6 > "$work/site.tar.xz"
rm -f "$out"/part-*
split -n 2 -d --additional-suffix= "$work/site.tar.xz" "$out/part-"
ls -la "$out"
