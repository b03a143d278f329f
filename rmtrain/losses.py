"""Pairwise losses for reward and cost models.

Every loss returns one value per pair (shape ``[B]``, float32) and never reduces over the batch:
the trainer takes the (weighted) mean in one place, so gradient accumulation, padding of the last
batch and per-pair weights are handled once instead of in every loss.

Scores are upcast to float32 before any arithmetic, because ``logsigmoid`` of a bf16 difference
loses most of its precision when the two scores are close (the case that matters for BT).

Conventions:

* reward objective: ``chosen`` is the preferred response and should score higher.
* cost objective (safe-rlhf): ``chosen`` is the SAFER response and ``rejected`` the less safe
  one; the less safe response should get the HIGHER cost, and cost > 0 means unsafe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from rmtrain.objective import OBJECTIVES, oriented_gap

if TYPE_CHECKING:
    from rmtrain.config import LossConfig

__all__ = [
    "PairLabels",
    "PairLoss",
    "PairScores",
    "TokenScores",
    "bt_loss",
    "center_reg",
    "compute_loss",
    "cost_loss",
    "margin_bt_loss",
    "needs_token_scores",
    "pair_metrics",
    "score_reg",
    "smoothed_bt_loss",
    "tokenwise_bt_loss",
    "tokenwise_bt_terms",
]


def _f32(x: Tensor) -> Tensor:
    return x.float()


def _check_pair(chosen: Tensor, rejected: Tensor) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            "chosen and rejected end scores must both have shape [B]; got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )


def _margin_tensor(margin: Tensor | float, like: Tensor) -> Tensor:
    m = torch.as_tensor(margin, dtype=torch.float32, device=like.device)
    if m.dim() > 1 or (m.dim() == 1 and m.shape != like.shape):
        raise ValueError(
            f"margin must be a scalar or shape {tuple(like.shape)}; got {tuple(m.shape)}"
        )
    return m


def _smoothed(delta: Tensor, eps: float) -> Tensor:
    """-(1-ε) log σ(Δ) - ε log σ(-Δ), skipping the second term when ε == 0 (exact plain BT)."""
    loss = -F.logsigmoid(delta)
    if eps > 0.0:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-delta)
    return loss


# --------------------------------------------------------------------------------------------
# Sequence-wise losses on end scores [B].
# --------------------------------------------------------------------------------------------


def bt_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Bradley-Terry: -log σ(r_c - r_r) per pair. ``logsigmoid`` keeps large gaps finite."""
    _check_pair(chosen, rejected)
    return -F.logsigmoid(_f32(chosen) - _f32(rejected))


def margin_bt_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float) -> Tensor:
    """BT with a margin: -log σ(r_c - r_r - m); asks for a gap of at least ``m`` (Llama-2 RM).

    ``margin`` is a constant or a per-pair tensor [B] (e.g. from a preference-strength column).
    """
    _check_pair(chosen, rejected)
    return -F.logsigmoid(_f32(chosen) - _f32(rejected) - _margin_tensor(margin, chosen))


def smoothed_bt_loss(
    chosen: Tensor, rejected: Tensor, eps: float, margin: Tensor | float = 0.0
) -> Tensor:
    """Conservative BT: -(1-ε) log σ(Δ) - ε log σ(-Δ), Δ = r_c - r_r - m.

    Treats each label as wrong with probability ε, which bounds how far the loss pushes the
    scores apart (the optimum gap is log((1-ε)/ε) instead of infinity), so scores do not drift
    to large magnitudes on noisy preference data.
    """
    _check_pair(chosen, rejected)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label smoothing eps={eps} must be in [0, 0.5)")
    delta = _f32(chosen) - _f32(rejected) - _margin_tensor(margin, chosen)
    return _smoothed(delta, eps)


def score_reg(chosen: Tensor, rejected: Tensor) -> Tensor:
    """safe-rlhf's score regulariser before λ: r_c² + r_r² per pair.

    Its mean over pairs is mean(r_c²) + mean(r_r²), i.e. exactly safe-rlhf's
    ``reg * (square(lower).mean() + square(higher).mean())`` once multiplied by λ; equivalently
    2 × mean(score²) over all 2B scores. It keeps the score scale from drifting (BT only sees
    differences, so the absolute level is otherwise free).
    """
    _check_pair(chosen, rejected)
    return _f32(chosen).square() + _f32(rejected).square()


def center_reg(chosen: Tensor, rejected: Tensor) -> Tensor:
    """TRL's reward centering before λ: (r_c + r_r)² per pair; pins the pair mean near 0."""
    _check_pair(chosen, rejected)
    return (_f32(chosen) + _f32(rejected)).square()


def cost_loss(
    chosen_cost: Tensor,
    rejected_cost: Tensor,
    chosen_unsafe: Tensor,
    rejected_unsafe: Tensor,
    margin: Tensor | float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """safe-rlhf cost-model loss, per pair, as ``(bt_term, sign_term)``.

    ``chosen`` is the SAFER response, ``rejected`` the less safe one, which should cost more:
    ``bt_term = -log σ(c_r - c_c - m)`` (smoothed like :func:`smoothed_bt_loss` when
    ``label_smoothing`` > 0; the defaults give safe-rlhf's plain term).
    ``sign_term = -log σ(s_c·c_c) - log σ(s_r·c_r)`` with s = +1 for an unsafe response and -1
    for a safe one, which anchors the sign of the cost: cost > 0 means unsafe.
    ``*_unsafe`` are bool or 0/1 tensors [B].
    """
    _check_pair(chosen_cost, rejected_cost)
    c, r = _f32(chosen_cost), _f32(rejected_cost)
    bt_term = smoothed_bt_loss(r, c, label_smoothing, margin)
    s_c = _sign(chosen_unsafe, c)
    s_r = _sign(rejected_unsafe, r)
    sign_term = -F.logsigmoid(s_c * c) - F.logsigmoid(s_r * r)
    return bt_term, sign_term


def _sign(unsafe: Tensor, like: Tensor) -> Tensor:
    if unsafe.shape != like.shape:
        raise ValueError(
            f"safety labels must have shape {tuple(like.shape)}; got {tuple(unsafe.shape)}"
        )
    return unsafe.to(device=like.device, dtype=torch.float32) * 2.0 - 1.0


# --------------------------------------------------------------------------------------------
# Token-wise BT (safe-rlhf "token-wise" loss type).
# --------------------------------------------------------------------------------------------


def tokenwise_bt_terms(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    chosen_ids: Tensor,
    rejected_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Token-wise BT split into ``(bt_part, reg_part)``, both [B]; reg_part is before λ.

    For pair i, with both sequences aligned by real-token position (see below):
    ``end`` = last real position of the longer sequence, ``div`` = first position where the
    token ids differ (or where the shorter sequence has ended, if it is a strict prefix of the
    other), and over the span t ∈ [div, end]:
    ``bt_part = mean_t -log σ(c_t - r_t)`` (smoothed as :func:`smoothed_bt_loss` when
    ``label_smoothing`` > 0) and ``reg_part = mean_t r_t² + mean_t c_t²`` (safe-rlhf's
    regulariser inside the span, which the caller multiplies by λ).

    rmtrain's choices, where safe-rlhf (right padding only) is silent or padding-dependent:

    * Padding-side invariance: rows may be left- or right-padded (or both in one batch; the
      masks tell). Each row is first compacted so that real token k of the chosen response is
      compared with real token k of the rejected one, i.e. it behaves exactly as if both were
      right-padded. The two sides may even have different widths L.
    * Past the shorter sequence's own end, safe-rlhf reads scores at pad positions (values that
      depend on padding); rmtrain holds that sequence's end score (its score at its last real
      token) up to ``end`` instead, which makes the loss identical for left and right padding.
    * Identical sequences (no divergence) raise ``ValueError``: the data pipeline drops such
      pairs, so reaching here is a bug. An empty sequence (mask all 0) raises too.
    * If one sequence is a strict prefix of the other, ``div`` = the shorter length.

    Vectorised (no per-row loop); it synchronises with the device once, for the error check.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label smoothing eps={label_smoothing} must be in [0, 0.5)")
    for name, scores, ids, mask in (
        ("chosen", chosen_scores, chosen_ids, chosen_mask),
        ("rejected", rejected_scores, rejected_ids, rejected_mask),
    ):
        if scores.dim() != 2 or scores.shape != ids.shape or scores.shape != mask.shape:
            raise ValueError(
                f"{name} token scores, ids and mask must share one shape [B, L]; got "
                f"{tuple(scores.shape)}, {tuple(ids.shape)}, {tuple(mask.shape)}"
            )
    if chosen_scores.shape[0] != rejected_scores.shape[0]:
        raise ValueError("chosen and rejected token tensors have different batch sizes")

    c_mask = chosen_mask.bool()
    r_mask = rejected_mask.bool()
    n_c = c_mask.sum(dim=1)  # real tokens per row, [B]
    n_r = r_mask.sum(dim=1)
    width = max(chosen_scores.shape[1], rejected_scores.shape[1])
    k = torch.arange(width, device=c_mask.device).unsqueeze(0)  # aligned position, [1, K]

    def aligned_index(mask: Tensor, n: Tensor) -> Tensor:
        # Stable sort puts real positions first, in order: order[b, j] = position of real token j.
        order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
        # Positions past the row's own end hold its last real token (clamp to n-1).
        j = torch.minimum(k, (n - 1).clamp(min=0).unsqueeze(1))
        return order.gather(1, j)  # [B, K]

    idx_c = aligned_index(c_mask, n_c)
    idx_r = aligned_index(r_mask, n_r)
    c = _f32(chosen_scores).gather(1, idx_c)
    r = _f32(rejected_scores).gather(1, idx_r)
    ids_c = chosen_ids.gather(1, idx_c)
    ids_r = rejected_ids.gather(1, idx_r)

    min_len = torch.minimum(n_c, n_r).unsqueeze(1)
    max_len = torch.maximum(n_c, n_r).unsqueeze(1)
    differs = ((ids_c != ids_r) | (k >= min_len)) & (k < max_len)
    bad = ~differs.any(dim=1) | (n_c == 0) | (n_r == 0)
    if bool(bad.any()):  # the one host sync
        rows = bad.nonzero().flatten().tolist()
        empty = ((n_c == 0) | (n_r == 0)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"token-wise BT: empty sequence (attention mask all 0) in rows {empty}"
            )
        raise ValueError(
            f"token-wise BT: chosen and rejected sequences are identical in rows {rows} "
            "(the data pipeline should have dropped these pairs)"
        )
    div = differs.to(torch.int32).argmax(dim=1, keepdim=True)  # first True
    span = ((k >= div) & (k < max_len)).float()
    count = span.sum(dim=1)

    bt_part = (_smoothed(c - r, label_smoothing) * span).sum(dim=1) / count
    reg_part = ((c.square() + r.square()) * span).sum(dim=1) / count
    return bt_part, reg_part


def tokenwise_bt_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    chosen_ids: Tensor,
    rejected_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    score_reg: float = 0.0,
) -> Tensor:
    """safe-rlhf's token-wise BT per pair: bt_part + score_reg · reg_part.

    Supervises every token after the two responses diverge, not only the end score. See
    :func:`tokenwise_bt_terms` for the definition and rmtrain's padding-invariant choices.
    """
    bt_part, reg_part = tokenwise_bt_terms(
        chosen_scores, rejected_scores, chosen_ids, rejected_ids, chosen_mask, rejected_mask
    )
    if score_reg > 0.0:
        return bt_part + score_reg * reg_part
    return bt_part


# --------------------------------------------------------------------------------------------
# Composition: the one call the trainer makes.
# --------------------------------------------------------------------------------------------


@dataclass
class TokenScores:
    """Per-token scores, ids and attention masks [B, L] of both sides (token-wise BT)."""

    chosen: Tensor
    rejected: Tensor
    chosen_ids: Tensor
    rejected_ids: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor


@dataclass
class PairScores:
    """What the model produced for B pairs."""

    chosen: Tensor  # end scores [B]
    rejected: Tensor  # end scores [B]
    tokens: TokenScores | None = None  # only for losses that need_token_scores


@dataclass
class PairLabels:
    """What a batch's data says about its B pairs beyond the tokens."""

    chosen_unsafe: Tensor  # [B] float 0/1 (safety labels; 0 where the data has none)
    rejected_unsafe: Tensor
    margin: Tensor  # [B] float, the per-pair margin of data.margin_column / margin_from_scores

    def to(self, device: torch.device) -> PairLabels:
        return PairLabels(
            self.chosen_unsafe.to(device), self.rejected_unsafe.to(device), self.margin.to(device)
        )


def needs_token_scores(cfg: LossConfig) -> bool:
    """Whether the loss reads per-token scores (else only end scores are gathered)."""
    return cfg.name == "bt_tokenwise"


class PairLoss:
    """The training objective, decided once from `loss` and `objective`: which terms, whether
    the data's per-pair margins apply (`per_pair_margin`: data.margin_column or
    data.margin_from_scores, with loss.name=margin) and which way scores point. Calling it gives
    (total per-pair loss [B], terms), see :func:`compute_loss`."""

    def __init__(self, cfg: LossConfig, objective: str, per_pair_margin: bool = False) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
        if objective == "cost" and cfg.name == "bt_tokenwise":
            raise NotImplementedError(
                "loss.name=bt_tokenwise is not implemented for objective=cost "
                "(use loss.name=bt or margin)"
            )
        self.cfg, self.objective = cfg, objective
        self.per_pair_margin = per_pair_margin and cfg.name == "margin"
        self.needs_token_scores = needs_token_scores(cfg)

    def __call__(self, s: PairScores, labels: PairLabels) -> tuple[Tensor, dict[str, Tensor]]:
        labels = labels.to(s.chosen.device)
        return compute_loss(
            self.cfg,
            self.objective,
            s,
            margin=labels.margin if self.per_pair_margin else None,
            chosen_unsafe=labels.chosen_unsafe,
            rejected_unsafe=labels.rejected_unsafe,
        )

    def metric_sums(self, s: PairScores, labels: PairLabels) -> dict[str, Tensor]:
        """:func:`pair_metrics` of a batch (sums, to all-reduce)."""
        labels = labels.to(s.chosen.device)
        return pair_metrics(
            s.chosen.detach(),
            s.rejected.detach(),
            self.objective,
            chosen_unsafe=labels.chosen_unsafe,
            rejected_unsafe=labels.rejected_unsafe,
        )


def compute_loss(
    cfg: LossConfig,
    objective: str,
    s: PairScores,
    margin: Tensor | None = None,
    chosen_unsafe: Tensor | None = None,
    rejected_unsafe: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Returns (total per-pair loss [B], terms).

    ``terms`` maps "loss_bt" (the main term, whatever the variant), and where their coefficient
    is > 0 "loss_sign" (cost only), "loss_reg" and "loss_center", to per-pair tensors [B] that
    add up to the total; the trainer logs them and takes the mean of the total.

    * reward: loss.name bt → BT (smoothed if label_smoothing > 0); margin → margin BT with the
      per-pair ``margin`` if given, else the constant ``cfg.margin`` (smoothing applies too);
      bt_tokenwise → token-wise BT, whose "loss_reg" is safe-rlhf's in-span token regulariser
      instead of the end-score one.
    * cost: "loss_bt" is the cost BT term (the less safe response should cost more), with
      margin / smoothing as for reward; "loss_sign" the sign term, which needs the safety labels.

    A per-pair ``margin`` with a loss other than "margin" raises, rather than being ignored.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.name not in ("bt", "margin", "bt_tokenwise"):
        raise ValueError(f"unknown loss.name={cfg.name!r}")
    if margin is not None and cfg.name != "margin":
        raise ValueError(f"a per-pair margin was given but loss.name={cfg.name!r} (not 'margin')")
    _check_pair(s.chosen, s.rejected)
    eps = cfg.label_smoothing
    m: Tensor | float = 0.0
    if cfg.name == "margin":
        m = margin if margin is not None else cfg.margin

    terms: dict[str, Tensor] = {}
    reg: Tensor | None = None
    if objective == "reward":
        if cfg.name == "bt_tokenwise":
            t = s.tokens
            if t is None:
                raise ValueError("loss.name=bt_tokenwise needs PairScores.tokens")
            terms["loss_bt"], reg = tokenwise_bt_terms(
                t.chosen,
                t.rejected,
                t.chosen_ids,
                t.rejected_ids,
                t.chosen_mask,
                t.rejected_mask,
                label_smoothing=eps,
            )
        else:
            terms["loss_bt"] = smoothed_bt_loss(s.chosen, s.rejected, eps, m)
    else:
        if cfg.name == "bt_tokenwise":
            raise NotImplementedError(
                "loss.name=bt_tokenwise is not implemented for objective=cost "
                "(use loss.name=bt or margin)"
            )
        if chosen_unsafe is None or rejected_unsafe is None:
            raise ValueError("objective=cost needs chosen_unsafe and rejected_unsafe labels")
        terms["loss_bt"], terms["loss_sign"] = cost_loss(
            s.chosen, s.rejected, chosen_unsafe, rejected_unsafe, margin=m, label_smoothing=eps
        )

    if cfg.score_reg > 0.0:
        if reg is None:
            reg = score_reg(s.chosen, s.rejected)
        terms["loss_reg"] = cfg.score_reg * reg
    if cfg.center_reg > 0.0:
        terms["loss_center"] = cfg.center_reg * center_reg(s.chosen, s.rejected)

    total = torch.stack(list(terms.values())).sum(dim=0)
    return total, terms


# --------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def pair_metrics(
    chosen: Tensor,
    rejected: Tensor,
    objective: str,
    chosen_unsafe: Tensor | None = None,
    rejected_unsafe: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-batch SUMS (scalar float32 tensors), so the trainer can all-reduce and then divide.

    Keys: "n" (pairs), "correct" (reward: chosen > rejected; cost: rejected > chosen, i.e. the
    less safe response costs more; ties count as wrong, so a collapsed model scoring every pair
    equal shows 0 accuracy instead of 50%), "margin" (sum of the gap in the correct direction),
    "chosen_sum", "chosen_sq", "rejected_sum", "rejected_sq" (for mean and std); for cost also
    "sign_correct" (over both responses, (cost > 0) == unsafe) and "sign_n" (2 × pairs).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    _check_pair(chosen, rejected)
    c, r = _f32(chosen).detach(), _f32(rejected).detach()
    gap = oriented_gap(objective, c, r)
    out = {
        "n": torch.tensor(float(c.numel()), device=c.device),
        "correct": (gap > 0).float().sum(),
        "margin": gap.sum(),
        "chosen_sum": c.sum(),
        "chosen_sq": c.square().sum(),
        "rejected_sum": r.sum(),
        "rejected_sq": r.square().sum(),
    }
    if objective == "cost":
        if chosen_unsafe is None or rejected_unsafe is None:
            raise ValueError("objective=cost metrics need chosen_unsafe and rejected_unsafe")
        ok_c = (c > 0) == (_sign(chosen_unsafe, c) > 0)
        ok_r = (r > 0) == (_sign(rejected_unsafe, r) > 0)
        out["sign_correct"] = ok_c.float().sum() + ok_r.float().sum()
        out["sign_n"] = torch.tensor(2.0 * c.numel(), device=c.device)
    return out
