"""The batch plan: every pair once per epoch, the same global batch however it is split."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from rmtrain.batching import (
    BatchPlan,
    TokenBudgetPlan,
    check_same_order,
    eval_shards,
    split_evenly,
)


def epoch_pairs(n: int, micro: int, accum: int, world: int, epoch: int = 0) -> list[list[int]]:
    """Per step of `epoch`: the real pairs of all ranks' micro-batches."""
    plans = [BatchPlan(n, micro, accum, world, r, seed=3) for r in range(world)]
    steps = plans[0].steps_per_epoch
    out = []
    for s in range(epoch * steps, (epoch + 1) * steps):
        pairs = []
        for plan in plans:
            for mb in plan.step(s):
                pairs += [i for i, w in zip(mb.indices, mb.weights, strict=True) if w > 0]
        out.append(pairs)
    return out


@pytest.mark.parametrize(
    ("n", "micro", "accum", "world"), [(37, 4, 2, 2), (5, 2, 2, 2), (64, 8, 1, 2)]
)
def test_each_pair_exactly_once_per_epoch(n: int, micro: int, accum: int, world: int) -> None:
    for epoch in (0, 1):
        counts = Counter(i for step in epoch_pairs(n, micro, accum, world, epoch) for i in step)
        assert sorted(counts) == list(range(n))
        assert set(counts.values()) == {1}


def test_epochs_are_reshuffled() -> None:
    assert epoch_pairs(37, 4, 2, 2, 0) != epoch_pairs(37, 4, 2, 2, 1)


def test_global_batch_independent_of_split() -> None:
    # global batch 8: 1 rank x accum 2 x micro 4  ==  2 ranks x accum 1 x micro 4  == 2x2x2
    a = epoch_pairs(37, 4, 2, 1)
    b = epoch_pairs(37, 4, 1, 2)
    c = epoch_pairs(37, 2, 2, 2)
    assert [sorted(s) for s in a] == [sorted(s) for s in b] == [sorted(s) for s in c]


def test_weights_give_the_global_mean() -> None:
    # DeepSpeed divides by accumulation and averages over ranks: sum(w) / (accum*world) == 1.
    n, micro, accum, world = 37, 4, 2, 2
    plans = [BatchPlan(n, micro, accum, world, r, seed=0) for r in range(world)]
    for s in range(plans[0].steps_per_epoch):
        total = sum(sum(mb.weights) for p in plans for mb in p.step(s))
        assert total / (accum * world) == pytest.approx(1.0)
        # every rank runs the same number of micro-batches, each non-empty
        assert all(len(p.step(s)) == accum and all(mb.indices for mb in p.step(s)) for p in plans)


def test_last_short_batch_pads_with_zero_weight() -> None:
    plans = [BatchPlan(5, 2, 2, 2, r, seed=0) for r in range(2)]  # G=8 > 5 pairs
    mbs = [mb for p in plans for mb in p.step(0)]
    assert sum(len(mb.indices) for mb in mbs if mb.weights[0] > 0) == 5
    assert any(mb.weights == [0.0] for mb in mbs) is False  # 5 pairs over 4 chunks: none empty
    plans = [BatchPlan(3, 2, 2, 2, r, seed=0) for r in range(2)]
    assert [mb.weights for p in plans for mb in p.step(0)].count([0.0]) == 1


def test_split_evenly() -> None:
    assert split_evenly([1, 2, 3, 4, 5], 3) == [[1, 2], [3, 4], [5]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_eval_shards_cover_once_with_equal_batch_counts() -> None:
    shards = [eval_shards(11, 3, 2, r) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    real = [i for s in shards for mb in s for i, w in zip(mb.indices, mb.weights, strict=True) if w]
    assert sorted(real) == list(range(11))


# -- token-budget micro-batches (trainer.max_tokens_per_micro_batch) --------------------------


def _lengths(n: int) -> list[int]:
    gen = torch.Generator().manual_seed(5)
    return (torch.randint(40, 500, (n,), generator=gen)).tolist()


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (2, 3)])
def test_token_budget_plan_each_pair_once_same_steps_exact_weights(world: int, accum: int) -> None:
    lengths = _lengths(203)
    plans = [
        TokenBudgetPlan(lengths, 1200, accum, world, r, seed=7, window=64) for r in range(world)
    ]
    for epoch in range(2):
        per_rank = [p.epoch_steps(epoch) for p in plans]
        assert len({len(s) for s in per_rank}) == 1  # the same step count on every rank
        seen: list[int] = []
        for step in range(len(per_rank[0])):
            mbs = [mb for steps in per_rank for mb in steps[step]]
            assert all(len(steps[step]) == accum for steps in per_rank)
            real = [(i, w) for mb in mbs for i, w in zip(mb.indices, mb.weights, strict=True) if w]
            # sum of weights / (world x accum) == 1: the weighted sums are the step's mean
            assert sum(w for _, w in real) == pytest.approx(world * accum)
            for mb in mbs:
                if mb.weights[0]:
                    assert sum(lengths[i] for i in mb.indices) <= 1200 or len(mb.indices) == 1
            seen += [i for i, _ in real]
        assert sorted(seen) == list(range(len(lengths)))


def test_token_budget_plan_deterministic_and_resumable() -> None:
    lengths = _lengths(150)
    a = TokenBudgetPlan(lengths, 900, 2, 1, 0, seed=3)
    b = TokenBudgetPlan(lengths, 900, 2, 1, 0, seed=3)
    total = a.total_steps(None, 2)
    assert total == len(a.epoch_steps(0)) + len(a.epoch_steps(1))
    assert [b.step(s) for s in range(total + 3)] == [a.step(s) for s in range(total + 3)]
    assert a.step(0) != TokenBudgetPlan(lengths, 900, 2, 1, 0, seed=4).step(0)
    n0 = len(a.epoch_steps(0))
    order = a.data_order(n0 + 1)
    assert (order["epoch"], order["batch_in_epoch"]) == (1, 1)
    assert order["max_tokens_per_micro_batch"] == 900 and order["global_batch"] is None
    assert a.epoch_position(n0) == 1.0


def test_resume_with_another_token_budget_is_refused() -> None:
    from rmtrain.errors import ConfigError

    lengths = _lengths(40)
    budget = TokenBudgetPlan(lengths, 900, 1, 1, 0, seed=42)
    saved = budget.data_order(3)
    check_same_order(saved, TokenBudgetPlan(lengths, 900, 1, 1, 0, seed=42).data_order(0), "c")
    for other in (TokenBudgetPlan(lengths, 800, 1, 1, 0, seed=42), BatchPlan(40, 8, 1, 1, 0, 42)):
        with pytest.raises(ConfigError, match="cannot resume from c: its data order had"):
            check_same_order(saved, other.data_order(0), "c")
    padded = BatchPlan(40, 8, 1, 1, 0, 42).data_order(5)
    with pytest.raises(ConfigError, match="cannot resume"):
        check_same_order(padded, budget.data_order(0), "c")
