"""Tokenized preference pairs as flat arrays: what training, evaluation and `rmtrain eval` read.

A :class:`PairTable` holds every pair's two token sequences back to back in one int32 array
(`tokens`, with `offsets`: sequence ``2 * p`` is pair p's chosen side, ``2 * p + 1`` its
rejected side), one array per label (safety flags, severities, margin), a 64-bit content hash
per pair (duplicate and train/eval overlap counts), and each pair's evaluation labels as JSON
(`meta`). A table shows the pairs its `index` names, so selecting, repeating (mixture weights)
and shuffling pairs never copies tokens.

Rows with K >= 2 responses to one prompt (UltraFeedback's completions, RewardBench 2's chosen
and rejected lists, RM-Bench's style variants, an explicit ranking) give several pairs that
share sequences. Such a table also has `pair_seqs` (the stored sequence numbers of each pair's
chosen and rejected side, so each of the K responses is stored once) and `groups` (one id per
row: the pairs of one row share a prompt, and `loss.k_way` trains them together). Tables
without such rows leave both None: sequence 2p / 2p + 1 and a group per pair. Every field is a
named numpy array (or a list of strings), so a cache can store the arrays as they are.

A micro-batch is a few array slices (:meth:`PairTable.sequences`), turned into tensors once, by
:func:`rmtrain.batch.collate`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any, overload

import numpy as np

LABELS = ("chosen_unsafe", "rejected_unsafe", "chosen_severity", "rejected_severity", "margin")
LABEL_DTYPES = {
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


class TextColumn(Sequence[str]):
    """Strings stored back to back: UTF-8 bytes and int64 offsets (string i is
    ``data[offsets[i]:offsets[i + 1]]``), e.g. a memory-mapped table's meta."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return max(len(self.offsets) - 1, 0)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return bytes(self.data[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8")


@dataclass
class PairTable:
    tokens: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [2 * stored pairs + 1]
    labels: dict[str, np.ndarray]  # LABELS, one value per stored pair
    hashes: np.ndarray  # uint64 [stored pairs]
    meta: Sequence[str]  # JSON per stored pair: source file and row, evaluation labels
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # shown pairs
    pair_seqs: np.ndarray | None = None  # int64 [stored pairs, 2]: (chosen, rejected) sequence
    groups: np.ndarray | None = None  # int64 [stored pairs]: the row (prompt) each pair is from

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        chosen: Sequence[Sequence[int]],
        rejected: Sequence[Sequence[int]],
        labels: Mapping[str, Sequence[Any]],
        meta: Sequence[str],
        groups: Sequence[int] | None = None,
    ) -> PairTable:
        """A table of tokenized pairs given as Python lists (one entry per pair). `groups`: the
        row each pair came from; where a row gave several pairs, its distinct sequences are
        stored once (:func:`distinct_sequences`) and the table records the groups (else both are
        left None)."""
        n = len(chosen)
        cols: dict[str, np.ndarray] = {
            k: np.asarray(labels[k], dtype=LABEL_DTYPES[k]).reshape(n) for k in LABELS
        }
        hashes = np.array(
            [pair_hash(c, r) for c, r in zip(chosen, rejected, strict=True)], dtype=np.uint64
        )
        group_ids = None if groups is None else np.asarray(groups, dtype=np.int64).reshape(n)
        if group_ids is not None and len(np.unique(group_ids)) < n:
            seqs, pair_seqs = distinct_sequences(chosen, rejected, group_ids)
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(x) for x in seqs], out=offsets[1:])
            tokens = np.fromiter(chain.from_iterable(seqs), np.int32, int(offsets[-1]))
            return cls(tokens, offsets, cols, hashes, list(meta), np.arange(n, dtype=np.int64),
                       pair_seqs, group_ids)  # fmt: skip
        lengths = np.empty(2 * n, dtype=np.int64)
        lengths[0::2] = [len(c) for c in chosen]
        lengths[1::2] = [len(r) for r in rejected]
        offsets = np.zeros(2 * n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        for p in range(n):
            tokens[offsets[2 * p] : offsets[2 * p + 1]] = chosen[p]
            tokens[offsets[2 * p + 1] : offsets[2 * p + 2]] = rejected[p]
        return cls(tokens, offsets, cols, hashes, list(meta), np.arange(n, dtype=np.int64))

    @classmethod
    def empty(cls) -> PairTable:
        return cls.from_lists([], [], {k: [] for k in LABELS}, [])

    @classmethod
    def concat(cls, tables: Sequence[PairTable]) -> PairTable:
        """One table of the pairs every table shows, in order: selections of one storage share
        it, other tables are copied once."""
        if len(tables) == 1:
            return tables[0]
        if not tables:
            return cls.empty()
        if all(t.tokens is tables[0].tokens for t in tables):  # selections of one storage
            return replace(tables[0], index=np.concatenate([t.index for t in tables]))
        parts = [t.compact() for t in tables]
        bases = np.cumsum([0, *(len(t.tokens) for t in parts[:-1])])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)] + [t.offsets[1:] + b for t, b in zip(parts, bases, strict=True)]
        )
        n = sum(len(t) for t in parts)
        pair_seqs = groups = None
        if any(t.pair_seqs is not None for t in parts):
            seq_bases = np.cumsum([0, *(len(t.offsets) - 1 for t in parts[:-1])])
            ends = [int(t.stored_groups().max(initial=-1)) + 1 for t in parts[:-1]]
            group_bases = np.cumsum([0, *ends])
            pair_seqs = np.concatenate(
                [t.stored_pair_seqs() + b for t, b in zip(parts, seq_bases, strict=True)]
            )
            groups = np.concatenate(
                [t.stored_groups() + b for t, b in zip(parts, group_bases, strict=True)]
            )
        return cls(
            np.concatenate([t.tokens for t in parts]),
            offsets,
            {k: np.concatenate([t.labels[k] for t in parts]) for k in LABELS},
            np.concatenate([t.hashes for t in parts]),
            [m for t in parts for m in t.meta],
            np.arange(n, dtype=np.int64),
            pair_seqs,
            groups,
        )

    def compact(self) -> PairTable:
        """The same pairs with storage holding exactly them, in order (a no-op when it does)."""
        if len(self.index) == len(self.hashes) and np.array_equal(
            self.index, np.arange(len(self.hashes))
        ):
            return self
        groups = None
        if self.pair_seqs is None:
            seq_ids = self._seq_ids(self.index).reshape(-1)
            pair_seqs = None
        else:
            used = self.pair_seqs[self.index]
            seq_ids, first = np.unique(used.reshape(-1), return_index=True)
            seq_ids = seq_ids[np.argsort(first)]  # in order of first use
            renumber = np.empty(int(seq_ids.max()) + 1 if len(seq_ids) else 0, dtype=np.int64)
            renumber[seq_ids] = np.arange(len(seq_ids))
            pair_seqs = renumber[used]
            groups = self.stored_groups()[self.index]
        starts = self.offsets[seq_ids]
        lengths = self.offsets[seq_ids + 1] - starts
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return PairTable(
            _gather_spans(self.tokens, starts, lengths),
            offsets,
            {k: v[self.index] for k, v in self.labels.items()},
            self.hashes[self.index],
            [self.meta[i] for i in self.index],
            np.arange(len(self.index), dtype=np.int64),
            pair_seqs,
            groups,
        )

    def select(self, indices: Sequence[int] | np.ndarray) -> PairTable:
        """The pairs at `indices` (repeats allowed), sharing this table's storage."""
        return replace(self, index=self.index[np.asarray(indices, dtype=np.int64)])

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def stored_pair_seqs(self) -> np.ndarray:
        """`[stored pairs, 2]`: the stored sequence numbers of every pair's two sides."""
        if self.pair_seqs is not None:
            return self.pair_seqs
        n = len(self.hashes)
        return np.arange(2 * n, dtype=np.int64).reshape(n, 2)

    def stored_groups(self) -> np.ndarray:
        """`[stored pairs]`: each stored pair's group (a group per pair where none is recorded)."""
        return self.groups if self.groups is not None else np.arange(len(self.hashes))

    def sequence_ids(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """`[B, 2]`: the stored sequence numbers of (chosen, rejected) of pairs `indices`."""
        return self._seq_ids(self.index[np.asarray(indices, dtype=np.int64)])

    def _seq_ids(self, stored: np.ndarray) -> np.ndarray:
        """`[k, 2]`: the stored sequence numbers of (chosen, rejected) of stored pairs `stored`
        (2p and 2p + 1 where the table records none)."""
        if self.pair_seqs is None:
            return np.stack([2 * stored, 2 * stored + 1], axis=1)
        return self.pair_seqs[stored]

    def group_ids(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The group (prompt row) of each of pairs `indices` (all shown pairs: None)."""
        stored = self.index if indices is None else self.index[np.asarray(indices, np.int64)]
        return self.stored_groups()[stored]

    def group_members(self) -> list[list[int]]:
        """The shown pairs of every group (prompt row), groups in order of first appearance."""
        members: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids().tolist()):
            members.setdefault(g, []).append(i)
        return list(members.values())

    def group_lengths(self, members: Sequence[Sequence[int]]) -> np.ndarray:
        """Tokens of each group's distinct sequences (each of a row's responses once)."""
        out = np.empty(len(members), dtype=np.int64)
        for k, pairs in enumerate(members):
            seqs = np.unique(self.sequence_ids(pairs).reshape(-1))
            out[k] = int((self.offsets[seqs + 1] - self.offsets[seqs]).sum())
        return out

    def stored_sequence(self, s: int) -> np.ndarray:
        """The token ids of stored sequence `s`."""
        return self.tokens[self.offsets[s] : self.offsets[s + 1]]

    def _spans(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of both sequences of the stored pairs, chosen then rejected per pair."""
        seq = self._seq_ids(stored).reshape(-1)
        return self.offsets[seq], self.offsets[seq + 1] - self.offsets[seq]

    def seq(self, side: str, i: int) -> np.ndarray:
        """The token ids of side "chosen" / "rejected" of pair i."""
        return self.stored_sequence(int(self.sequence_ids([i])[0, SIDES.index(side)]))

    def sequences(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The 2B sequences of pairs `indices`: every chosen side, then every rejected side."""
        ids = self.sequence_ids(indices)
        return [self.stored_sequence(s) for s in (*ids[:, 0].tolist(), *ids[:, 1].tolist())]

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


def distinct_sequences(
    chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], groups: np.ndarray
) -> tuple[list[Sequence[int]], np.ndarray]:
    """The sequences to store and `[pairs, 2]` their numbers per (chosen, rejected): a group
    that holds several pairs (a row with K responses to one prompt) stores each distinct
    sequence once; a lone pair stores both its sides. The one rule of the in-memory table and
    the data cache (`groups`: each pair's non-negative group id)."""
    shared = np.bincount(groups)[groups] > 1 if len(groups) else np.zeros(0, bool)
    seqs: list[Sequence[int]] = []
    number: dict[tuple[int, tuple[int, ...]], int] = {}
    pair_seqs = np.empty((len(chosen), 2), np.int64)
    for p, sides in enumerate(zip(chosen, rejected, strict=True)):
        for side, ids in enumerate(sides):
            if shared[p]:
                key = (int(groups[p]), tuple(ids))
                if key in number:
                    pair_seqs[p, side] = number[key]
                    continue
                number[key] = len(seqs)
            pair_seqs[p, side] = len(seqs)
            seqs.append(ids)
    return seqs, pair_seqs


def _gather_spans(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tokens[starts[0]:starts[0]+lengths[0]] ++ tokens[starts[1]:...] ++ ..., vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=tokens.dtype)
    ends = np.cumsum(lengths)
    begin = ends - lengths
    pos = np.arange(total, dtype=np.int64) - np.repeat(begin, lengths) + np.repeat(starts, lengths)
    return tokens[pos]
