"""One micro-batch of preference pairs, made directly from the pair table: the one collate.

:func:`collate` takes B pairs of a :class:`~rmtrain.data.table.PairTable` and lays out their
distinct sequences (every chosen side, then every rejected side; a sequence several pairs share,
as the K responses of one prompt do, once) in rows for one forward pass, padded or packed
(:class:`Layout`, :class:`rmtrain.packing.Rows`), with the pairs' labels as tensors. With
prefix sharing the sequences of one pair (or of one prompt's group) become one packed segment
whose common prefix is computed once; :mod:`rmtrain.attention` says who attends to whom.
:func:`pair_scores` reads the model's output back as chosen / rejected end scores (and, for the
token-wise loss, right-padded per-token views of both sides), whatever the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rmtrain import attention
from rmtrain.data.table import PairTable
from rmtrain.losses import PairLabels, PairScores, TokenScores
from rmtrain.packing import Rows, balanced_row_tokens, pack_sequences, pad_sequences, row_token_cost

# A pair shares its prefix only when the two sides have at least this many leading tokens in
# common: below it the segment saves less than the rest's rectangular attention costs extra.
MIN_SHARED_TOKENS = 16


@dataclass(frozen=True)
class Layout:
    """How a micro-batch's sequences become rows: padded (one row per sequence, on
    `padding_side`) or packed (`trainer.packing`), with the attention `kernel` of
    :mod:`rmtrain.attention`: "segments" (sdpa / eager: every sequence attends over its own
    tokens only, all sequences in ONE row), "dense" (a 4D mask over nearly full rows of the
    cheapest width, `balanced_row_tokens`), "flex" (a block mask, one row) or "varlen"
    (flash-attention, one row). `share_prefixes` (`trainer.prefix_sharing`) lays each pair (or
    group of responses to one prompt) out as one segment whose common prefix is computed once."""

    packed: bool
    pad_token_id: int
    padding_side: str = "right"
    kernel: str = "segments"
    share_prefixes: bool = False
    min_shared: int = MIN_SHARED_TOKENS
    token_cost: float = 1536.0

    @classmethod
    def for_model(
        cls, config: Any, packed: bool, padding_side: str, share_prefixes: bool = False
    ) -> Layout:
        """The layout a model's attention implementation calls for. With packing on sdpa or
        eager, the model is switched to the segments kernel (:func:`rmtrain.attention.install`;
        padded inputs still run the base implementation)."""
        if share_prefixes and not packed:
            raise ValueError("prefix sharing lays pairs out in packed rows: it needs packing")
        kernel = attention.kernel_for(attention.base_implementation(config)) if packed else ""
        if packed:
            attention.check_kernel(kernel, share_prefixes)
        if kernel == "segments":
            attention.install(config)
        return cls(
            packed=packed,
            pad_token_id=int(getattr(config, "pad_token_id", None) or 0),
            padding_side=padding_side,
            kernel=kernel,
            share_prefixes=share_prefixes,
            token_cost=row_token_cost(config),
        )

    def rows(
        self, seqs: Sequence[np.ndarray | Sequence[int]], groups: Sequence[Sequence[int]] = ()
    ) -> Rows:
        """`seqs` laid out; with `share_prefixes`, each of `groups` (sequence indices) shares
        its common prefix when it has at least `min_shared` tokens."""
        if not self.packed:
            return pad_sequences(seqs, self.pad_token_id, self.padding_side)
        if not self.share_prefixes:
            groups = ()
        width = None
        if self.kernel == "dense":  # dense masks cost O(T^2) per row: rows of moderate width
            sizes = [len(s) for s in seqs]
            width = balanced_row_tokens(sizes, self.token_cost)
        return pack_sequences(seqs, max_row_tokens=width, pad_token_id=self.pad_token_id,
                              groups=groups, min_shared=self.min_shared)  # fmt: skip


@dataclass
class PairBatch:
    """B pairs: their sequences in rows, where each pair's chosen and rejected sequence is
    (`chosen`, `rejected`: indices into the rows' sequences), the attention of packed rows,
    and the pairs' labels."""

    rows: Rows
    labels: PairLabels
    chosen: torch.Tensor  # [B] long
    rejected: torch.Tensor  # [B] long
    attention: attention.PackedAttention | None = None

    @property
    def pairs(self) -> int:
        return int(self.labels.margin.numel())

    def pair_lengths(self) -> torch.Tensor:
        """`[2B]` tokens of every pair's chosen and rejected sequence: what the batch trains,
        whether or not sequences and prefixes are computed once."""
        return self.rows.seq_len[torch.cat([self.chosen, self.rejected])]

    def model_inputs(self) -> dict[str, Any]:
        """The score model's forward arguments (`rmtrain.model`)."""
        inputs: dict[str, Any] = dict(self.rows.model_inputs())
        if self.attention is not None:
            inputs["attention"] = self.attention
        return inputs


def collate(table: PairTable, indices: Sequence[int], layout: Layout) -> PairBatch:
    """The micro-batch of pairs `indices` of `table`."""
    ids = table.sequence_ids(indices)  # [B, 2] stored sequence numbers
    order = np.concatenate([ids[:, 0], ids[:, 1]])
    unique, first, slot = np.unique(order, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # distinct sequences in order of first use
    slot = rank[slot]
    seqs = [table.stored_sequence(int(s)) for s in unique[np.argsort(first)]]
    groups: list[list[int]] = []
    if layout.share_prefixes:  # one segment per prompt row (a pair, or a row's K responses)
        members: dict[int, list[int]] = {}
        b = len(indices)
        for g, c, r in zip(table.group_ids(indices).tolist(), slot[:b].tolist(),
                           slot[b:].tolist(), strict=True):  # fmt: skip
            seen = members.setdefault(g, [])
            seen += [x for x in (c, r) if x not in seen]
        groups = list(members.values())
    rows = layout.rows(seqs, groups)
    labels = PairLabels(
        chosen_unsafe=torch.from_numpy(table.label("chosen_unsafe", indices).astype(np.float32)),
        rejected_unsafe=torch.from_numpy(
            table.label("rejected_unsafe", indices).astype(np.float32)
        ),
        margin=torch.from_numpy(table.label("margin", indices).astype(np.float32)),
    )
    packed = attention.PackedAttention.build(rows, layout.kernel) if layout.packed else None
    b = len(indices)
    chosen, rejected = torch.from_numpy(slot[:b]), torch.from_numpy(slot[b:])
    return PairBatch(rows, labels, chosen, rejected, packed)


def pair_scores(batch: PairBatch, out: Any, token_scores: bool) -> PairScores:
    """Chosen and rejected end scores `[B]` of a score-model output on `batch` (its
    `end_scores` are in the rows' sequence order); with `token_scores`, also right-padded
    `[B, L]` per-token scores, ids and masks of both sides (what the token-wise loss reads)."""
    end = out.end_scores.squeeze(-1).float()
    c, r = batch.chosen.to(end.device), batch.rejected.to(end.device)
    tokens = None
    if token_scores:
        scores, mask = batch.rows.per_sequence(out.scores.squeeze(-1).float())
        ids, _ = batch.rows.per_sequence(batch.rows.input_ids.to(scores.device))
        mask = mask.to(scores.device)
        tokens = TokenScores(scores[c], scores[r], ids[c], ids[r], mask[c], mask[r])
    return PairScores(chosen=end[c], rejected=end[r], tokens=tokens)
