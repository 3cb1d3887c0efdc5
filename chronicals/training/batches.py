"""From prepared rows to optimizer steps: each epoch shuffle the rows with a generator seeded by (seed, epoch), cut
them into micro-batches, give each rank its share and group `gradient_accumulation_steps` micro-batches into a step.

Everything is a pure function of (rows, settings, epoch), so a resumed run re-creates the same order and
skips to the saved position, and every rank agrees on the order without communicating.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import distributed
from .distributed import DistEnv


class StepPlan:
    """`units` are packed rows or fitted sequences (prepare_training_data's rows); `collate` batches a list of
    them. One micro-batch is `batch_size` units."""

    def __init__(self, units: Sequence[Any], collate, *, batch_size: int, gradient_accumulation_steps: int,
                 seed: int, env: DistEnv | None = None):
        self.units = units
        self.collate = collate
        self.batch_size = batch_size
        self.accumulation = gradient_accumulation_steps
        self.seed = seed
        self.env = env = env or DistEnv()
        # A micro-batch spans every rank: the batch_size x world_size rows that one process would take as one
        # micro-batch, split over the ranks. A last, shorter one is kept, as one process keeps it; a rank it gives no
        # row runs a stand-in row with no label (`_micro_batch`). Likewise the epoch's last step takes the micro-batches
        # left over when gradient_accumulation_steps does not divide them (as HF Trainer does): every row is trained
        # on each epoch, and batch_size 4 x 2 micro-batches takes the steps of batch_size 8 (each step's loss is
        # normalised by its own label tokens, so a shorter step is exact too).
        self.rows_per_micro_batch = batch_size * env.world_size
        micro_batches = -(-len(units) // self.rows_per_micro_batch)
        self.steps_per_epoch = -(-micro_batches // self.accumulation)
        if self.steps_per_epoch == 0:
            raise ValueError("the dataset gives no rows, so there is nothing for an optimizer step to train on")

    def epoch_steps(self, epoch: int, start: int = 0) -> Iterator[list[dict[str, Any]]]:
        """This rank's optimizer steps of `epoch` from step `start` on; each is a list of collated micro-batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.units), generator=g).tolist()
        size = self.rows_per_micro_batch
        groups = [order[i:i + size] for i in range(0, len(order), size)]
        for step in range(start, self.steps_per_epoch):
            chunk = groups[step * self.accumulation:(step + 1) * self.accumulation]
            yield [self._micro_batch(group) for group in chunk]

    def _micro_batch(self, group: list[int]) -> dict[str, Any]:
        """This rank's share of one micro-batch's rows, collated. A last micro-batch with fewer rows than processes
        leaves some ranks none: such a rank still runs a forward and backward (FSDP2's and DDP's collectives need
        every rank), on the micro-batch's first row with every label ignored, so it adds nothing to the loss, the
        gradients or the token count."""
        mine = distributed.shard(group, self.env)
        if mine:
            return self.collate([self.units[i] for i in mine])
        batch = self.collate([self.units[group[0]]])
        batch["labels"] = torch.full_like(batch["labels"], getattr(self.collate, "ignore_index", -100))
        batch["num_label_tokens"] = 0
        return batch
