"""One LoRA training step (r=16 on all seven projections, Llama-3.2-1B shape, batch 8 x 2048, bf16): time and peak
memory of HF+PEFT, ours (fused LoRA, with and without chronicals.apply's patches, with and without gradient
checkpointing) and Unsloth (with its recommended gradient checkpointing and without).

    python3 benchmarks/lora_step.py --out DIR [--quick] [--device cpu]

A step is forward + backward + optimizer step (PyTorch's fused AdamW for every variant) + zero_grad, on random token
ids with labels = input ids (every token counts). The model is built once from the preset with a fixed seed and
saved with a tokenizer (Unsloth's loader needs a path), and each variant runs in its own subprocess (Unsloth patches
transformers at import; peak memory must not carry over). Before timing, each variant's loss on the first batch
(adapters start with B = 0, so every variant computes the base model's loss) must be finite and agree with HF+PEFT's
within 2%; otherwise the variant is reported as failed-verification and not ranked. On a random-init model that
catches gross faults (wrong model or dtype, NaNs, a loss over the wrong tokens count), not subtle ones: the fused
ops' numerics are checked against PEFT by tests/lora and the harness's verification. Time: CUDA events per step,
median and p20/p80 over the timed steps after warm-up; memory: torch.cuda.max_memory_allocated over the timed steps
(weights included). A missing peer (Unsloth not installed) is reported as unavailable.

--device cpu runs every variant on a tiny shape for two steps, to check the script itself. Writes DIR/lora_step.json
and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import from the repository root only, so this folder never shadows a package.
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 16.0
LOSS_RTOL = 0.02

# name -> (description, needs a CUDA GPU)
VARIANTS = {
    "hf_peft": ("HF + PEFT", False),
    "ours_lora_only": ("ours: fused LoRA only (HF model unpatched)", False),
    "ours": ("ours: chronicals.apply + fused LoRA", False),
    "ours_ckpt": ("ours + gradient checkpointing", False),
    "unsloth": ("Unsloth, no gradient checkpointing", True),
    "unsloth_ckpt": ("Unsloth, use_gradient_checkpointing='unsloth'", True),
}
QUICK = ("hf_peft", "ours", "unsloth_ckpt")


def shape(device: str) -> dict:
    if device == "cuda":
        return dict(preset="llama-3.2-1b", batch=8, seq=2048)
    return dict(preset="tiny-llama", batch=2, seq=64)


def make_checkpoint(workdir: Path, device: str) -> Path:
    import torch

    from chronicals.data import default_tokenizer
    from chronicals.models import build_model

    out = workdir / "checkpoint"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = build_model(shape(device)["preset"], dtype=torch.bfloat16, seed=0)
    model.save_pretrained(out)
    default_tokenizer().save_pretrained(out)
    return out


def build(variant: str, checkpoint: Path, device: str):
    """The model to train for `variant` (adapters on, base frozen)."""
    import torch

    if variant.startswith("unsloth"):
        from unsloth import FastLanguageModel

        ckpt = "unsloth" if variant == "unsloth_ckpt" else False
        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(checkpoint), max_seq_length=shape(device)["seq"], dtype=torch.bfloat16,
            load_in_4bit=False, load_in_16bit=True, use_gradient_checkpointing=ckpt, random_state=0,
        )
        model = FastLanguageModel.get_peft_model(
            model, r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
            use_gradient_checkpointing=ckpt, random_state=0,
        )
        return model.train()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    torch.manual_seed(0)
    if variant == "hf_peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                lora_dropout=0.0, task_type="CAUSAL_LM")).train()
    import chronicals
    from chronicals.lora import LoRAConfig, apply_lora

    if variant in ("ours", "ours_ckpt"):
        # Dense rows of one sequence each: SDPA for every variant, so attention is the same kernel everywhere.
        chronicals.apply(model, packed_attention=False)
    if variant == "ours_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS)).train()


def run_variant(variant: str, checkpoint: Path, device: str, warmup: int, steps: int) -> dict:
    if variant.startswith("unsloth"):
        import unsloth  # noqa: F401  (first: it patches transformers at import)
    import torch

    from chronicals.optimizers import FusedAdamW

    s = shape(device)
    model = build(variant, checkpoint, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = FusedAdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (s["batch"], s["seq"]), generator=g).to(device)
    cuda = device == "cuda"

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss = float(step())
    for _ in range(warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    from benchmarks._timing import time_calls_ms

    times, last = time_calls_ms(step, steps, cuda=cuda)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    med = statistics.median(times)
    return {
        "first_loss": first_loss, "last_loss": float(last), "step_ms": med, "p20_ms": q[1], "p80_ms": q[7],
        "steps": steps,
        "tokens_per_s": s["batch"] * s["seq"] / (med * 1e-3),
        "peak_mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainable_params": sum(p.numel() for p in params),
    }


def _time_forward_backward(block, x, cuda: bool) -> tuple[float, float | None]:
    """Median ms of forward + backward (ones as output grads), and the peak memory it adds (GiB, CUDA only)."""
    import torch

    def fwd_bwd():
        outs = block(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    for _ in range(3):
        fwd_bwd()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    from benchmarks._timing import time_calls_ms

    times, _ = time_calls_ms(fwd_bwd, 10 if cuda else 2, cuda=cuda)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return statistics.median(times), extra


def layer_ops(device: str) -> list[dict]:
    """One layer's LoRA MLP and q/k/v/o projections (the model's sizes, all tokens of the batch), forward +
    backward, PEFT's eager path against our fused ops: time and the memory the pass adds (activations kept for
    the backward plus transients). Same adapters (bf16 base, fp32 adapters as apply_lora keeps them)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaMLP

    from chronicals.lora import install_fused
    from chronicals.models import preset_config

    s = shape(device)
    cfg = preset_config(s["preset"])
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    n = s["batch"] * s["seq"]
    cuda = device == "cuda"

    class Projections(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False)
            self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)

        def forward(self, x):
            return self.o_proj(self.q_proj(x)), self.k_proj(x), self.v_proj(x)

    rows = []
    for op, make in (("mlp", lambda: LlamaMLP(cfg)), ("qkvo", Projections)):
        for impl in ("peft", "ours"):
            torch.manual_seed(0)
            block = make()
            targets = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
            block = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), block)
            for name, p in block.named_parameters():
                p.data = p.data.to(device, torch.float32 if "lora_" in name else torch.bfloat16)
                p.requires_grad_("lora_" in name)
            if impl == "ours":
                install_fused(block)
            x = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
            ms, extra = _time_forward_backward(block, x, cuda)
            rows.append({"op": op, "impl": impl, "tokens": n, "ms": ms, "peak_extra_gib": extra})
            del block, x
            if cuda:
                torch.cuda.empty_cache()
    return rows


def child(args) -> None:
    try:
        row = {"status": "ok", **run_variant(args.variant, Path(args.checkpoint), args.device, args.warmup,
                                             args.steps)}
    except ImportError as e:
        row = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"}
    except Exception as e:  # reported as a row; the other variants still run
        oom = "out of memory" in str(e).lower()
        row = {"status": "oom" if oom else "crashed", "reason": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8)}
    Path(args.result).write_text(json.dumps(row))


def parent(args) -> None:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "lora_step_work"
    workdir.mkdir(exist_ok=True)
    checkpoint = make_checkpoint(workdir, device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the variants run in subprocesses: leave them the memory
    names = QUICK if args.quick else tuple(VARIANTS)
    warmup, steps = (2, 2) if device == "cpu" else ((3, 5) if args.quick else (4, 8))
    rows = []
    for name in names:
        desc, gpu_only = VARIANTS[name]
        row = {"variant": name, "description": desc, "device": device}
        if gpu_only and device != "cuda":
            row.update(status="unavailable", reason="needs a CUDA GPU")
        else:
            result = workdir / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", "--variant", name, "--checkpoint", str(checkpoint),
                   "--result", str(result), "--device", device, "--warmup", str(warmup), "--steps", str(steps)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                proc = subprocess.run(cmd, env=env, timeout=args.variant_timeout, capture_output=True, text=True)
                if result.exists():
                    row.update(json.loads(result.read_text()))
                else:
                    row.update(status="crashed", reason=f"exit {proc.returncode}: {proc.stderr[-1500:]}")
            except subprocess.TimeoutExpired:
                row.update(status="timeout", reason=f"over {args.variant_timeout}s")
        rows.append(row)
        print(f"{name}: {row.get('status')} {row.get('reason', '')[:300]}", flush=True)
    verify(rows)
    summary = summarize(rows)
    try:
        ops = layer_ops(device)
    except Exception as e:  # the per-layer numbers are a diagnostic; the step table stands without them
        ops = [{"status": "crashed", "reason": f"{type(e).__name__}: {e}"}]
    (out / "lora_step.json").write_text(json.dumps({"shape": shape(device), "rank": RANK, "alpha": ALPHA,
                                                    "targets": TARGETS, "rows": rows, "summary": summary,
                                                    "layer_ops": ops}, indent=2))
    print_ops(ops)
    print_table(rows, summary)


def verify(rows: list[dict]) -> None:
    """Every variant's first loss must match HF+PEFT's (all start from the same base model with B = 0)."""
    ref = next((r for r in rows if r["variant"] == "hf_peft" and r.get("status") == "ok"), None)
    if ref is None:
        return
    for r in rows:
        if r.get("status") == "ok":
            rel = abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
            r["loss_rel_diff_vs_hf_peft"] = rel
            if not math.isfinite(r["first_loss"]) or not math.isfinite(r["last_loss"]) or rel > LOSS_RTOL:
                r.update(status="failed-verification",
                         reason=f"first loss {r['first_loss']:.4f} vs HF+PEFT {ref['first_loss']:.4f}")


def summarize(rows: list[dict]) -> dict:
    """Like-for-like pairs (same checkpointing choice): speedup (peer step time / ours) and memory ratio
    (ours peak / peer peak; the target is speedup > 1 with a memory ratio <= 1)."""
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    summary = {}
    for ours, peer in (("ours", "hf_peft"), ("ours", "unsloth"), ("ours_ckpt", "unsloth_ckpt"),
                       ("ours_lora_only", "hf_peft")):
        if ours in ok and peer in ok:
            summary[f"speedup_{ours}_vs_{peer}"] = ok[peer]["step_ms"] / ok[ours]["step_ms"]
            mine, theirs = ok[ours]["peak_mem_alloc_gib"], ok[peer]["peak_mem_alloc_gib"]
            if mine and theirs:
                summary[f"memory_ratio_{ours}_vs_{peer}"] = mine / theirs
    return summary


def print_ops(ops: list[dict]) -> None:
    print("\none layer, forward + backward (PEFT eager vs our fused ops):")
    for r in ops:
        if "op" not in r:
            print(f"  layer ops: {r['status']}: {r['reason'][:200]}")
            continue
        mem = "-" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f} GiB"
        print(f"  {r['op']:<5} {r['impl']:<5} {r['ms']:>8.2f} ms  +{mem}")


def print_table(rows: list[dict], summary: dict) -> None:
    print(f"\nLoRA train step: {json.dumps(shape(rows[0]['device']))}, r={RANK} on {len(TARGETS)} projections")
    print(f"{'variant':<16} {'status':<20} {'step ms':>9} {'p20-p80':>15} {'tok/s':>9} {'peak GiB':>9} {'loss0':>8}")
    for r in rows:
        if r.get("status") == "ok":
            mem = r["peak_mem_alloc_gib"]
            print(f"{r['variant']:<16} {'ok':<20} {r['step_ms']:>9.1f} {r['p20_ms']:>7.1f}-{r['p80_ms']:<7.1f} "
                  f"{r['tokens_per_s']:>9.0f} {'-' if mem is None else f'{mem:.2f}':>9} {r['first_loss']:>8.4f}")
        else:
            print(f"{r['variant']:<16} {r.get('status', '?'):<20} {r.get('reason', '')[:80]}")
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/lora_step")
    p.add_argument("--quick", action="store_true", help="three variants (HF+PEFT, ours, Unsloth ckpt), fewer steps")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--variant-timeout", type=int, default=240)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
