"""Reward or cost: the one rule for which way a score points.

A reward model's higher score marks the preferred (chosen) response. A cost model (safe-rlhf)
gives the less safe response the higher cost, so its LOWER score marks the preferred (safer,
chosen) one, and cost > 0 means unsafe. Every accuracy, margin and "worst pair" is computed on
the oriented gap `sign(objective) * (chosen - rejected)`: positive means ranked right. Works on
floats, numpy arrays and tensors alike.
"""

from __future__ import annotations

from typing import TypeVar

OBJECTIVES = ("reward", "cost")

T = TypeVar("T")


def sign(objective: str) -> float:
    """+1 for a reward model, -1 for a cost model."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    return 1.0 if objective == "reward" else -1.0


def oriented_gap(objective: str, chosen: T, rejected: T) -> T:
    """How far the chosen response is ranked above the rejected one (> 0: ranked right)."""
    return sign(objective) * (chosen - rejected)  # type: ignore[operator,no-any-return]
