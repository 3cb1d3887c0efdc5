"""A/B of the fused LoRA SwiGLU kernels: the approximate sigmoid against tl.sigmoid, Llama-3.2-1B MLP (16384 x 8192,
r 16, bf16). Prints the largest relative difference of every output, then each kernel's CUDA-event median (p20, p80)
in us over 6 interleaved rounds of 10 calls. On a GPU host, from the repo root:

    PYTHONPATH=. python3 scripts/lora_swiglu_ab.py OUT.json
"""

import json
import statistics
import sys

import torch

from chronicals.kernels import lora_swiglu as lsw

N, INTER, RANK = 16384, 8192, 16


def main(out: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    e0, g0, dh0 = rand(N, INTER) * 2, rand(N, INTER), rand(N, INTER)
    xa, gd = rand(N, 2 * RANK), rand(N, RANK)
    b_g, b_u, a_d = rand(INTER, RANK) * 0.02, rand(INTER, RANK) * 0.02, rand(RANK, INTER) * 0.02
    work = [torch.empty_like(t) for t in (dh0, e0, g0)]  # the backward works in place: fresh copies each call

    def restore():
        for w, t in zip(work, (dh0, e0, g0)):
            w.copy_(t)

    def fwd():
        return lsw.lora_swiglu_forward(e0, g0, xa, b_g, b_u, 1.0, 1.0, a_d)

    def bwd():
        return lsw.lora_swiglu_backward(*work, xa, b_g, b_u, 1.0, 1.0, gd, a_d)

    res, outs = {}, {}
    for fast in (True, False):
        lsw._FAST_SIGMOID = fast
        h, ha = fwd()
        restore()
        outs[fast] = [h.float(), ha.float()] + [t.float().clone() for t in bwd()]
    for name, a, b in zip(["h", "ha", "h_bwd", "de", "dg", "gs"], outs[True], outs[False]):
        res[f"maxrel_{name}"] = ((a - b).abs().max() / b.abs().max()).item()
    times = {(fast, p): [] for fast in (True, False) for p in ("fwd", "bwd")}
    for _ in range(6):
        for fast in (True, False):
            lsw._FAST_SIGMOID = fast
            for p, fn in (("fwd", fwd), ("bwd", bwd)):
                for _ in range(10):
                    restore()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[(fast, p)].append(start.elapsed_time(end) * 1000)
    for (fast, p), v in times.items():
        v.sort()
        res[f"{'fast' if fast else 'precise'}_{p}_us"] = [round(x, 1) for x in
                                                         (statistics.median(v), v[len(v) // 5], v[4 * len(v) // 5])]
    print(json.dumps(res, indent=1))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
