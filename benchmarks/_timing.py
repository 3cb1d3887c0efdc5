"""Timing helpers shared by the GPU benchmark scripts.

- `bench_ms`: median/p20/p80 of one call, CUDA events per call, L2 flushed before each (triton's
  do_bench). Includes host launch overhead whenever the GPU work is shorter than it.
- `bench_graph_ms`: the same calls replayed from a CUDA graph: GPU time only, as in a training step
  where the host runs ahead of the GPU. The caller rotates inputs when they would fit in L2.
- `time_calls_ms`: each of n calls timed on its own (CUDA events, or the wall clock on CPU), for steps that
  are long next to the timing's overhead (a training step); returns the times and the last call's result.
- `copy_bandwidth_gbs`: a large device-to-device copy (bytes read + written) in the same run, the
  practical ceiling for a memory-bound kernel.
"""

from __future__ import annotations

import statistics
import time

import torch


def bench_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": p20, "p80_ms": p80, "method": "events"}


def bench_graph_ms(fn, *, calls: int = 20, replays: int = 10, warmup: int = 3, stream=None) -> dict:
    """Capture `calls` calls of fn in one CUDA graph, replay it `replays` times; per-call ms. `stream`: the side stream
    to warm up and capture on (a new one by default)."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return summarize(times, "cuda_graph") | {"times_ms": times}


def summarize(times: list[float], method: str) -> dict:
    """Median and p20/p80 of per-call times (ms), with how they were taken."""
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "method": method}


def time_calls_ms(fn, calls: int, *, cuda: bool = True) -> tuple[list[float], object]:
    """Milliseconds of each of `calls` calls of fn, each ended by a synchronisation, and fn's last result."""
    times, result = [], None
    for _ in range(calls):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def copy_bandwidth_gbs(nbytes: int = 2**31, device="cuda") -> float:
    """GB/s (1e9 bytes) of dst.copy_(src) over `nbytes`, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (t["ms"] * 1e-3) / 1e9


def l2_bytes(device="cuda") -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
