"""Backends: one small module each behind one interface. A backend builds the model to train (from the scenario's
checkpoint) and names the parameters to optimise; the loop, optimizer, data and timing belong to the harness, so
every backend runs the same loop (harness/loop.py).

The registry maps a name to "module:Class". `register` adds one (tests register planted-fault backends this way);
the runner passes the "module:Class" string to each run's subprocess, which imports it there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REGISTRY: dict[str, str] = {
    "torch": "harness.backends.torch:TorchBackend",
    "torch_compile": "harness.backends.torch_compile:TorchCompileBackend",
    "liger": "harness.backends.liger:LigerBackend",
    "unsloth": "harness.backends.unsloth:UnslothBackend",
    "chronicals": "harness.backends.chronicals:ChronicalsBackend",
}


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (peer not installed, no GPU, feature missing); becomes an 'unavailable' row."""


@dataclass(frozen=True)
class BuildSpec:
    """What a backend needs to build its model, all taken from the scenario (the same for every backend)."""

    checkpoint: str  # directory with the seeded initial weights (save_pretrained) and a tokenizer
    model_type: str  # the HF config's model_type, e.g. "qwen2"
    device: str
    dtype: str
    mode: str  # "full" | "lora"
    lora_rank: int
    lora_alpha: int
    seq_len: int
    seed: int
    layout: str  # "padded" | "packed"
    flags: dict[str, bool] = field(default_factory=dict)


@dataclass
class Trainable:
    """A model ready to train. `forward(batch)` returns the scalar loss; `collate(sequences)` makes the batch from
    one step's token sequences (lists of ids). The loop counts tokens on the collated labels."""

    model: Any
    params: list  # what the harness's optimizer steps (the trainable parameters)
    forward: Callable[[dict], Any] | None = None
    collate: Callable[[list], dict] | None = None


class Backend:
    """Base of every backend. FLAGS: the switchable optimizations and their defaults (an ablation is a list of flag
    sets); LAYOUTS: the batch layouts it can train on."""

    FLAGS: dict[str, bool] = {}
    LAYOUTS: tuple[str, ...] = ("padded",)

    def build(self, spec: BuildSpec) -> Trainable:
        raise NotImplementedError


def register(name: str, target: str) -> None:
    """Register backend `name` as "module:Class" (the class must subclass Backend)."""
    if ":" not in target:
        raise ValueError(f"backend target {target!r} must be 'module:Class'")
    REGISTRY[name] = target


def backend_names() -> list[str]:
    return list(REGISTRY)


def backend_class(name_or_target: str) -> type[Backend]:
    """The Backend subclass for a registered name or a "module:Class" target. Importing it imports no peer library:
    backends import theirs inside build()."""
    target = REGISTRY.get(name_or_target, name_or_target)
    if ":" not in target:
        raise ValueError(f"unknown backend {name_or_target!r}; choose from: {', '.join(REGISTRY)}")
    module, cls = target.split(":", 1)
    return getattr(importlib.import_module(module), cls)


def require(module: str, backend: str):
    """Import a peer library, or raise BackendUnavailable naming it."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # a peer can fail at import for reasons other than ImportError (CUDA checks, versions)
        raise BackendUnavailable(f"{backend}: cannot import {module} ({type(e).__name__}: {e})") from e
