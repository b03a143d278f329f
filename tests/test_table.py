"""The pair table: flat token storage, selections that share it, stable content hashes, and the
per-pair records evaluation reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from rmtrain.data.table import LABELS, PairTable, pair_hash


def _table() -> PairTable:
    chosen = [[1, 2, 3], [4, 5], [1, 2, 9, 9]]
    rejected = [[1, 2, 7], [4], [1, 2, 3]]
    labels = {k: [0, 1, 0] for k in LABELS}
    metas = [json.dumps({"source": "f.jsonl", "row": r, "subset": "s"}) for r in (3, 5, 8)]
    return PairTable.from_lists(chosen, rejected, labels, metas)


def test_storage_and_reads() -> None:
    t = _table()
    assert t.tokens.dtype == np.int32 and t.offsets.tolist() == [0, 3, 6, 8, 9, 13, 16]
    assert len(t) == 3 and t.lengths().tolist() == [6, 3, 7]
    assert [s.tolist() for s in t.sequences([2, 0])] == [[1, 2, 9, 9], [1, 2, 3], [1, 2, 3],
                                                         [1, 2, 7]]  # fmt: skip
    assert t[1] == {"chosen_input_ids": [4, 5], "rejected_input_ids": [4],
                    "chosen_unsafe": True, "rejected_unsafe": True, "chosen_severity": 1,
                    "rejected_severity": 1, "margin": 1.0, "meta": t.meta[1]}  # fmt: skip


def test_selection_shares_storage_and_compacts_to_the_same_pairs() -> None:
    t = _table()
    sel = t.select([2, 2, 0])  # a repeat, as a mixture weight of 2 makes
    assert sel.tokens is t.tokens and len(sel) == 3
    assert [r["chosen_input_ids"] for r in sel] == [[1, 2, 9, 9], [1, 2, 9, 9], [1, 2, 3]]
    assert sel.select([2])[0] == t[0]  # a selection of a selection
    flat = sel.compact()
    assert flat.tokens is not t.tokens and len(flat.tokens) == 7 + 7 + 6
    assert list(flat) == list(sel)
    both = PairTable.concat([sel, t])
    assert list(both) == [*sel, *t] and len(both.meta) == 6


def test_hashes_count_duplicates_and_overlap() -> None:
    t = _table()
    assert t.duplicates() == 0 and t.select([0, 1, 0]).duplicates() == 1
    assert t.select([1]).overlap(t.pair_hashes()) == 1
    other = PairTable.from_lists([[4]], [[4, 5]], {k: [0] for k in LABELS}, ["{}"])
    assert other.overlap(t.pair_hashes()) == 0  # the same tokens on swapped sides differ
    assert pair_hash([1, 2, 3], [1, 2, 7]) == int(t.pair_hashes()[0])


def test_hash_is_the_same_in_another_process() -> None:
    """A content hash (blake2b of the int32 ids), not Python's per-process salted `hash`: a
    cache written by one process is read by another."""
    code = "from rmtrain.data.table import pair_hash; print(pair_hash([1, 2, 3], [1, 2, 7]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert int(out.stdout) == pair_hash([1, 2, 3], [1, 2, 7])


def test_record_counts_response_tokens_after_the_shared_prefix() -> None:
    t = _table()
    assert t.record(0, 1.5, -0.5) == {"index": 0, "chosen_score": 1.5, "rejected_score": -0.5,
                                      "chosen_len": 1, "rejected_len": 1, "source": "f.jsonl",
                                      "row": 3, "subset": "s"}  # fmt: skip
    r = t.record(2, 0.0, 0.0)  # one side a prefix of the other: diverge where it ends
    assert (r["chosen_len"], r["rejected_len"]) == (2, 1)
    assert t.select([1]).record(0, 0.0, 0.0)["row"] == 5
