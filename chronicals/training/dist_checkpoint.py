"""Checkpoints of an FSDP2 run: every rank writes its own shards of the weights and optimizer states with
torch.distributed.checkpoint (DCP) into `checkpoint-<step>/shards/`; rank 0 adds the scheduler, RNG and trainer
state beside them, in the same layout and with the same atomic rename as checkpoint.py. The directory must be
on a file system that every rank sees (one node, or a shared file system across nodes).

Such a checkpoint is for resuming with the same number of processes; the model a user takes away is the one
export.py writes at the end (or `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` on the shards).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import checkpoint
from .build import SetupError
from .distributed import DistEnv, barrier

SHARDS = "shards"


def save_sharded(output_dir: str | Path, step: int, *, model: nn.Module, optimizer, scheduler,
                 trainer_state: dict[str, Any], env: DistEnv, keep: int | None = None,
                 rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. `rng_states` (rank 0's argument is the
    one written): every rank's random generator states, in rank order."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(env)  # the directory exists before any rank writes into it
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDS))
    barrier(env)  # every rank's shards are written before rank 0 seals the directory
    if env.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(checkpoint._rng_file(rng_states), tmp / "rng_state.pt")
        (tmp / checkpoint.STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        checkpoint._fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        checkpoint._fsync_dir(out)
        if keep is not None:
            checkpoint.rotate(out, step, keep)
    barrier(env)
    return final


def load_sharded(path: str | Path, *, model: nn.Module, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    """Collective: restore what save_sharded wrote into the live (already sharded) model and optimizer, and rank
    `rank`'s random generator states."""
    path = Path(path)
    # get_state_dict gives tensors of the right sharding for DCP to read into (it initialises empty optimizer
    # states first); set_state_dict puts them back.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDS))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    checkpoint._set_rng_state(torch.load(path / "rng_state.pt", map_location="cpu", weights_only=False), rank)
    return checkpoint.read_state(path)


def check_resumable(path: str | Path, env: DistEnv, strategy: str) -> None:
    """Refuse a checkpoint that this launch cannot continue exactly: another number of processes (the data order
    and the shards depend on it), or sharded vs whole weights."""
    path = Path(path)
    saved = checkpoint.read_state(path)
    saved_world = saved.get("world_size", 1)  # checkpoints from before multi-GPU support are single-process
    if saved_world != env.world_size:
        raise SetupError(
            f"checkpoint {str(path)!r} was saved by {saved_world} process(es) but this run has {env.world_size}; "
            f"resume with the same number (torchrun --nproc_per_node={saved_world} ... on one node), because the "
            "data order and the sharded states depend on it"
        )
    sharded = (path / SHARDS).is_dir()
    if sharded != (strategy == "fsdp2"):
        what = "FSDP2 shards" if sharded else "whole weights (one process or DDP)"
        raise SetupError(
            f"checkpoint {str(path)!r} holds {what} but this run uses distributed_strategy {strategy!r}; resume "
            f"with the strategy it was saved with ({'fsdp2' if sharded else 'ddp'})"
        )
