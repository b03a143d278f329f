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

With `loss.k_way` (all_pairs, chosen_vs_rest) the unit a plan draws, permutes and splits is a
row of K responses (its pairs, `units`) instead of a pair: a micro-batch holds whole rows, so each
row's responses (and with prefix sharing its prompt) are computed once, and every pair weighs
world x accumulation / n_step pairs as above, so the loss is again the mean over the step's pairs.

`TokenBudgetPlan` is the token-budget alternative (`trainer.max_tokens_per_micro_batch`): the
micro-batches hold about the same number of real tokens instead of the same number of pairs
(`token_budget_batches`), a step takes world x accumulation of them, and each
pair weighs world x accumulation / n_step as above, so the loss is again the exact mean over the
step's pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rmtrain.config import TrainerConfig
from rmtrain.data.table import PairTable
from rmtrain.errors import ConfigError
from rmtrain.packing import first_fit_decreasing


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # rows of the pairs dataset
    weights: list[float]  # per-pair loss weight (0 for padding)


_ORDER_KEYS = ("num_pairs", "global_batch", "seed", "max_tokens_per_micro_batch", "window",
               "units")  # fmt: skip


def check_same_order(saved: dict[str, Any], now: dict[str, Any], source: str) -> None:
    """Refuse to continue a run whose data order (`data_order()` of its plan) differs from this
    plan's: other data, batch size, seed or token budget would not continue the same run.
    Packing on/off does not change the order."""
    for key in _ORDER_KEYS:
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"cannot resume from {source}: its data order had {key}={saved.get(key)}, "
                f"this run has {now.get(key)} (changed data, batch size or token budget would "
                "not continue the same run)"
            )


@dataclass(frozen=True)
class BatchPlan:
    num_pairs: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    rank: int
    seed: int
    units: Sequence[Sequence[int]] | None = None  # k-way: each row's pairs, kept together

    @property
    def global_batch(self) -> int:
        """Pairs per step (rows per step for a k-way plan)."""
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def num_units(self) -> int:
        return self.num_pairs if self.units is None else len(self.units)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_units / self.global_batch)

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
            **({} if self.units is None else {"units": len(self.units)}),
        }

    def epoch_position(self, steps_done: int) -> float:
        """Epochs completed after `steps_done` steps (fractional)."""
        return steps_done / self.steps_per_epoch

    def permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_units, generator=gen).tolist()

    def step(self, step: int) -> list[MicroBatch]:
        """Micro-batches of this rank for 0-based optimizer step `step` (epochs wrap around)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        batch = perm[within * self.global_batch : (within + 1) * self.global_batch]
        chunks = [unit_pairs(c, self.units) for c in
                  split_evenly(batch, self.accumulation * self.world_size)]  # fmt: skip
        weight = self.accumulation * self.world_size / sum(len(c) for c in chunks)
        out = []
        for k in range(self.accumulation):
            chunk = chunks[k * self.world_size + self.rank]
            if chunk:
                out.append(MicroBatch(chunk, [weight] * len(chunk)))
            else:
                out.append(MicroBatch(unit_pairs(batch[:1], self.units)[:1], [0.0]))
        return out


def unit_pairs(units: Sequence[int], members: Sequence[Sequence[int]] | None) -> list[int]:
    """The pairs of plan units `units`: the units themselves, or each row's pairs (k-way)."""
    if members is None:
        return list(units)
    return [p for u in units for p in members[u]]


@dataclass
class TokenBudgetPlan:
    """Token-budget micro-batches: the `BatchPlan` interface for variable pairs per step.

    Epoch e's micro-batches are `token_budget_batches(lengths, max_tokens, seed, e, window)`; a
    step takes the next world x accumulation of them (`token_budget_steps`), so every rank runs
    `accumulation` passes per step and the steps per epoch are the same on every rank. The
    number of steps can differ between epochs (the bins depend on the permutation).
    """

    lengths: Sequence[int]  # tokens of each pair (chosen + rejected); k-way: of each row
    max_tokens: int
    accumulation: int
    world_size: int
    rank: int
    seed: int
    window: int = 1024
    units: Sequence[Sequence[int]] | None = None  # k-way: each row's pairs, kept together
    _cache: dict[int, list[list[MicroBatch]]] = field(default_factory=dict, repr=False)

    @property
    def num_pairs(self) -> int:
        return len(self.lengths) if self.units is None else sum(len(u) for u in self.units)

    def epoch_steps(self, epoch: int) -> list[list[MicroBatch]]:
        """This rank's micro-batches of every step of `epoch` (the last two epochs cached)."""
        if epoch not in self._cache:
            batches = token_budget_batches(
                self.lengths, self.max_tokens, self.seed, epoch, self.window
            )
            if self.units is not None:
                batches = [unit_pairs(b, self.units) for b in batches]
            steps = token_budget_steps(batches, self.world_size, self.accumulation, self.rank)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = steps
        return self._cache[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the first epoch (later epochs may differ by a step or so)."""
        return len(self.epoch_steps(0))

    def total_steps(self, max_steps: int | None, epochs: int) -> int:
        if max_steps is not None:
            return max_steps
        return sum(len(self.epoch_steps(e)) for e in range(epochs))

    def _locate(self, step: int) -> tuple[int, int]:
        epoch = 0
        while step >= (n := len(self.epoch_steps(epoch))):
            step -= n
            epoch += 1
        return epoch, step

    def epoch_position(self, steps_done: int) -> float:
        epoch, within = self._locate(steps_done)
        return epoch + within / len(self.epoch_steps(epoch))

    def data_order(self, step: int) -> dict[str, Any]:
        """Where a run is in its data; the token budget and window fix the batches too."""
        epoch, batch_in_epoch = self._locate(step)
        return {
            "num_pairs": self.num_pairs,
            "global_batch": None,  # pairs per step vary
            "micro_batches_per_step": self.world_size * self.accumulation,
            "max_tokens_per_micro_batch": self.max_tokens,
            "window": self.window,
            "seed": self.seed,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            **({} if self.units is None else {"units": len(self.units)}),
        }

    def step(self, step: int) -> list[MicroBatch]:
        epoch, within = self._locate(step)
        return self.epoch_steps(epoch)[within]


def build_plan(
    t: TrainerConfig, pairs: PairTable, world_size: int, rank: int, k_way: str = "pairs"
) -> BatchPlan | TokenBudgetPlan:
    """Which pairs this rank sees per step: `trainer.micro_batch_size` pairs (k-way: rows) per
    micro-batch, or token-budget micro-batches (`trainer.max_tokens_per_micro_batch`; k-way:
    a row's tokens are its distinct responses')."""
    accum = t.gradient_accumulation_steps
    units = None if k_way == "pairs" else pairs.group_members()
    if t.max_tokens_per_micro_batch is None:
        return BatchPlan(len(pairs), t.micro_batch_size, accum, world_size, rank, t.seed, units)
    lengths = pairs.lengths().tolist() if units is None else pairs.group_lengths(units).tolist()
    return TokenBudgetPlan(lengths, t.max_tokens_per_micro_batch, accum, world_size, rank, t.seed,
                           units=units)  # fmt: skip


def k_way_pairs(pairs: PairTable, k_way: str) -> PairTable:
    """The pairs `loss.k_way` trains: all of them, or (chosen_vs_rest) those whose chosen side
    is its row's best response (one no pair of the row ranks below another)."""
    if k_way != "chosen_vs_rest":
        return pairs
    ids, groups = pairs.sequence_ids(np.arange(len(pairs))), pairs.group_ids()
    beaten = set(zip(groups.tolist(), ids[:, 1].tolist(), strict=True))
    keep = [i for i, (g, c) in enumerate(zip(groups.tolist(), ids[:, 0].tolist(), strict=True))
            if (g, c) not in beaten]  # fmt: skip
    return pairs.select(keep)


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


# -- token-budget grouping ------------------------------------------------------------------
def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    seed: int,
    epoch: int = 0,
    window: int = 1024,
) -> list[list[int]]:
    """Micro-batches (lists of pair indices) of at most `max_tokens` real tokens each, covering
    every pair exactly once; `lengths[i]` is pair i's tokens (len(chosen) + len(rejected)).

    Deterministic in (lengths, max_tokens, seed, epoch, window): the pairs are permuted
    (`torch.randperm` seeded with seed + epoch, as `rmtrain.batching`), cut into consecutive
    windows of `window` pairs, each window is binned first-fit decreasing (so bins are full but
    only pairs of the same window share one), and the bins of the epoch are shuffled with the same
    generator. A pair longer than `max_tokens` is a micro-batch of its own. Indices inside a
    micro-batch are in permutation order.
    """
    if max_tokens <= 0 or window <= 0:
        raise ValueError("max_tokens and window must be positive")
    if any(n <= 0 for n in lengths):
        raise ValueError("every pair needs a positive token count")
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    bins: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        for b in first_fit_decreasing([lengths[i] for i in chunk], max_tokens):
            bins.append([chunk[j] for j in b])
    order = torch.randperm(len(bins), generator=gen).tolist()
    return [bins[k] for k in order]


def token_budget_steps(
    batches: Sequence[Sequence[int]],
    world_size: int,
    accumulation: int,
    rank: int,
) -> list[list[MicroBatch]]:
    """This rank's micro-batches for every optimizer step of an epoch of `batches`.

    A step takes the next M = world_size x accumulation micro-batches (micro-batch k*world + rank
    is this rank's k-th), so every rank runs exactly `accumulation` forward/backward passes per
    step -- what ZeRO-3's collective parameter gathers and DeepSpeed's fixed
    `gradient_accumulation_steps` need. The last step is filled with empty micro-batches, each a
    single pair of weight 0. Every pair of a step weighs M / n_step (n_step = its pairs): DeepSpeed
    divides by `accumulation` and averages over ranks, so the weighted sums give exactly the mean
    over the step's pairs. The pairs per step vary (about M x max_tokens / mean pair tokens);
    the loss stays an exact mean.
    """
    per_step = world_size * accumulation
    if not 0 <= rank < world_size or accumulation <= 0:
        raise ValueError("need 0 <= rank < world_size and accumulation > 0")
    if not batches:
        return []
    filler = [batches[0][0]]
    steps: list[list[MicroBatch]] = []
    for start in range(0, len(batches), per_step):
        group = list(batches[start : start + per_step])
        n_step = sum(len(b) for b in group)
        weight = per_step / n_step
        mine: list[MicroBatch] = []
        for k in range(accumulation):
            j = k * world_size + rank
            if j < len(group):
                mine.append(MicroBatch(list(group[j]), [weight] * len(group[j])))
            else:
                mine.append(MicroBatch(filler, [0.0]))
        steps.append(mine)
    return steps
