"""LoRAConfig: the adapter settings, validated when made (the model-dependent checks run in apply_lora)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Every linear layer of the supported decoder blocks (Llama, Qwen2/3, Mistral): attention and MLP.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT's shorthand for every linear layer except the output head (lm_head).
ALL_LINEAR = "all-linear"
# peft.LoraConfig's names for this class's fields, for the error a PEFT user's keywords get.
PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


@dataclass
class LoRAConfig:
    """LoRA / DoRA adapter settings.

    rank: r of A [r, in] and B [out, r]. alpha: scale numerator; the update is (alpha / rank) * B A, or
    (alpha / sqrt(rank)) * B A with `use_rslora`. dropout: on the adapter input; any value above 0 uses PEFT's
    plain (unfused) forward. target_modules: module-name suffixes, e.g. "q_proj" matches
    "model.layers.0.self_attn.q_proj", or "all-linear" (PEFT's shorthand: every linear layer but the output
    head). use_dora: weight-decomposed LoRA (nn.Linear layers only). fused: use the
    fused autograd paths where they apply (dropout 0 in training, adapters active and unmerged). fused_kconcat
    (needs `fused`; off by default until measured on the GPU): the fused LoRA forwards fold the low-rank term
    into the base matmul along K, Y = [X | X A^T] @ [W | s B]^T (q/k/v and gate/up each as one such matmul), instead
    of adding s (X A^T) B^T to X W^T in a second pass over the output; one rounding per output element instead of
    two, the same parameters, saved tensors and backward (chronicals.kernels.lora). The q/k/v outputs are then
    column views of one buffer which, like torch.split's outputs, may not be modified in place.
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | tuple[str, ...] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    use_rslora: bool = False
    use_dora: bool = False
    fused: bool = True
    fused_kconcat: bool = False

    def __new__(cls, *args, **kwargs):
        # LoRAConfig(r=16, lora_alpha=32) otherwise fails in the generated __init__ with a bare TypeError.
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in fields:
                hint = f"; peft.LoraConfig's {key!r} is {PEFT_NAMES[key]!r} here" if key in PEFT_NAMES else ""
                raise TypeError(f"LoRAConfig has no field {key!r}{hint} (fields: {', '.join(sorted(fields))})")
        return super().__new__(cls)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        # Finite too: NaN fails every comparison, and a NaN or infinite scale turns every adapted output NaN / inf.
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRAConfig.alpha must be a finite positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        targets = list(self.target_modules) if isinstance(self.target_modules, (list, tuple, set)) else []
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"LoRAConfig.target_modules must be a non-empty list of module names such as "
                f"{list(DEFAULT_TARGET_MODULES)}, got {self.target_modules!r}"
            )
        if any(t.lower() == ALL_LINEAR for t in targets):
            if len(targets) != 1:
                raise ValueError(
                    f"LoRAConfig.target_modules {targets!r}: {ALL_LINEAR!r} already names every linear layer but the "
                    f"output head; pass it alone (target_modules={ALL_LINEAR!r}) or list module names instead"
                )
            targets = [ALL_LINEAR]
        self.target_modules = targets
        for name in ("use_rslora", "use_dora", "fused", "fused_kconcat"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LoRAConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.fused_kconcat and not self.fused:
            raise ValueError("LoRAConfig.fused_kconcat=True selects a forward of the fused paths; it needs fused=True")

    @property
    def scale(self) -> float:
        """The factor s in W + s * B A."""
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)
