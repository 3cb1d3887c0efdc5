"""Where a run's metrics go: `output_dir/metrics.jsonl` (one row per optimizer step and per evaluation), a progress
bar (loss, tokens/s, lr, ETA), a console line every `logging_steps`, and TensorBoard when asked. Only rank 0 writes
anything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, total_steps: int, initial_step: int = 0, logging_steps: int = 10,
                 progress_bar: bool = True, tensorboard: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.logging_steps = logging_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the same file; rows past the checkpoint (from the interrupted run) are dropped so
        # that every step appears once.
        if initial_step and self.path.is_file():
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= initial_step]
            self.path.write_text("".join(r + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "config field 'tensorboard' is true but the tensorboard package is missing: "
                    "pip install 'chronicals[tensorboard]' (or set tensorboard: false)"
                ) from e
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = metrics["step"]
        self._write_row(metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                 lr=f"{metrics['lr']:.2e}", refresh=False)
        if step % self.logging_steps == 0 or step == 1:
            self.message(
                f"step {step:>6}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                f"grad_norm {metrics['grad_norm']:.3f}  tokens/s {metrics['tokens_per_s']:.0f}"
            )

    def log_eval(self, metrics: dict[str, Any]) -> None:
        """An evaluation's row (step, eval_loss, eval_perplexity, eval_tokens, eval_time_s) in metrics.jsonl beside
        the steps' rows, a console line, and TensorBoard's eval/ scalars."""
        if not self.enabled:
            return
        step = metrics["step"]
        self._write_row(metrics)
        if self.writer is not None:
            for key in ("eval_loss", "eval_perplexity"):
                self.writer.add_scalar(f"eval/{key.removeprefix('eval_')}", metrics[key], step)
        self.message(f"step {step:>6}  eval_loss {metrics['eval_loss']:.4f}  eval_perplexity "
                     f"{metrics['eval_perplexity']:.2f}  ({metrics['eval_tokens']} tokens, "
                     f"{metrics['eval_time_s']:.1f} s)")

    def _write_row(self, metrics: dict[str, Any]) -> None:
        """One row of metrics.jsonl, flushed at once: a crash loses no logged step."""
        self.file.write(json.dumps({k: _json_value(v) for k, v in metrics.items()}) + "\n")
        self.file.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()


def _json_value(v):
    # JSON has no NaN/inf; a diverged step is still worth a row, with the value as a string.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
