"""Once per scenario run, in its own process before the training runs: the GPU's name and driver, and its matmul
ceiling: the TFLOP/s of a large bf16 matmul on random data (2*n^3 FLOPs), median of timed repeats after warm-up.
MFU against this ceiling says how close a run gets to what this GPU actually sustains, not to its datasheet.

`python -m harness.probe RESULT.json [N]`"""

from __future__ import annotations

import json
import statistics
import sys

from .provenance import device_info

N = 8192
REPEATS = 10


def matmul_ceiling_tflops(n: int = N, repeats: int = REPEATS) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = {**device_info("cuda"), "matmul_ceiling_tflops": matmul_ceiling_tflops(*(int(x) for x in argv[1:2]))}
    with open(argv[0], "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
