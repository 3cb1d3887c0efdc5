"""Learning-rate schedule: linear warmup from 0, then cosine or linear decay (or constant) to a floor.

    warmup (s < W):   lr(s) = base * (s + 1) / W                      (step 0 already trains, at base / W)
    decay  (s >= W):  p = (s - W) / max(1, T - W),  lr = base * (r + (1 - r) * f(p)),  r = min_lr_ratio
                      cosine: f(p) = (1 + cos(pi * p)) / 2;  linear: f(p) = 1 - p;  constant: f(p) = 1
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    f = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return min_lr_ratio + (1.0 - min_lr_ratio) * f


class _Schedule(torch.optim.lr_scheduler.LambdaLR):
    def load_state_dict(self, state_dict: dict) -> None:
        # LambdaLR restores the step count and base lrs but leaves each group's lr as the optimizer state saved it:
        # the value of the schedule the checkpoint was trained on. A resume with another max_steps, warmup or
        # schedule then took its first step at the old schedule's lr. This schedule's value at the restored step
        # is set now (the same number when nothing changed).
        super().load_state_dict(state_dict)
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):  # a tensor lr is updated in place, as LambdaLR.step does
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = lrs


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule {schedule!r} is not one of 'cosine', 'linear', 'constant'")
    return _Schedule(
        optimizer,
        lambda s: lr_factor(s, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                            min_lr_ratio=min_lr_ratio),
    )
