"""GPU check of the trainer end to end: `ChronicalsTrainer` on a Qwen2.5-0.5B-shaped full fine-tune and a
Llama-3.2-1B-shaped LoRA run, one variant per optimization switch, on the embedded text.

    python3 benchmarks/trainer.py --out DIR [--quick]

Each variant trains a fresh model (same seed) for a few steps through the real trainer (data preparation,
packing, token-normalised accumulation, clipping, the fused optimizer, metrics.jsonl) and reports, from its
metrics.jsonl, the median over the steps after the first three (warm-up, allocator growth, autotuning) of
tokens/s (label tokens: not padding, not ignore_index), MFU (against the datasheet bf16 peak) and the peak
allocated memory, plus the first and last loss. A variant that fails is reported with status "crashed" and the
error, and the others still run. torch.compile runs only without --quick (its warm-up takes a while).
Without CUDA it runs every variant for two steps on tiny shapes, to check the script itself.
Writes DIR/trainer.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# As in the other benchmarks: import from the repository root only, so this folder never shadows a package.
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from chronicals.config import ChronicalsConfig  # noqa: E402
from chronicals.training import ChronicalsTrainer  # noqa: E402
from chronicals.training.build import load_model, load_tokenizer  # noqa: E402

FULL = dict(model="qwen2.5-0.5b", max_seq_length=2048, batch_size=4, learning_rate=2e-5, warmup_steps=2,
            mixed_precision="bf16", param_dtype="bfloat16")
LORA = dict(model="llama-3.2-1b", max_seq_length=2048, batch_size=4, learning_rate=2e-4, warmup_steps=2,
            mixed_precision="bf16", use_lora=True, lora_rank=16, lora_alpha=32.0, use_lora_plus=True)
OFF = dict(use_fused_kernels=False, use_sequence_packing=False)


def variants(quick: bool) -> list[tuple[str, dict]]:
    out = [
        ("full: HF eager-style (padded, unfused)", {**FULL, **OFF}),
        ("full: + packing", {**FULL, "use_fused_kernels": False}),
        ("full: chronicals (packing + fused)", dict(FULL)),
        ("full: chronicals, fp32 master weights", {**FULL, "param_dtype": "auto"}),
        ("full: chronicals + grad ckpt", {**FULL, "use_gradient_checkpointing": True}),
        ("full: chronicals + ckpt + offload", {**FULL, "use_gradient_checkpointing": True,
                                               "activation_offload": True}),
        ("lora: HF + PEFT (padded, unfused)", {**LORA, **OFF}),
        ("lora: chronicals (packing + fused)", dict(LORA)),
    ]
    if not quick:
        out.append(("full: chronicals + torch.compile", {**FULL, "use_torch_compile": True}))
    return out


def run_variant(name: str, settings: dict, *, steps: int, out_dir: Path, cuda: bool) -> dict:
    settings = dict(settings, tokenizer="default", dataset="default", overflow="split", max_steps=steps,
                    output_dir=str(out_dir), progress_bar=False, logging_steps=1000, save_final_model=False,
                    device="cuda" if cuda else "cpu", seed=0)
    if not cuda:  # tiny shapes: this only checks that every path runs
        settings.update(model="tiny-qwen2" if settings["model"].startswith("qwen") else "tiny-llama",
                        max_seq_length=64, batch_size=2, mixed_precision="no", param_dtype="auto")
    row = {"variant": name, "settings": settings, "status": "ok", "reason": None}
    try:
        cfg = ChronicalsConfig(**settings)
        tok = load_tokenizer(cfg)
        with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds, not a minute per 1B model
            model = load_model(cfg, tok)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ChronicalsTrainer(model, tok, cfg).train(cfg.dataset)
        row["wall_s"] = time.perf_counter() - start
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        timed = metrics[3:] or metrics
        row.update(
            steps=len(metrics),
            tokens_per_s=statistics.median(m["tokens_per_s"] for m in timed),
            step_time_ms=1000 * statistics.median(m["step_time_s"] for m in timed),
            mfu=statistics.median(m["mfu"] for m in timed) if timed[0]["mfu"] is not None else None,
            peak_mem_gib=max((m["peak_mem_gib"] or 0.0) for m in metrics) if cuda else None,
            label_tokens_per_step=statistics.median(m["label_tokens"] for m in timed),
            loss_first=metrics[0]["loss"], loss_last=metrics[-1]["loss"],
        )
    except Exception as e:  # one variant's failure is a result, not the end of the benchmark
        row.update(status="crashed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300],
                   traceback=traceback.format_exc()[-2000:])
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':<42} {'status':<8} {'tok/s':>9} {'ms/step':>8} {'MFU':>6} {'peak GiB':>9} {'loss':>15}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:<42} {r['status']:<8} {r['reason']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(f"{r['variant']:<42} {r['status']:<8} {r['tokens_per_s']:>9.0f} {r['step_time_ms']:>8.1f} "
                     f"{mfu:>6} {mem:>9} {r['loss_first']:>7.3f}->{r['loss_last']:<7.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for trainer.json")
    parser.add_argument("--quick", action="store_true", help="fewer steps, no torch.compile variant")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    steps = (8 if args.quick else 16) if cuda else 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    device = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"device": device, "torch": torch.__version__, "steps": steps, "rows": rows}
    for i, (name, settings) in enumerate(variants(args.quick or not cuda)):
        rows.append(run_variant(name, settings, steps=steps, out_dir=args.out / f"run{i}", cuda=cuda))
        print(f"[{i + 1}] {name}: {rows[-1]['status']}", flush=True)
        (args.out / "trainer.json").write_text(json.dumps(result, indent=2))  # after each variant: a crash keeps them
    print(f"\ntrainer benchmark on {device}, {steps} steps per variant, medians after 3 warm-up steps")
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
