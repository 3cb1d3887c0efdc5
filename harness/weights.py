"""Did training change the model? A fixed random sample of every trainable weight of the MODEL (not of whatever the
optimizer was handed: an optimizer stepping copies that never reach the model is exactly the fault to catch) is kept
before training and compared after it."""

from __future__ import annotations

import torch

SAMPLE = 1024  # elements per tensor: enough to see an update, small enough to keep on the device


class WeightSample:
    def __init__(self, model, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.entries = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            n = p.numel()
            idx = torch.randint(0, n, (min(n, SAMPLE),), generator=g).to(p.device)
            self.entries.append((name, p, n, idx, p.detach().reshape(-1)[idx].clone()))

    def changed_fraction(self) -> float:
        """Fraction of the sampled trainable weights that differ now, each tensor weighted by its size (so a large
        projection counts more than a norm weight, which bf16 often cannot move at small learning rates)."""
        total = sum(n for _, _, n, _, _ in self.entries)
        if total == 0:
            return 0.0
        moved = 0.0
        for _, p, n, idx, before in self.entries:
            moved += n * (p.detach().reshape(-1)[idx] != before).float().mean().item()
        return moved / total
