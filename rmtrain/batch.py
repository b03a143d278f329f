"""One micro-batch of preference pairs, made directly from the pair table: the one collate.

:func:`collate` takes B pairs of a :class:`~rmtrain.data.table.PairTable` and lays out their 2B
sequences (every chosen side, then every rejected side) in rows for one forward pass, padded or
packed (:class:`Layout`, :class:`rmtrain.packing.Rows`), with the pairs' labels as tensors.
:func:`pair_scores` reads the model's output back as chosen / rejected end scores (and, for the
token-wise loss, right-padded per-token views of both sides), whatever the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rmtrain.data.table import PairTable
from rmtrain.losses import PairLabels, PairScores, TokenScores
from rmtrain.packing import Rows, balanced_row_tokens, pack_sequences, pad_sequences, row_token_cost


@dataclass(frozen=True)
class Layout:
    """How a micro-batch's sequences become rows: padded (one row per sequence, on
    `padding_side`) or packed (`trainer.packing`: nearly full padding-free rows of the cheapest
    width, `balanced_row_tokens`; ONE row for flash attention, whose varlen path needs it)."""

    packed: bool
    pad_token_id: int
    padding_side: str = "right"
    one_row: bool = False
    token_cost: float = 1536.0

    @classmethod
    def for_model(cls, config: Any, packed: bool, padding_side: str) -> Layout:
        impl = str(getattr(config, "_attn_implementation", None) or "eager")
        return cls(
            packed=packed,
            pad_token_id=int(getattr(config, "pad_token_id", None) or 0),
            padding_side=padding_side,
            one_row="flash" in impl,
            token_cost=row_token_cost(config),
        )

    def rows(self, seqs: Sequence[np.ndarray | Sequence[int]]) -> Rows:
        if not self.packed:
            return pad_sequences(seqs, self.pad_token_id, self.padding_side)
        lengths = [len(s) for s in seqs]
        width = None if self.one_row else balanced_row_tokens(lengths, self.token_cost)
        return pack_sequences(seqs, max_row_tokens=width, pad_token_id=self.pad_token_id)


@dataclass
class PairBatch:
    """B pairs: their 2B sequences in rows (chosen 0..B-1, then rejected) and their labels."""

    rows: Rows
    labels: PairLabels

    @property
    def pairs(self) -> int:
        return int(self.labels.margin.numel())


def collate(table: PairTable, indices: Sequence[int], layout: Layout) -> PairBatch:
    """The micro-batch of pairs `indices` of `table`."""
    seqs = table.sequences(indices)
    labels = PairLabels(
        chosen_unsafe=torch.from_numpy(table.label("chosen_unsafe", indices).astype(np.float32)),
        rejected_unsafe=torch.from_numpy(
            table.label("rejected_unsafe", indices).astype(np.float32)
        ),
        margin=torch.from_numpy(table.label("margin", indices).astype(np.float32)),
    )
    return PairBatch(layout.rows(seqs), labels)


def pair_scores(batch: PairBatch, out: Any, token_scores: bool) -> PairScores:
    """Chosen and rejected end scores `[B]` of a score-model output on `batch` (its
    `end_scores` are in sequence order); with `token_scores`, also right-padded `[B, L]`
    per-token scores, ids and masks of both sides (what the token-wise loss reads)."""
    b = batch.pairs
    end = out.end_scores.squeeze(-1).float()
    tokens = None
    if token_scores:
        scores, mask = batch.rows.per_sequence(out.scores.squeeze(-1).float())
        ids, _ = batch.rows.per_sequence(batch.rows.input_ids.to(scores.device))
        mask = mask.to(scores.device)
        tokens = TokenScores(scores[:b], scores[b:], ids[:b], ids[b:], mask[:b], mask[b:])
    return PairScores(chosen=end[:b], rejected=end[b:], tokens=tokens)
