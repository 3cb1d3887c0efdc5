"""Where RMSNorm's backward spends its time, and which launch settings help (GPU only).

    python3 benchmarks/rms_norm_backward.py --out DIR [--grid wide|stages] [--seconds 150]

At the Qwen2.5-0.5B (16384 x 896) and Llama-3-8B (16384 x 4096) shapes in bf16, each launch setting is timed three
ways: the whole backward (main kernel and dw reduction), the main kernel alone (no dw: what the reduction costs is
the difference) and with the fused add's ds (three streams read, not two). Next to them, the floor for the same
bytes at the same size: torch.add(x, dy, out=dx) reads two tensors and writes one, as the backward does. A 2 GiB
copy, the issue's yardstick, has no launch ramp or tail; an 88 MB op has both.

Settings are the module constants of chronicals.kernels.rms_norm (programs per SM, pipeline stages, tile elements),
changed for each row and restored after. Times are medians of CUDA-graph replays (GPU time), inputs rotated over
three copies so that nothing is served from L2; every setting's dx must equal the default's bit for bit and its dw
agree to bf16 rounding (`same`). Writes DIR/rms_norm_backward.json after each setting, so a time limit keeps what
was measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._timing import bench_graph_ms, copy_bandwidth_gbs  # noqa: E402
from chronicals.kernels import rms_norm  # noqa: E402
from harness.provenance import snapshot  # noqa: E402

SHAPES = {"qwen2.5-0.5b": (16384, 896), "llama-3-8b": (16384, 4096)}
KNOBS = ("_PROGRAMS_PER_SM", "_MAX_BWD_STAGES", "_TILE_ELEMENTS")


def grid(name: str, kind: str) -> list[dict]:
    """Launch settings to time at one shape. "wide": programs per SM x stages x tile; "stages": the default and its
    neighbours, each twice (the run's own spread)."""
    if kind == "wide":
        tiles = (1024, 2048, 4096) if name == "qwen2.5-0.5b" else (4096, 8192)
        return [dict(zip(KNOBS, (p, s, t))) for p, s, t in itertools.product((1, 2, 3, 4, 8, 16), (1, 2, 3, 4), tiles)
                if not (p >= 4 and s > 2)]  # deep pipelines at 4+ programs per SM exceed shared memory
    tile = 2048 if name == "qwen2.5-0.5b" else 4096
    return [dict(zip(KNOBS, (p, s, tile))) for p in (2, 3) for s in (3, 4)] * 2


def _timed_us(fn, sets) -> float:
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(sets)
        fn(*sets[state["i"]])

    return bench_graph_ms(call, calls=len(sets) * 6, replays=7)["ms"] * 1e3


def run(kind: str, seconds: float, save) -> dict:
    copy = copy_bandwidth_gbs()
    res = {"copy_gb_per_s": copy, "rows": []}
    deadline = time.time() + seconds
    for name, (m, h) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        sets = []
        for _ in range(3):
            x, dy, ds = (torch.randn(m, h, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
            sets.append((x, dy, ds, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)))
        w = torch.randn(h, device="cuda", dtype=torch.bfloat16, generator=gen)
        dx = torch.empty(m, h, device="cuda", dtype=torch.bfloat16)

        def pct(us, streams, elements=m * h):  # % of the copy bandwidth for `streams` bf16 tensors moved once
            return streams * elements * 2 / (us * 1e-6) / 1e9 / copy * 100

        floor = _timed_us(lambda x, dy, ds, r, out=dx: torch.add(x, dy, out=out), sets)
        res["rows"].append({"shape": name, "what": "torch.add, 2 in 1 out", "us": floor, "pct_of_copy": pct(floor, 3)})
        x0, dy0, _, r0 = sets[0]
        ref = rms_norm.rms_norm_backward(dy0, x0, w, r0, 0.0, None, True, 1e-6)
        defaults = {k: getattr(rms_norm, k) for k in KNOBS}
        try:
            for cfg in grid(name, kind):
                if time.time() > deadline:
                    break
                vars(rms_norm).update(cfg)
                for label, with_ds, with_dw in (("backward", False, True), ("no dw", False, False),
                                                ("with ds", True, True)):
                    us = _timed_us(lambda x, dy, ds, r, a=with_ds, b=with_dw, w=w:
                                   rms_norm.rms_norm_backward(dy, x, w, r, 0.0, ds if a else None, b, 1e-6), sets)
                    row = {"shape": name, **cfg, "what": label, "us": us, "pct_of_copy": pct(us, 4 if with_ds else 3)}
                    if label == "backward":
                        got = rms_norm.rms_norm_backward(dy0, x0, w, r0, 0.0, None, True, 1e-6)
                        row["same"] = bool(torch.equal(got[0], ref[0])) and bool(
                            (got[1].float() - ref[1].float()).abs().max() <= 1e-2 * ref[1].float().abs().max())
                    res["rows"].append(row)
                    print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                save(res)
        finally:
            vars(rms_norm).update(defaults)
        del sets, dx
        torch.cuda.empty_cache()
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for rms_norm_backward.json")
    parser.add_argument("--grid", default="stages", choices=["wide", "stages"])
    parser.add_argument("--seconds", type=float, default=150.0, help="stop starting new settings after this long")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernel's timings are the point)")
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = snapshot() | {"argv": sys.argv[1:]}

    def save(res, partial=True):
        out = res | {"provenance": provenance, "partial": partial}
        (args.out / "rms_norm_backward.json").write_text(json.dumps(out, indent=1))

    save(run(args.grid, args.seconds, save), partial=False)
    print(f"wrote {args.out / 'rms_norm_backward.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
