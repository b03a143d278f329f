"""Which pairs each rank sees at each step, and with what weight.

One global batch of G = micro_batch x accumulation x world pairs is drawn per optimizer step from
a per-epoch permutation (seeded by seed + epoch), so the pairs of a step do not depend on how
the batch is split. The global batch is cut into world x accumulation micro-batches; every pair
of an epoch appears exactly once, the last, smaller batch included.

Each pair carries the weight world x accumulation / n_step (n_step = pairs in this global batch).
DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks, so the
weighted sum each micro-batch back-propagates yields exactly the mean over the global batch,
however it is split. A micro-batch left empty by a short last batch gets one pair with weight 0,
so every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # rows of the pairs dataset
    weights: list[float]  # per-pair loss weight (0 for padding)


@dataclass(frozen=True)
class BatchPlan:
    num_pairs: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.global_batch)

    def total_steps(self, max_steps: int | None, epochs: int) -> int:
        """Optimizer steps of a run: `max_steps`, else whole epochs."""
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def data_order(self, step: int) -> dict[str, int]:
        """Where a run is in its data after `step` steps; with the seed, these fix the batches."""
        epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
        return {
            "num_pairs": self.num_pairs,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
        }

    def permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_pairs, generator=gen).tolist()

    def step(self, step: int) -> list[MicroBatch]:
        """Micro-batches of this rank for 0-based optimizer step `step` (epochs wrap around)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        batch = perm[within * self.global_batch : (within + 1) * self.global_batch]
        chunks = split_evenly(batch, self.accumulation * self.world_size)
        weight = self.accumulation * self.world_size / len(batch)
        out = []
        for k in range(self.accumulation):
            chunk = chunks[k * self.world_size + self.rank]
            if chunk:
                out.append(MicroBatch(chunk, [weight] * len(chunk)))
            else:
                out.append(MicroBatch([batch[0]], [0.0]))
        return out


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """`parts` consecutive chunks whose sizes differ by at most one (trailing ones may be empty)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out


def eval_shards(num_pairs: int, batch_size: int, world_size: int, rank: int) -> list[MicroBatch]:
    """This rank's eval batches: a strided share of the rows, padded to the same batch count on
    every rank (padding rows have weight 0 and are not counted)."""
    mine = list(range(rank, num_pairs, world_size))
    per_rank = math.ceil(math.ceil(num_pairs / world_size) / batch_size)
    out = []
    for b in range(per_rank):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        out.append(MicroBatch(chunk, [1.0] * len(chunk)) if chunk else MicroBatch([0], [0.0]))
    return out
