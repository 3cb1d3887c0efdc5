"""Process-group concerns, kept out of the trainer's loop: torchrun detection, process-group setup, the split of
data across ranks, and the reductions the loop needs (the global valid-token count, metrics for logging).

One process (no torchrun) is the world-size-1 case of the same code: every helper is then a no-op.
Gradient reduction itself (FSDP2 / DDP wrapping) belongs to the wrapper that issue 10 adds; those wrappers
AVERAGE gradients over ranks, so `loss_scale` tells the loop to multiply each rank's loss by world_size,
which turns the average back into the sum the global token normalisation needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .build import SetupError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def loss_scale(self) -> float:
        return float(self.world_size)


def detect() -> DistEnv:
    """Rank, world size and local rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or from the
    process group when one is already initialized."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise RuntimeError(f"torchrun environment variables RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if dist.is_available() and dist.is_initialized():
        # A process group the caller started itself (torch.multiprocessing + init_process_group, which need not set
        # these variables): its rank and size are the truth. Read from the environment alone, each process would
        # train a model of its own as world size 1, all of them writing into the same output_dir.
        group_rank, group_world = dist.get_rank(), dist.get_world_size()
        if "WORLD_SIZE" in os.environ and (rank, world) != (group_rank, group_world):
            raise RuntimeError(f"the environment says RANK={rank}, WORLD_SIZE={world} but the initialized process "
                               f"group has rank {group_rank} of {group_world}")
        return DistEnv(rank=group_rank, world_size=group_world,
                       local_rank=int(os.environ.get("LOCAL_RANK", str(group_rank))))
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def setup(env: DistEnv, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA, gloo for CPU) when launched by torchrun with more than one process."""
    if not env.enabled:
        return
    if device.type == "cuda":
        # Under a process group the caller started too: NCCL's object collectives (the RNG states gathered for a
        # checkpoint, the config check) run on the current device, cuda:0 on every rank unless it is set.
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                            world_size=env.world_size)


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(env: DistEnv, requested: str) -> torch.device:
    """The device this rank trains on: its local GPU under torchrun, else cuda:0 or cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SetupError("config field 'device' is 'cuda' but no CUDA GPU is visible; use device: auto or cpu")
    if env.enabled and env.local_rank >= torch.cuda.device_count():
        raise SetupError(f"this process has LOCAL_RANK={env.local_rank} but the node shows only "
                         f"{torch.cuda.device_count()} CUDA GPU(s); start at most that many processes per node "
                         "(torchrun --nproc_per_node), or set device: cpu")
    return torch.device("cuda", env.local_rank if env.enabled else torch.cuda.current_device())


def shard(items: list, env: DistEnv) -> list:
    """This rank's share of `items` (same order on every rank): a contiguous slice, the slices of the ranks in rank
    order making up `items` without duplication; their lengths differ by at most one (empty when there are fewer
    items than ranks)."""
    return items[env.rank * len(items) // env.world_size:(env.rank + 1) * len(items) // env.world_size]


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `t` over ranks (in place; returns it). Identity on one process."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_count(n: int, env: DistEnv, device) -> int:
    """The sum of the integer `n` over ranks, exact: an int64 sum (one in fp32 rounds past 2**24, so a step of more
    label tokens than that would be normalised by a count that differs from the true one)."""
    if not env.enabled:
        return n
    return int(all_reduce_sum(torch.tensor(n, dtype=torch.int64, device=device), env).item())


def gather_object(obj, env: DistEnv) -> list | None:
    """`obj` of every rank in rank order, on rank 0 (None on the others); [obj] on one process."""
    if not env.enabled:
        return [obj]
    gathered = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def check_same_on_every_rank(what: str, values: dict[str, Any], env: DistEnv) -> None:
    """Every rank must hold the same `values` (a dict of plain values): a SetupError, raised on every rank, naming
    each key that differs and every rank's value. Ranks that disagree on the settings or the data silently train on
    a mix of them (another learning rate per shard, another seed drawing another data order, so rows are trained
    twice or never) or wait in a collective the others never join until the timeout."""
    if not env.enabled:
        return
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, values)
    differ = [k for k in values if any(other.get(k) != gathered[0].get(k) for other in gathered)]
    if differ:
        raise SetupError(
            f"{what} differs between the processes: "
            + "; ".join(f"{k!r} is {_by_rank([v.get(k) for v in gathered])}" for k in differ)
            + ". Every process must run the same config on the same data (torchrun starts the same command on each "
            "node)"
        )


def _by_rank(values: list) -> str:
    """'3 on rank 0, 4 on ranks 1, 2, 3': each distinct value once, with the ranks that hold it."""
    ranks: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        ranks.setdefault(repr(v), []).append(r)
    return ", ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs[:8]))}"
                     f"{', ...' if len(rs) > 8 else ''}" for v, rs in ranks.items())


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
