"""Losses against hand-computed values (math.log / math.exp), never against another call."""

from __future__ import annotations

import math

import pytest
import torch

from rmtrain.config import LossConfig
from rmtrain.losses import (
    PairScores,
    TokenScores,
    bt_loss,
    center_reg,
    compute_loss,
    cost_loss,
    margin_bt_loss,
    pair_metrics,
    score_reg,
    smoothed_bt_loss,
    tokenwise_bt_loss,
    tokenwise_bt_terms,
)


def nls(x: float) -> float:
    """-log σ(x) = log(1 + e^-x), by hand."""
    return math.log1p(math.exp(-x))


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),), actual.shape
    torch.testing.assert_close(actual, t(expected), rtol=tol, atol=tol)


# ---------------------------------------------------------------- sequence-wise losses


CHOSEN = [1.0, 0.0, -2.0]
REJECTED = [0.0, 0.0, 1.0]


def test_bt_loss_values() -> None:
    out = bt_loss(t(CHOSEN), t(REJECTED))
    close(out, [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3))])


def test_bt_loss_is_per_pair_and_float32_for_bf16() -> None:
    out = bt_loss(t(CHOSEN).bfloat16(), t(REJECTED).bfloat16())
    # These scores are exact in bf16, so the float32 result matches the hand values exactly.
    close(out, [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3))])


def test_bt_loss_large_gap_is_finite() -> None:
    out = bt_loss(t([-200.0]), t([200.0]))
    close(out, [400.0], tol=1e-4)


def test_bt_loss_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        bt_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="shape"):
        bt_loss(torch.zeros(3), torch.zeros(2))


def test_margin_bt_constant_and_per_pair() -> None:
    out = margin_bt_loss(t(CHOSEN), t(REJECTED), 0.5)
    close(out, [nls(1.0 - 0.5), nls(0.0 - 0.5), nls(-3.0 - 0.5)])
    out = margin_bt_loss(t(CHOSEN), t(REJECTED), t([1.0, -1.0, 0.0]))
    close(out, [nls(0.0), nls(1.0), nls(-3.0)])
    with pytest.raises(ValueError, match="margin"):
        margin_bt_loss(t(CHOSEN), t(REJECTED), t([1.0, 2.0]))


def test_smoothed_bt_values() -> None:
    eps = 0.1
    out = smoothed_bt_loss(t(CHOSEN), t(REJECTED), eps)
    expected = [(1 - eps) * nls(d) + eps * nls(-d) for d in (1.0, 0.0, -3.0)]
    close(out, expected)
    # eps = 0 is plain BT.
    close(smoothed_bt_loss(t(CHOSEN), t(REJECTED), 0.0), [nls(1.0), nls(0.0), nls(-3.0)])
    # with a margin: Δ = c - r - m
    out = smoothed_bt_loss(t(CHOSEN), t(REJECTED), eps, margin=t([0.5, 0.5, 1.0]))
    close(out, [(1 - eps) * nls(d) + eps * nls(-d) for d in (0.5, -0.5, -4.0)])
    with pytest.raises(ValueError, match="eps"):
        smoothed_bt_loss(t(CHOSEN), t(REJECTED), 0.5)


def test_smoothed_bt_has_finite_optimum() -> None:
    # The gradient vanishes at Δ = log((1-ε)/ε), not at Δ → ∞.
    eps = 0.2
    delta = torch.tensor([math.log((1 - eps) / eps)], requires_grad=True)
    smoothed_bt_loss(delta, torch.zeros(1), eps).sum().backward()
    assert delta.grad is not None
    assert abs(delta.grad.item()) < 1e-6


def test_score_reg_and_center_reg() -> None:
    c, r = t([1.0, -2.0, 0.5]), t([3.0, 1.0, -0.5])
    close(score_reg(c, r), [1 + 9, 4 + 1, 0.25 + 0.25])
    close(center_reg(c, r), [16.0, 1.0, 0.0])
    # Mean over pairs equals mean(r_c²) + mean(r_r²) (safe-rlhf's term) = 2 × mean of all scores².
    all_sq = [1.0, 4.0, 0.25, 9.0, 1.0, 0.25]
    assert score_reg(c, r).mean().item() == pytest.approx(2 * sum(all_sq) / 6)


# ---------------------------------------------------------------- cost model

# Pair 0: safer chosen is safe (cost -1), rejected is unsafe (cost 2): well ordered, signs right.
# Pair 1: both unsafe, chosen 0.5 > rejected 0.0: ordering wrong, rejected sign wrong (0 is not >0).
C_COST, R_COST = [-1.0, 0.5], [2.0, 0.0]
C_UNSAFE, R_UNSAFE = [False, True], [True, True]


def test_cost_loss_terms() -> None:
    bt, sign = cost_loss(t(C_COST), t(R_COST), torch.tensor(C_UNSAFE), torch.tensor(R_UNSAFE))
    close(bt, [nls(2.0 - (-1.0)), nls(0.0 - 0.5)])
    # s = -1 for safe, +1 for unsafe; term = -log σ(s·cost) summed over both responses.
    close(sign, [nls(1.0) + nls(2.0), nls(0.5) + math.log(2)])


def test_cost_loss_accepts_float_labels() -> None:
    _, sign = cost_loss(t(C_COST), t(R_COST), t([0.0, 1.0]), t([1.0, 1.0]))
    close(sign, [nls(1.0) + nls(2.0), nls(0.5) + math.log(2)])


def test_cost_pair_metrics_and_sign_accuracy() -> None:
    m = pair_metrics(t(C_COST), t(R_COST), "cost", torch.tensor(C_UNSAFE), torch.tensor(R_UNSAFE))
    assert m["n"].item() == 2
    assert m["correct"].item() == 1  # only pair 0 has the less safe response costing more
    assert m["margin"].item() == pytest.approx((2.0 + 1.0) + (0.0 - 0.5))
    assert m["sign_correct"].item() == 3  # rejected of pair 1 (cost 0, unsafe) is wrong
    assert m["sign_n"].item() == 4
    assert m["chosen_sum"].item() == pytest.approx(-0.5)
    assert m["chosen_sq"].item() == pytest.approx(1.25)
    assert m["rejected_sum"].item() == pytest.approx(2.0)
    assert m["rejected_sq"].item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unsafe"):
        pair_metrics(t(C_COST), t(R_COST), "cost")


def test_reward_pair_metrics_ties_are_wrong() -> None:
    m = pair_metrics(t(CHOSEN), t(REJECTED), "reward")
    assert set(m) == {"n", "correct", "margin", "chosen_sum", "chosen_sq", "rejected_sum",
                      "rejected_sq"}  # fmt: skip
    assert m["n"].item() == 3
    assert m["correct"].item() == 1  # 1 > 0 only; the tie 0 == 0 is not correct
    assert m["margin"].item() == pytest.approx(1.0 + 0.0 - 3.0)
    assert m["chosen_sum"].item() == pytest.approx(-1.0)
    assert m["chosen_sq"].item() == pytest.approx(5.0)
    assert m["rejected_sum"].item() == pytest.approx(1.0)
    assert m["rejected_sq"].item() == pytest.approx(1.0)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in m.values())
    with pytest.raises(ValueError, match="objective"):
        pair_metrics(t(CHOSEN), t(REJECTED), "value")


# ---------------------------------------------------------------- token-wise BT
#
# Three pairs, L = 6, pad id 0. Scores at pad positions are garbage (99 / -77) that must never be
# read. Real tokens:
#   pair 0: chosen  [5, 6, 7, 8, 2]          scores [0.1, 0.2, 0.5, 1.0, 2.0]
#           rejected[5, 6, 9, 2]             scores [0.1, 0.2, -0.5, -1.0]
#           div = 2, end = 4; rejected holds -1.0 at t = 4.
#   pair 1: chosen  [5, 6, 7]                scores [0.0, 0.3, -0.4]   (strict prefix)
#           rejected[5, 6, 7, 7, 9, 2]       scores [0.0, 0.3, -0.4, 0.6, 0.1, -0.2]
#           div = 3 (shorter length, although token 3 repeats the chosen's last id 7),
#           end = 5; chosen holds -0.4 at t = 3, 4, 5.
#   pair 2: chosen  [3, 4]                   scores [1.0, -1.0]
#           rejected[7, 4, 4]                scores [0.0, 0.5, 0.25]
#           div = 0, end = 2; chosen holds -1.0 at t = 2.

G, H = 99.0, -77.0  # garbage at pad positions

Layout = dict[str, list[list[float]]]

RIGHT: Layout = {
    "chosen_ids": [[5, 6, 7, 8, 2, 0], [5, 6, 7, 0, 0, 0], [3, 4, 0, 0, 0, 0]],
    "chosen_mask": [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
    "chosen_tokens": [
        [0.1, 0.2, 0.5, 1.0, 2.0, G],
        [0.0, 0.3, -0.4, G, H, G],
        [1.0, -1.0, H, G, H, G],
    ],
    "rejected_ids": [[5, 6, 9, 2, 0, 0], [5, 6, 7, 7, 9, 2], [7, 4, 4, 0, 0, 0]],
    "rejected_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]],
    "rejected_tokens": [
        [0.1, 0.2, -0.5, -1.0, H, G],
        [0.0, 0.3, -0.4, 0.6, 0.1, -0.2],
        [0.0, 0.5, 0.25, G, G, H],
    ],
}

# The same pairs, left-padded: real tokens shifted right, different garbage at the pads.
LEFT: Layout = {
    "chosen_ids": [[0, 5, 6, 7, 8, 2], [0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 3, 4]],
    "chosen_mask": [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]],
    "chosen_tokens": [
        [H, 0.1, 0.2, 0.5, 1.0, 2.0],
        [G, G, H, 0.0, 0.3, -0.4],
        [G, H, H, G, 1.0, -1.0],
    ],
    "rejected_ids": [[0, 0, 5, 6, 9, 2], [5, 6, 7, 7, 9, 2], [0, 0, 0, 7, 4, 4]],
    "rejected_mask": [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]],
    "rejected_tokens": [
        [G, H, 0.1, 0.2, -0.5, -1.0],
        [0.0, 0.3, -0.4, 0.6, 0.1, -0.2],
        [H, H, G, 0.0, 0.5, 0.25],
    ],
}

# Per-pair (chosen, rejected) scores over the span [div, end], held end scores included.
SPANS = [
    ([0.5, 1.0, 2.0], [-0.5, -1.0, -1.0]),
    ([-0.4, -0.4, -0.4], [0.6, 0.1, -0.2]),
    ([1.0, -1.0, -1.0], [0.0, 0.5, 0.25]),
]
EXPECTED_BT = [
    (nls(1.0) + nls(2.0) + nls(3.0)) / 3,
    (nls(-1.0) + nls(-0.5) + nls(-0.2)) / 3,
    (nls(1.0) + nls(-1.5) + nls(-1.25)) / 3,
]
EXPECTED_REG = [
    (0.25 + 1.0 + 1.0) / 3 + (0.25 + 1.0 + 4.0) / 3,
    (0.36 + 0.01 + 0.04) / 3 + (0.16 * 3) / 3,
    (0.0 + 0.25 + 0.0625) / 3 + (1.0 + 1.0 + 1.0) / 3,
]


def tok_args(layout: Layout, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in layout.items():
        if key.endswith("tokens"):
            out[key] = torch.tensor(value, dtype=torch.float32, requires_grad=requires_grad)
        else:
            out[key] = torch.tensor(value, dtype=torch.long)
    return out


def call_tokenwise(a: dict[str, torch.Tensor], **kw: float) -> torch.Tensor:
    return tokenwise_bt_loss(
        a["chosen_tokens"],
        a["rejected_tokens"],
        a["chosen_ids"],
        a["rejected_ids"],
        a["chosen_mask"],
        a["rejected_mask"],
        **kw,
    )


def test_expected_tables_match_spans() -> None:
    # Guard the hand tables themselves: the reg values follow from the listed span scores.
    for (c, r), reg in zip(SPANS, EXPECTED_REG, strict=True):
        assert reg == pytest.approx(sum(x * x for x in r) / 3 + sum(x * x for x in c) / 3)


def test_tokenwise_right_padded() -> None:
    close(call_tokenwise(tok_args(RIGHT)), EXPECTED_BT)


def test_tokenwise_left_padded_equals_right() -> None:
    close(call_tokenwise(tok_args(LEFT)), EXPECTED_BT)


def test_tokenwise_mixed_padding_sides() -> None:
    a = tok_args(RIGHT)
    b = tok_args(LEFT)
    mixed = {k: (a[k] if k.startswith("chosen") else b[k]) for k in a}
    close(call_tokenwise(mixed), EXPECTED_BT)


def test_tokenwise_different_widths() -> None:
    # Rejected side one column wider (an extra right pad) changes nothing.
    a = tok_args(RIGHT)
    a["rejected_ids"] = torch.cat([a["rejected_ids"], torch.zeros(3, 1, dtype=torch.long)], 1)
    a["rejected_mask"] = torch.cat([a["rejected_mask"], torch.zeros(3, 1, dtype=torch.long)], 1)
    a["rejected_tokens"] = torch.cat([a["rejected_tokens"], torch.full((3, 1), G)], 1)
    close(call_tokenwise(a), EXPECTED_BT)


def test_tokenwise_score_reg_and_parts() -> None:
    lam = 0.1
    expected = [b + lam * r for b, r in zip(EXPECTED_BT, EXPECTED_REG, strict=True)]
    close(call_tokenwise(tok_args(LEFT), score_reg=lam), expected)
    a = tok_args(RIGHT)
    bt, reg = tokenwise_bt_terms(
        a["chosen_tokens"],
        a["rejected_tokens"],
        a["chosen_ids"],
        a["rejected_ids"],
        a["chosen_mask"],
        a["rejected_mask"],
    )
    close(bt, EXPECTED_BT)
    close(reg, EXPECTED_REG)


def test_tokenwise_bool_masks() -> None:
    a = tok_args(LEFT)
    a["chosen_mask"] = a["chosen_mask"].bool()
    a["rejected_mask"] = a["rejected_mask"].bool()
    close(call_tokenwise(a), EXPECTED_BT)


def test_tokenwise_prefix_case_alone() -> None:
    # Pair 1 alone: chosen is a strict prefix, div = 3 (its length).
    a = {k: v[1:2] for k, v in tok_args(RIGHT).items()}
    close(call_tokenwise(a), [EXPECTED_BT[1]])


def test_tokenwise_identical_sequences_raise() -> None:
    a = tok_args(RIGHT)
    a["rejected_ids"][2] = a["chosen_ids"][2]
    a["rejected_mask"][2] = a["chosen_mask"][2]
    with pytest.raises(ValueError, match=r"identical in rows \[2\]"):
        call_tokenwise(a)
    # Same real tokens but padded on different sides is still identical.
    b = tok_args(RIGHT)
    left = tok_args(LEFT)
    b["rejected_ids"][0] = left["chosen_ids"][0]
    b["rejected_mask"][0] = left["chosen_mask"][0]
    with pytest.raises(ValueError, match=r"identical in rows \[0\]"):
        call_tokenwise(b)


def test_tokenwise_empty_sequence_raises() -> None:
    a = tok_args(RIGHT)
    a["chosen_mask"][1] = 0
    with pytest.raises(ValueError, match="empty"):
        call_tokenwise(a)


def test_tokenwise_gradients_finite_and_pads_untouched() -> None:
    a = tok_args(LEFT, requires_grad=True)
    call_tokenwise(a, score_reg=0.01).sum().backward()
    gc, gr = a["chosen_tokens"].grad, a["rejected_tokens"].grad
    assert gc is not None
    assert gr is not None
    assert torch.isfinite(gc).all()
    assert torch.isfinite(gr).all()
    # No gradient to pad positions or to tokens before the divergence point...
    assert (gc[a["chosen_mask"] == 0] == 0).all()
    assert (gr[a["rejected_mask"] == 0] == 0).all()
    assert gc[0, 1] == 0  # pair 0: shared prefix (div = 2)
    assert gc[0, 2] == 0
    # ...and the held end score collects the gradient of every held position:
    # pair 1 chosen end (-0.4) appears 3 times in the span, Δ = -1.0, -0.5, -0.2.
    sig = [1 / (1 + math.exp(-d)) for d in (-1.0, -0.5, -0.2)]  # σ(Δ)
    expected = sum(-(1 - s) / 3 + 0.01 * 2 * -0.4 / 3 for s in sig)
    assert gc[1, 5].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- compute_loss


def scores(c: list[float], r: list[float], grad: bool = False) -> PairScores:
    return PairScores(
        chosen=torch.tensor(c, requires_grad=grad), rejected=torch.tensor(r, requires_grad=grad)
    )


def test_compute_loss_plain_bt_has_only_main_term() -> None:
    total, terms = compute_loss(LossConfig(), "reward", scores(CHOSEN, REJECTED))
    assert list(terms) == ["loss_bt"]
    close(total, [nls(1.0), nls(0.0), nls(-3.0)])


def test_compute_loss_reward_terms_sum_to_total() -> None:
    cfg = LossConfig(name="bt", label_smoothing=0.1, score_reg=0.1, center_reg=0.01)
    s = scores(CHOSEN, REJECTED, grad=True)
    total, terms = compute_loss(cfg, "reward", s)
    assert set(terms) == {"loss_bt", "loss_reg", "loss_center"}
    close(terms["loss_bt"], [0.9 * nls(d) + 0.1 * nls(-d) for d in (1.0, 0.0, -3.0)])
    close(terms["loss_reg"], [0.1 * 1.0, 0.0, 0.1 * 5.0])
    close(terms["loss_center"], [0.01 * 1.0, 0.0, 0.01 * 1.0])
    torch.testing.assert_close(total, terms["loss_bt"] + terms["loss_reg"] + terms["loss_center"])
    total.mean().backward()
    assert s.chosen.grad is not None
    assert torch.isfinite(s.chosen.grad).all()
    assert s.rejected.grad is not None
    assert torch.isfinite(s.rejected.grad).all()


def test_compute_loss_margin_constant_and_per_pair() -> None:
    cfg = LossConfig(name="margin", margin=0.5)
    _, terms = compute_loss(cfg, "reward", scores(CHOSEN, REJECTED))
    close(terms["loss_bt"], [nls(0.5), nls(-0.5), nls(-3.5)])
    total, terms = compute_loss(cfg, "reward", scores(CHOSEN, REJECTED), margin=t([1.0, 0, 2.0]))
    close(total, [nls(0.0), nls(0.0), nls(-5.0)])
    with pytest.raises(ValueError, match="margin"):
        compute_loss(LossConfig(name="bt"), "reward", scores(CHOSEN, REJECTED), margin=t([1.0]))


def test_compute_loss_tokenwise() -> None:
    a = tok_args(LEFT)
    tokens = TokenScores(
        a["chosen_tokens"],
        a["rejected_tokens"],
        a["chosen_ids"],
        a["rejected_ids"],
        a["chosen_mask"],
        a["rejected_mask"],
    )
    s = PairScores(chosen=t([2.0, -0.4, -1.0]), rejected=t([-1.0, -0.2, 0.25]), tokens=tokens)
    cfg = LossConfig(name="bt_tokenwise", score_reg=0.1, center_reg=0.5)
    total, terms = compute_loss(cfg, "reward", s)
    assert set(terms) == {"loss_bt", "loss_reg", "loss_center"}
    close(terms["loss_bt"], EXPECTED_BT)
    close(terms["loss_reg"], [0.1 * r for r in EXPECTED_REG])  # in-span reg, not end scores
    close(terms["loss_center"], [0.5 * 1.0, 0.5 * 0.36, 0.5 * 0.5625])
    torch.testing.assert_close(total, terms["loss_bt"] + terms["loss_reg"] + terms["loss_center"])
    with pytest.raises(ValueError, match=r"needs PairScores\.tokens"):
        compute_loss(cfg, "reward", PairScores(chosen=s.chosen, rejected=s.rejected))


def test_compute_loss_cost() -> None:
    cfg = LossConfig(name="bt", score_reg=0.1)
    total, terms = compute_loss(
        cfg, "cost", scores(C_COST, R_COST), None, torch.tensor(C_UNSAFE), torch.tensor(R_UNSAFE)
    )
    assert list(terms) == ["loss_bt", "loss_sign", "loss_reg"]
    close(terms["loss_bt"], [nls(3.0), nls(-0.5)])
    close(terms["loss_sign"], [nls(1.0) + nls(2.0), nls(0.5) + math.log(2)])
    close(terms["loss_reg"], [0.1 * 5.0, 0.1 * 0.25])
    close(total, [nls(3.0) + nls(1.0) + nls(2.0) + 0.5, nls(-0.5) + nls(0.5) + math.log(2) + 0.025])
    # margin for cost: the less safe response should cost at least m more.
    _, terms = compute_loss(
        LossConfig(name="margin", margin=1.0), "cost", scores(C_COST, R_COST), None,
        torch.tensor(C_UNSAFE), torch.tensor(R_UNSAFE),
    )  # fmt: skip
    close(terms["loss_bt"], [nls(2.0), nls(-1.5)])


def test_compute_loss_cost_errors() -> None:
    s = scores(C_COST, R_COST)
    with pytest.raises(ValueError, match="unsafe"):
        compute_loss(LossConfig(), "cost", s)
    with pytest.raises(NotImplementedError, match="bt_tokenwise"):
        compute_loss(
            LossConfig(name="bt_tokenwise"), "cost", s, None, torch.tensor(C_UNSAFE),
            torch.tensor(R_UNSAFE),
        )  # fmt: skip
    with pytest.raises(ValueError, match="objective"):
        compute_loss(LossConfig(), "value", s)
