"""The one training loop every backend runs: same batches, AdamW (fused on CUDA), same learning rate (no schedule),
gradient clipping, per-step timing (CUDA events on the GPU, wall clock on CPU). Loss and gradient norm are read
together once per step, after the step's end is recorded, so the read is not timed. After the last step (and the
memory peak's read) the first step's batch is evaluated once more, for verification."""

from __future__ import annotations

import time
from functools import partial

import torch

from . import data
from .backends import Trainable
from .nvml import ProcessMemory
from .weights import WeightSample


class _Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()

    def elapsed_ms(self) -> float:
        """Call after the step's results were read (which synchronises)."""
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._t1 - self._t0) * 1e3


def graph_pool_bytes() -> int:
    """Bytes that CUDA graphs' private memory pools hold beyond live tensors. A captured graph keeps the memory of
    the tensors it made (a layer's saved activations, for its next replay) after their Python tensors are freed, and
    the allocator stops counting it as allocated: max_memory_allocated alone would leave out a graphed backend's
    activations."""
    return sum(seg["total_size"] - seg["allocated_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def next_token_loss(model, sequences: list[torch.Tensor], device: str) -> float:
    """The mean cross-entropy of every token of `sequences` but each one's first given the tokens before it, computed
    here from the model's logits, one unpadded sequence at a time (no labels, so every backend runs its model's plain
    forward; chronicals' and the peers' fused losses run only with labels). A loss kernel that shifts its labels one
    too far, or a collator that hands it other labels, trains on a task as hard as the real one on random tokens: its
    loss and gradient norm stay within the per-step tolerances and its own loss on what it trained on falls as the
    reference's does; on the true next tokens it does not. The model it is given (`Trainable.model`) is the eager
    module, not a compiled wrapper, so no_grad does not recompile anything."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in sequences:
            ids = s.reshape(1, -1).to(device)
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
            count += s.numel() - 1
    return total / count


def packed_leak(forward, collate, sequences: list[torch.Tensor], device: str) -> float | None:
    """How much the loss of a packed row's last sequence moves when the sequences before it change (each reversed):
    the relative change, 0 when packed attention keeps the sequences apart. Labels before the last sequence are
    ignored, so the loss is the last sequence's alone. None with fewer than two sequences, or a batch that is not one
    packed row with labels. On random tokens a run whose sequences attend to each other trains no worse, so its loss,
    gradient norm and learnt-first-batch checks all pass; this looks at the isolation itself."""
    if len(sequences) < 2:
        return None
    changed = [s.flip(0) for s in sequences[:-1]] + [sequences[-1]]
    losses = []
    for seqs in (sequences, changed):
        batch = collate(seqs)
        if "labels" not in batch or batch["labels"].shape[0] != 1:
            return None
        batch["labels"] = batch["labels"].clone()
        batch["labels"][0, : batch["labels"].shape[1] - sequences[-1].numel()] = data.IGNORE_INDEX
        with torch.no_grad():
            losses.append(float(forward(data.to_device(batch, device)).float()))
    return abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12)


def train(trainable: Trainable, steps: list[list[torch.Tensor]], *, layout: str, device: str, lr: float,
          weight_decay: float, max_grad_norm: float, on_step=None) -> dict:
    """Train on `steps` (each a list of token sequences) and return per-step records and memory peaks:
    {"steps": [{"loss", "grad_norm", "time_ms", "label_tokens", "real_tokens", "processed_tokens"}],
     "first_batch_loss_after", "packed_leak" (packed layout only), "peak_mem_alloc_gib", "peak_mem_nvml_gib",
     "weights_changed", "trainable_params"}.
    `on_step(record)` sees each record."""
    params = list(trainable.params)
    if not params:
        raise ValueError("the backend handed the optimizer no trainable parameters")
    model = trainable.model
    forward = trainable.forward or (lambda batch: model(**batch).loss)
    collate = trainable.collate or partial(data.collate, layout=layout)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device == "cuda")
    sample = WeightSample(model)
    nvml = ProcessMemory() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.synchronize()
    timer = _Timer(device)
    records = []
    peak_alloc, pool_held = 0, 0
    for sequences in steps:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch = collate(sequences)
        record = {"label_tokens": data.label_tokens(batch), "real_tokens": data.real_tokens(sequences),
                  "processed_tokens": int(batch["input_ids"].numel())}
        batch = data.to_device(batch, device)
        timer.start()
        loss = forward(batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop()
        record["loss"], record["grad_norm"] = torch.stack(
            [loss.detach().float().reshape(()), grad_norm.detach().float().to(loss.device)]).tolist()
        record["time_ms"] = timer.elapsed_ms()
        if device == "cuda":
            nvml.sample()
            # The step's own peak plus what graph pools held through it (as before it: a step that captures graphs
            # counts their tensors while they are still allocated, and never twice).
            peak_alloc = max(peak_alloc, torch.cuda.max_memory_allocated() + pool_held)
            pool_held = graph_pool_bytes()
        records.append(record)
        if on_step is not None:
            on_step(record)
    peak_alloc = peak_alloc / 2**30 if device == "cuda" else None
    # The first batch again, after training: how much of it the model has learnt, judged by the harness's own loss on
    # the true next tokens (see next_token_loss), not by the backend's: a loss that trains on the wrong targets learns
    # them and its own loss on them falls as far as the reference's.
    first_batch_loss_after = next_token_loss(model, steps[0], device)
    return {
        "steps": records,
        "first_batch_loss_after": first_batch_loss_after,
        "packed_leak": packed_leak(forward, collate, steps[0], device) if layout == "packed" else None,
        "peak_mem_alloc_gib": peak_alloc,
        "peak_mem_nvml_gib": nvml.peak if nvml is not None else None,
        "weights_changed": sample.changed_fraction(),
        # Elements the optimizer updates, each tensor once (a tied weight may be listed twice).
        "trainable_params": sum(p.numel() for p in {id(p): p for p in params}.values()),
    }
