"""Speed metrics from a run's per-step records: real tokens per second, step time, model TFLOP/s and MFU.

Tokens: a token counts when it is a loss term (a label after the causal shift, not padding, not ignore_index);
sum(len - 1) per step for any layout. Statistics: median over the timed steps (after warm-up), with p20 and p80.

FLOP convention (model FLOPs, per training step; recomputation is never counted):
- Matmul weights: N = the parameters of every linear layer, lm_head included (the embedding lookup and norms are
  not matmuls). Per token the model runs on (every position of a sequence: sum(len) per step, one more per
  sequence than the tokens counted above), forward 2N; backward 2N for activation gradients plus 2N for weight
  gradients. Full fine-tuning: 6N per token. LoRA: 4N for the frozen weights (no weight gradient) + 6 N_lora for
  the adapters.
- Attention (no weights): per layer and sequence of length L, forward QK^T and PV cost 2 * 2 * L^2 * H_q * d_head,
  halved for the causal mask; training is 3x forward: 6 * L^2 * H_q * d_head. Padding is not counted.
MFU = achieved model TFLOP/s / peak: the datasheet's dense bf16 peak for the GPU, and the matmul ceiling measured on
the same GPU in the same scenario run (harness/probe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from chronicals.training import flops


def datasheet_peak(gpu: str | None) -> float | None:
    """The datasheet dense bf16 peak of the GPU named `gpu`, TFLOP/s (chronicals' table: the most specific fragment of
    the name wins, "H100 NVL" over "H100"); None for a GPU not listed (no datasheet MFU is then reported)."""
    peak = flops.datasheet_peak_flops(gpu)
    return None if peak is None else peak / 1e12


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only transformer that set its FLOPs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        heads = cfg["num_attention_heads"]
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                   heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"])

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of the seven projections of one layer."""
        d, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projections()) + self.vocab * self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.projections())


def step_flops(shape: Shape, lengths: list[int], mode: str, lora_rank: int = 0) -> float:
    """Model FLOPs of one training step on sequences of these (unpadded) lengths."""
    if mode == "full":
        per_token = 6 * shape.linear_params()
    else:
        per_token = 4 * shape.linear_params() + 6 * shape.lora_params(lora_rank)
    attention = sum(6 * n * n * shape.heads * shape.head_dim for n in lengths) * shape.layers
    return float(per_token * sum(lengths) + attention)


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default method)."""
    s = sorted(values)
    if not s:
        raise ValueError("quantile of no values")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        return cls(quantile(values, 0.5), quantile(values, 0.2), quantile(values, 0.8))


def speed(timed: list[dict], flops_per_step: list[float], gpu: str | None, ceiling_tflops: float | None) -> dict:
    """Per-metric Summary from the timed steps' records ("time_ms", "real_tokens") and their model FLOPs. Tokens
    are the harness's own count from the data, never a backend's (verification checks the two agree)."""
    seconds = [r["time_ms"] / 1e3 for r in timed]
    tflops = [f / s / 1e12 for f, s in zip(flops_per_step, seconds)]
    out = {
        "tokens_per_s": Summary.of([r["real_tokens"] / s for r, s in zip(timed, seconds)]),
        "step_time_ms": Summary.of([r["time_ms"] for r in timed]),
        "tflops": Summary.of(tflops),
    }
    peak = datasheet_peak(gpu)
    if peak:
        out["mfu_datasheet"] = Summary.of([t / peak for t in tflops])
    if ceiling_tflops:
        out["mfu_measured"] = Summary.of([t / ceiling_tflops for t in tflops])
    return out
