"""Where a full fine-tuning step's memory goes: Chronicals against Liger-Kernel and plain HF, per phase.

    python3 benchmarks/step_memory.py --out DIR [--presets qwen3-0.6b,qwen2.5-0.5b] [--impls chronicals,liger,hf]

Each (preset, implementation) runs in its own process (Liger patches the family's classes for the whole process):
the preset's real shape in bf16 (HF's SDPA attention, no KV cache, as the harness loads it), batch 8 x 2048 random
tokens, torch's fused AdamW, a few steps. Per step it records, in GiB of `torch.cuda.max_memory_allocated`:
- `base`: allocated before the forward (weights and optimizer state once the first step has made it);
- `peak_fwd`, `after_fwd`: the forward's peak (the loss included) and what stays for the backward;
- `peak_bwd`, `peak_opt`: the backward's and the optimizer step's peaks;
- `saved`: the tensors autograd saved for the backward (torch.autograd.graph.saved_tensors_hooks, each storage
  once, parameters left out), also per token and layer in elements.
`overall` is the peak over every step, the first (Triton's tuning, the optimizer's state) included: the number the
harness reports. Step times are indicative only (the saving hook and the per-phase synchronisations cost time).
Without CUDA it runs the same at a tiny preset in fp32 (TRITON_INTERPRET=1), without memory peaks: the saved
activations per token and layer are still measured. Writes DIR/step_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness.provenance import snapshot  # noqa: E402

IMPLS = ("chronicals", "liger", "hf")
GIB = 2**30


def _build(impl: str, preset: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    from chronicals.models.presets import preset_config

    cfg = preset_config(preset)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False  # a training forward keeps no cache (the harness sets the same)
    if impl == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{cfg.model_type}")(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).train()
    if impl == "chronicals":
        import chronicals

        chronicals.apply(model)
    return model, cfg


def _keep(saved: dict, t: torch.Tensor) -> torch.Tensor:
    """The saving hook: note t's storage (each once, by its size) and save t itself."""
    storage = t.untyped_storage()
    saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
    return t


def measure(impl: str, preset: str, batch: int, seq: int, steps: int) -> dict:
    """One implementation's per-phase memory (see the module docstring); runs in the calling process."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model, cfg = _build(impl, preset, dtype, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)

    def phase_peak(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        return result, peak() / GIB

    records, overall = [], 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        base = allocated() / GIB
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_keep, saved), lambda t: t):
            loss, peak_fwd = phase_peak(lambda: model(input_ids=ids, labels=ids).loss)
        after_fwd = allocated() / GIB
        _, peak_bwd = phase_peak(loss.backward)

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, peak_opt = phase_peak(step)
        overall = max(overall, peak_fwd, peak_bwd, peak_opt)
        activations = sum(n for ptr, n in saved.items() if ptr not in params)
        records.append(dict(base=base, peak_fwd=peak_fwd, after_fwd=after_fwd, peak_bwd=peak_bwd, peak_opt=peak_opt,
                            saved=activations / GIB, step_ms=(time.perf_counter() - t0) * 1e3, loss=loss.item()))
    last = records[-1]
    element = torch.finfo(dtype).bits // 8
    return dict(impl=impl, preset=preset, status="ok", batch=batch, seq=seq, dtype=str(dtype).removeprefix("torch."),
                overall=overall if cuda else None, **{k: (v if cuda or k in ("saved", "loss") else None)
                                                      for k, v in last.items() if k != "step_ms"},
                saved_per_token_layer=last["saved"] * GIB / element / (batch * seq) / cfg.num_hidden_layers,
                step_ms=statistics.median(r["step_ms"] for r in records[1:] or records), steps=records)


def _run_isolated(impl: str, preset: str, batch: int, seq: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", impl, preset, str(batch), str(seq), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1].removeprefix("RESULT "))
    reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    status = "unavailable" if "ModuleNotFoundError" in reason else "crashed"  # e.g. Liger not installed
    return dict(impl=impl, preset=preset, status=status, reason=reason)


def print_table(rows: list[dict]) -> None:
    gib = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"{'preset':14} {'impl':11} {'overall':>8} {'base':>6} {'peak fwd':>9} {'after fwd':>9} "
          f"{'peak bwd':>9} {'saved':>6} {'saved/tok/layer':>15} {'step ms':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['preset']:14} {r['impl']:11} {r['status']}: {r['reason']}")
            continue
        print(f"{r['preset']:14} {r['impl']:11} {gib(r['overall']):>8} {gib(r['base']):>6} {gib(r['peak_fwd']):>9} "
              f"{gib(r['after_fwd']):>9} {gib(r['peak_bwd']):>9} {r['saved']:6.2f} "
              f"{r['saved_per_token_layer']:15.0f} {r['step_ms']:8.1f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # the child process of one (impl, preset)
        impl, preset, batch, seq, steps = argv[1], argv[2], *map(int, argv[3:6])
        print("RESULT " + json.dumps(measure(impl, preset, batch, seq, steps)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for step_memory.json")
    parser.add_argument("--presets", default="qwen3-0.6b,qwen2.5-0.5b", help="comma-separated model presets")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}")
    parser.add_argument("--quick", action="store_true", help="3 steps instead of 5 (on CPU always 2)")
    args = parser.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - set(IMPLS):
        parser.error(f"--impls: unknown {sorted(set(impls) - set(IMPLS))}; choose from {', '.join(IMPLS)}")
    presets = [p for p in args.presets.split(",") if p]
    if torch.cuda.is_available():
        batch, seq = 8, 2048
    else:
        print("no CUDA device: tiny presets in fp32 under TRITON_INTERPRET=1, saved activations only (no peaks)")
        presets = [f"tiny-{p.split('-')[0].split('.')[0]}" for p in presets]
        impls = [i for i in impls if i != "liger"]  # Liger's kernels need a GPU
        batch, seq = 2, 64
    steps = 2 if not torch.cuda.is_available() else 3 if args.quick else 5
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = snapshot() | {"argv": argv}
    rows = []
    for preset in presets:
        for impl in impls:
            rows.append(_run_isolated(impl, preset, batch, seq, steps))
            result = {"rows": rows, "provenance": provenance | {"wall_s": round(time.time() - start, 1)}}
            (args.out / "step_memory.json").write_text(json.dumps(result, indent=1))
    print_table(rows)
    print(f"\nwrote {args.out / 'step_memory.json'} in {round(time.time() - start, 1)} s")
    return 0 if all(r["status"] in ("ok", "unavailable") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
