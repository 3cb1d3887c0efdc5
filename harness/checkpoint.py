"""The same initial weights for every backend: a preset is built once per scenario run from its seed and saved
(safetensors, save_pretrained) with a tokenizer into a work directory every run loads from; Unsloth's loader needs a
path with a tokenizer anyway. A scenario naming a local checkpoint uses it as it is."""

from __future__ import annotations

import json
from pathlib import Path

from .scenario import Scenario


def prepare(scenario: Scenario, workdir: Path) -> Path:
    if scenario.model.path is not None:
        return Path(scenario.model.path)
    import torch

    from chronicals.data import default_tokenizer
    from chronicals.models.presets import build_model

    out = Path(workdir) / "checkpoint"
    model = build_model(scenario.model.preset, dtype=getattr(torch, scenario.model.dtype), seed=scenario.seed)
    model.save_pretrained(out)
    default_tokenizer().save_pretrained(out)
    return out


def config(checkpoint: Path) -> dict:
    with open(Path(checkpoint) / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg)
