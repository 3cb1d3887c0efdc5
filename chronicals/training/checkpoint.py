"""Checkpoints: `output_dir/checkpoint-<step>/` with the model (or only the trainable weights, for LoRA) as
safetensors, the optimizer, the scheduler, every RNG state and the data position.

Atomic: everything is written into a hidden `.checkpoint-<step>.tmp` directory which is renamed to its final name
as the last act (rename is atomic on POSIX), so a crash mid-write leaves only a hidden temporary directory that
`find_latest` ignores and the next save removes, never a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_FILE = "trainer_state.json"
# A full fine-tune's weights are the whole model (HF names, so the directory loads with from_pretrained once
# config.json is beside them); with frozen weights (LoRA) only the trainable ones are kept.
FULL_WEIGHTS = "model.safetensors"
TRAINABLE_WEIGHTS = "trainable.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(output_dir: str | Path, step: int, *, model: nn.Module, optimizer, scheduler,
                    trainer_state: dict[str, Any], export_model=None, scaler=None, keep: int | None = None,
                    rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` atomically and return its path. `export_model(directory)`, when given, writes the
    user-facing files (config.json, or a PEFT-format adapter); the trainable weights always go to
    model.safetensors (full fine-tune) or trainable.safetensors, which is what resuming reads back.
    `rng_states`: every rank's `_rng_state()` in rank order, when several processes train."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_trainable_state(model), str(tmp / _weights_file(model)))
    if export_model is not None:
        export_model(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(_rng_file(rng_states), tmp / "rng_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(out)
    if keep is not None:
        rotate(out, step, keep)
    return final


def rotate(output_dir: str | Path, step: int, keep: int) -> None:
    """Keep checkpoint `step` (just written) and the newest `keep - 1` before it. Later-numbered checkpoints were
    left in output_dir by another run (a fresh start there, or a resume from an earlier checkpoint): ranked by step
    with them, the checkpoint just written would be deleted at once, so they are neither counted nor removed."""
    earlier = [p for p in list_checkpoints(output_dir) if _step(p) < step]
    for old in earlier[:max(0, len(earlier) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()), key=_step)


def _step(checkpoint_dir: Path) -> int:
    return int(_NAME.match(checkpoint_dir.name).group(1))


def find_latest(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve(resume_from: str, output_dir: str | Path) -> Path:
    """The checkpoint directory that `resume_from_checkpoint` names ("latest" means the newest in output_dir)."""
    if resume_from == "latest":
        path = find_latest(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint is 'latest' but {str(output_dir)!r} holds no complete checkpoint-<step>/"
            )
        return path
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint {resume_from!r} is not a complete checkpoint directory (no {STATE_FILE}); "
            "pass a checkpoint-<step>/ directory or 'latest'"
        )
    return path


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer, scheduler, scaler=None,
                    rank: int = 0) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into the live objects (the random generators: rank `rank`'s);
    returns the trainer state."""
    path = Path(path)
    weights_path = path / _weights_file(model)
    if not weights_path.is_file():
        raise ValueError(
            f"checkpoint {str(path)!r} has no {weights_path.name}: it was saved with different LoRA settings "
            "(full fine-tune vs adapters); resume with the settings it was saved with"
        )
    weights = load_file(str(weights_path), device="cpu")
    expected = _trainable_state(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    # Same names, other shapes (another lora_rank or model_kwargs): copy_ would fail with a bare size mismatch.
    reshaped = sorted(f"{n} {tuple(weights[n].shape)} vs {tuple(expected[n].shape)}"
                      for n in set(expected) & set(weights) if weights[n].shape != expected[n].shape)
    if reshaped:
        raise ValueError(
            f"checkpoint {str(path)!r} holds weights of other shapes than this model's (saved vs now: "
            f"{reshaped[:3]}); resume with the same model and LoRA settings it was saved with (lora_rank, model_kwargs)"
        )
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match this model's trainable weights (missing: {missing[:5]}, "
            f"unexpected: {unexpected[:5]}); resume with the same model and LoRA settings it was saved with"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / "rng_state.pt", map_location="cpu", weights_only=False), rank)
    return read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: its position, world size, the config it trained with and its data."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def _weights_file(model: nn.Module) -> str:
    return FULL_WEIGHTS if all(p.requires_grad for p in model.parameters()) else TRAINABLE_WEIGHTS


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights appear once (named_parameters de-duplicates shared tensors); copies to CPU, contiguous, because
    # safetensors refuses views and shared storage.
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _rng_file(rng_states: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What rng_state.pt holds: this process's generator states and, from several processes, every rank's in rank
    order under "ranks" (each rank's generators move on by its own batches: dropout masks of their shapes)."""
    state = _rng_state()
    if rng_states is not None and len(rng_states) > 1:
        state["ranks"] = rng_states
    return state


def _set_rng_state(state: dict[str, Any], rank: int = 0) -> None:
    state = state["ranks"][rank] if "ranks" in state else state
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    # Flush file contents and directory entries, so the rename that follows cannot outrun the data on a crash.
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
