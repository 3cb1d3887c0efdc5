#!/usr/bin/env bash
# A/B of the training step against an older commit in one GPU call: benchmarks/step_profile.py runs from a copy of
# that commit's tree and from this one, on the same host, one variant after the other, so the two numbers share a
# GPU and its state (numbers from different calls differ by a few % on their own).
#   here:      bash scripts/ab_step.sh prepare <commit>       writes .ab-base/ (git-ignored; name it in the call's carry)
#   GPU host:  bash scripts/ab_step.sh run lora[:SECONDS] full[:SECONDS] ...
# Each run is timing only (--steps 20 after warm-up); results in $OUT/res/{base,new}-VARIANT/step_profile.json and one
# summary line per side (median step, p20/p80, back-to-back, tokens/s, peak GiB, first loss: the two must agree).
set -uo pipefail
case ${1:-} in
  prepare)
    rm -rf .ab-base && mkdir -p .ab-base
    git archive "${2:?usage: ab_step.sh prepare <commit>}" chronicals benchmarks pyproject.toml | tar -x -C .ab-base
    git rev-parse --short "$2" > .ab-base/COMMIT
    echo "base $(cat .ab-base/COMMIT) in .ab-base/" ;;
  run)
    shift
    res="${OUT:-/tmp/out}/res"; mkdir -p "$res"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD"
    for spec in "$@"; do
      v=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=150
      # step_profile.py puts its own tree's root first on sys.path, so the copy runs its own chronicals.
      (cd .ab-base && timeout "$limit" python3 benchmarks/step_profile.py --out "$res/base-$v" --variants "$v" --steps 20 \
        >"$res/base-$v.log" 2>&1)
      timeout "$limit" python3 benchmarks/step_profile.py --out "$res/new-$v" --variants "$v" --steps 20 >"$res/new-$v.log" 2>&1
      python3 - "$res" "$v" "$(cat .ab-base/COMMIT)" <<'PY'
import json
import sys

res, variant, base = sys.argv[1:]
for side in ("base", "new"):
    try:
        row = json.load(open(f"{res}/{side}-{variant}/step_profile.json"))[0]
        print(f"{side} ({base if side == 'base' else 'this tree'}) {variant}: step {row['step_ms']:.2f} ms "
              f"(p20 {row['p20_ms']:.2f}, p80 {row['p80_ms']:.2f}), back to back {row['back_to_back_ms']:.2f}, "
              f"{row['tokens_per_s']:.0f} tok/s, peak {row['peak_alloc_gib']:.2f} GiB, first loss {row['first_loss']:.5f}")
    except (OSError, ValueError, KeyError, IndexError) as e:
        print(f"{side} {variant}: no result ({type(e).__name__}: {e}); see {res}/{side}-{variant}.log")
PY
    done ;;
  *) echo "usage: ab_step.sh prepare <commit> | run VARIANT[:SECONDS] ..." >&2; exit 2 ;;
esac
