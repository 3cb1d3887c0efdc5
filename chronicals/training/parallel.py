"""Data parallelism over several processes (torchrun), on PyTorch's own engine: FSDP2 (`fully_shard`) or DDP.

FSDP2 shards weights, gradients and optimizer states: every decoder block is one unit (all-gathered just before
its forward and backward, freed after), and the root unit holds what is left: the final norm, the lm_head and,
when tied, the embedding. The lm_head must stay in the root unit because the fused linear cross-entropy reads
`self.lm_head.weight` inside the causal LM's forward without calling the lm_head module; a unit of its own would
never be gathered and the loss would see a shard. The root is gathered for the whole forward, so it sees [V, d].

Both wrappers AVERAGE gradients over ranks; the trainer multiplies each rank's loss by world_size
(`DistEnv.loss_scale`) so that the result is the sum over the global batch divided by its global token count.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from chronicals.config import ChronicalsConfig

from .build import SetupError
from .distributed import DistEnv, barrier

STRATEGIES = ("fsdp2", "ddp", "none")


def resolve_strategy(cfg: ChronicalsConfig, env: DistEnv) -> str:
    """The strategy this run uses: "none" for one process whatever the config says, else the configured one
    ("auto": FSDP2 for a full fine-tune, DDP for LoRA, whose few trainable weights are cheap to replicate)."""
    requested = cfg.distributed_strategy
    if not env.enabled:
        return "none"
    if requested == "none":
        raise SetupError(
            f"config field 'distributed_strategy' is 'none' but {env.world_size} processes were launched; each "
            "would train its own copy of the model. Use 'auto', 'fsdp2' or 'ddp', or launch one process"
        )
    strategy = ("ddp" if cfg.use_lora else "fsdp2") if requested == "auto" else requested
    if strategy == "fsdp2" and fully_shard_api() is None:
        raise SetupError(
            f"config field 'distributed_strategy' asks for FSDP2, but this PyTorch ({torch.__version__}) has no "
            "torch.distributed.fsdp.fully_shard (it needs torch >= 2.6); upgrade torch or use 'ddp'"
        )
    if strategy == "fsdp2" and cfg.mixed_precision == "fp16":
        raise SetupError("config field 'mixed_precision' is 'fp16', which this trainer's FSDP2 path does not "
                         "support (its gradient scaler would see sharded gradients); use 'bf16', or "
                         "distributed_strategy: ddp")
    return strategy


def fully_shard_api():
    """(fully_shard, MixedPrecisionPolicy) from this torch, or None when the build has no FSDP2."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        return None
    return fully_shard, MixedPrecisionPolicy


def micro_batch_size(cfg: ChronicalsConfig, env: DistEnv) -> int:
    """Rows per micro-batch on each rank: batch_size, or global_batch_size split over ranks and accumulation."""
    if cfg.global_batch_size is None:
        return cfg.batch_size
    per_step = env.world_size * cfg.gradient_accumulation_steps
    if cfg.global_batch_size % per_step:
        raise SetupError(
            f"config field 'global_batch_size' is {cfg.global_batch_size}, which {env.world_size} process(es) x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} do not divide; use a multiple of "
            f"{per_step} (e.g. {per_step * max(1, round(cfg.global_batch_size / per_step))})"
        )
    return cfg.global_batch_size // per_step


def wrap(model: nn.Module, strategy: str, device: torch.device, compute_dtype: torch.dtype | None) -> nn.Module:
    """Apply `strategy` and return the module to call for the forward. FSDP2 changes `model` in place (its
    parameters become DTensor shards, so build the optimizer afterwards); DDP returns a wrapper around it."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        shard_fsdp2(model, compute_dtype)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}; one of {STRATEGIES}")


def shard_fsdp2(model: nn.Module, compute_dtype: torch.dtype | None) -> None:
    fully_shard, MixedPrecisionPolicy = fully_shard_api()
    # fully_shard keeps each rank's own slice of its own copy: ranks whose models differ (built or initialised with
    # another seed, new embedding rows drawn per rank) trained a patchwork of them, with no error. DDP broadcasts rank
    # 0's model at construction; so does this, and both strategies train rank 0's model.
    broadcast_from_rank0(model)
    # Weights are gathered in the compute dtype; gradients are reduced in fp32 so that summing over ranks loses
    # nothing, and land on the fp32 master shards.
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else \
        MixedPrecisionPolicy()
    blocks = decoder_blocks(model)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if not tied:
        # An untied embedding table is called as a module, so it can be its own unit and be freed after use.
        fully_shard(embedding, mp_policy=policy)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's (in place; a collective every rank joins)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # each shared (tied) tensor once
            dist.broadcast(tensor.detach(), src=0)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers, found by the class names transformers lists in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise SetupError(
            f"FSDP2 found no decoder blocks in {type(base).__name__} (its _no_split_modules is {sorted(names)}); "
            "use distributed_strategy: ddp for this model"
        )
    return blocks


def gradient_sync(forward_model: nn.Module, sync: bool):
    """During gradient accumulation DDP need not all-reduce until the last micro-batch. FSDP2 keeps
    reduce-scattering every micro-batch, so gradients stay sharded (skipping would hold them whole)."""
    from torch.nn.parallel import DistributedDataParallel

    # use_torch_compile wraps the DDP module (an OptimizedModule holding it as _orig_mod): look through it, or
    # every micro-batch would be all-reduced.
    forward_model = getattr(forward_model, "_orig_mod", forward_model)
    if not sync and isinstance(forward_model, DistributedDataParallel):
        return forward_model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def main_first(env: DistEnv):
    """Rank 0 runs the block first (tokenizing and caching the data once), then the others, which find its cache
    instead of repeating the work. Rank 0 releases them even when the block raises; they then meet the same error."""
    if not env.enabled:
        yield
        return
    if not env.is_main:
        barrier(env)
    try:
        yield
    finally:
        if env.is_main:
            barrier(env)


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one small all-reduce; the flag itself on one process)."""
    if not env.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that also takes FSDP2's sharded gradients: the norm of DTensor shards is reduced over
    ranks into one plain tensor (the whole model's norm) before the gradients are scaled by it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has no public DTensor, and no FSDP2 either
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.nn.utils.get_total_norm(grads, foreach=True).full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
