"""Tokenized preference pairs as flat arrays: what training, evaluation and `rmtrain eval` read.

A :class:`PairTable` holds every pair's two token sequences back to back in one int32 array
(`tokens`, with `offsets`: sequence ``2 * p`` is pair p's chosen side, ``2 * p + 1`` its
rejected side), one array per label (safety flags, severities, margin), a 64-bit content hash
per pair (duplicate and train/eval overlap counts), and each pair's evaluation labels as JSON
(`meta`). A table shows the pairs its `index` names, so selecting, repeating (mixture weights)
and shuffling pairs never copies tokens.

A micro-batch is a few array slices (:meth:`PairTable.sequences`), turned into tensors once, by
:func:`rmtrain.batch.collate`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

LABELS = ("chosen_unsafe", "rejected_unsafe", "chosen_severity", "rejected_severity", "margin")
_DTYPES = {
    "chosen_unsafe": np.bool_,
    "rejected_unsafe": np.bool_,
    "chosen_severity": np.int8,
    "rejected_severity": np.int8,
    "margin": np.float32,
}
SIDES = ("chosen", "rejected")


def pair_hash(chosen: Sequence[int] | np.ndarray, rejected: Sequence[int] | np.ndarray) -> int:
    """A 64-bit content hash of a tokenized pair (the same in every process, unlike `hash`)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(chosen, dtype=np.int32).tobytes())
    h.update(b"|")
    h.update(np.asarray(rejected, dtype=np.int32).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass
class PairTable:
    tokens: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [2 * stored pairs + 1]
    labels: dict[str, np.ndarray]  # LABELS, one value per stored pair
    hashes: np.ndarray  # uint64 [stored pairs]
    meta: Sequence[str]  # JSON per stored pair: source file and row, evaluation labels
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # shown pairs

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        chosen: Sequence[Sequence[int]],
        rejected: Sequence[Sequence[int]],
        labels: Mapping[str, Sequence[Any]],
        meta: Sequence[str],
    ) -> PairTable:
        """A table of tokenized pairs given as Python lists (one entry per pair)."""
        n = len(chosen)
        lengths = np.empty(2 * n, dtype=np.int64)
        lengths[0::2] = [len(c) for c in chosen]
        lengths[1::2] = [len(r) for r in rejected]
        offsets = np.zeros(2 * n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        for p in range(n):
            tokens[offsets[2 * p] : offsets[2 * p + 1]] = chosen[p]
            tokens[offsets[2 * p + 1] : offsets[2 * p + 2]] = rejected[p]
        hashes = np.array(
            [pair_hash(c, r) for c, r in zip(chosen, rejected, strict=True)], dtype=np.uint64
        )
        cols: dict[str, np.ndarray] = {
            k: np.asarray(labels[k], dtype=_DTYPES[k]).reshape(n) for k in LABELS
        }
        return cls(tokens, offsets, cols, hashes, list(meta), np.arange(n, dtype=np.int64))

    @classmethod
    def empty(cls) -> PairTable:
        return cls.from_lists([], [], {k: [] for k in LABELS}, [])

    @classmethod
    def concat(cls, tables: Sequence[PairTable]) -> PairTable:
        """One table of the pairs every table shows, in order (tokens are copied once)."""
        if len(tables) == 1:
            return tables[0]
        if not tables:
            return cls.empty()
        parts = [t.compact() for t in tables]
        bases = np.cumsum([0, *(len(t.tokens) for t in parts[:-1])])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)] + [t.offsets[1:] + b for t, b in zip(parts, bases, strict=True)]
        )
        n = sum(len(t) for t in parts)
        return cls(
            np.concatenate([t.tokens for t in parts]),
            offsets,
            {k: np.concatenate([t.labels[k] for t in parts]) for k in LABELS},
            np.concatenate([t.hashes for t in parts]),
            [m for t in parts for m in t.meta],
            np.arange(n, dtype=np.int64),
        )

    def compact(self) -> PairTable:
        """The same pairs with storage holding exactly them, in order (a no-op when it does)."""
        if len(self.index) == len(self.hashes) and np.array_equal(
            self.index, np.arange(len(self.hashes))
        ):
            return self
        starts, lengths = self._spans(self.index)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = _gather_spans(self.tokens, starts, lengths)
        return PairTable(
            flat,
            offsets,
            {k: v[self.index] for k, v in self.labels.items()},
            self.hashes[self.index],
            [self.meta[i] for i in self.index],
            np.arange(len(self.index), dtype=np.int64),
        )

    def select(self, indices: Sequence[int] | np.ndarray) -> PairTable:
        """The pairs at `indices` (repeats allowed), sharing this table's storage."""
        return replace(self, index=self.index[np.asarray(indices, dtype=np.int64)])

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def _spans(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of both sequences of the stored pairs, chosen then rejected per pair."""
        seq = np.stack([2 * stored, 2 * stored + 1], axis=1).reshape(-1)
        return self.offsets[seq], self.offsets[seq + 1] - self.offsets[seq]

    def seq(self, side: str, i: int) -> np.ndarray:
        """The token ids of side "chosen" / "rejected" of pair i."""
        s = 2 * int(self.index[i]) + SIDES.index(side)
        return self.tokens[self.offsets[s] : self.offsets[s + 1]]

    def sequences(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The 2B sequences of pairs `indices`: every chosen side, then every rejected side."""
        stored = self.index[np.asarray(indices, dtype=np.int64)]
        out = [self.tokens[self.offsets[2 * p] : self.offsets[2 * p + 1]] for p in stored]
        out += [self.tokens[self.offsets[2 * p + 1] : self.offsets[2 * p + 2]] for p in stored]
        return out

    def label(self, name: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        stored = self.index if indices is None else self.index[np.asarray(indices, np.int64)]
        return self.labels[name][stored]

    def lengths(self) -> np.ndarray:
        """Tokens of each pair, chosen + rejected (what token budgets pack by)."""
        _, lengths = self._spans(self.index)
        return lengths.reshape(-1, 2).sum(axis=1)

    def pair_hashes(self) -> np.ndarray:
        return self.hashes[self.index]

    def meta_of(self, i: int) -> dict[str, Any]:
        return dict(json.loads(self.meta[int(self.index[i])]))

    def record(self, i: int, chosen_score: float, rejected_score: float) -> dict[str, Any]:
        """Pair i scored, as `rmtrain.eval.metrics` reads it: both scores, the response lengths
        in tokens (after the prefix both sides share) and the evaluation labels of its meta."""
        c, r = self.seq("chosen", i), self.seq("rejected", i)
        n = min(len(c), len(r))
        differ = np.flatnonzero(c[:n] != r[:n])
        shared = int(differ[0]) if len(differ) else n
        return {"index": i, "chosen_score": chosen_score, "rejected_score": rejected_score,
                "chosen_len": len(c) - shared, "rejected_len": len(r) - shared,
                **self.meta_of(i)}  # fmt: skip

    def duplicates(self) -> int:
        """Pairs whose (chosen, rejected) tokens occur earlier in the table."""
        return len(self) - len(np.unique(self.pair_hashes()))

    def overlap(self, other_hashes: np.ndarray) -> int:
        """Pairs of this table that `other_hashes` (another table's pair hashes) also holds."""
        return int(np.isin(self.pair_hashes(), other_hashes).sum())

    # -- a dataset-like view, for inspection and tests --------------------------------------------
    def __getitem__(self, key: int | str) -> Any:
        """`table[i]`: pair i as a dict (ids as lists); `table["column"]`: a column as a list."""
        if isinstance(key, str):
            return [self[i][key] for i in range(len(self))]
        row: dict[str, Any] = {f"{s}_input_ids": self.seq(s, key).tolist() for s in SIDES}
        row.update({k: v[self.index[key]].item() for k, v in self.labels.items()})
        row["meta"] = self.meta[int(self.index[key])]
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def _gather_spans(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tokens[starts[0]:starts[0]+lengths[0]] ++ tokens[starts[1]:...] ++ ..., vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=tokens.dtype)
    ends = np.cumsum(lengths)
    begin = ends - lengths
    pos = np.arange(total, dtype=np.int64) - np.repeat(begin, lengths) + np.repeat(starts, lengths)
    return tokens[pos]
