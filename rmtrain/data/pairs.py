"""Validated rows → tokenized (chosen, rejected) pairs, and the counts of what happened to them.

The schema adapter turns rows into conversations; :func:`rmtrain.text.render` turns each into
THE text the model scores; the tokenizer gives ids, cut from the right to ``max_length`` keeping
EOS. Pairs whose two sides are identical after tokenization are dropped. Every cut, drop and skip
is counted in :class:`DataStats`, which the run logs and the model card reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import datasets

from rmtrain.config import DataConfig
from rmtrain.data.formats import resolve
from rmtrain.data.schemas import RawPairs
from rmtrain.data.sources import ROW_COL, SOURCE_COL
from rmtrain.data.table import LABELS, PairTable
from rmtrain.errors import DataError, TextError, where
from rmtrain.text import render, trained_template

# The closing tail kept on truncation: EOS and at most this many tokens after it (ChatML's newline).
_MAX_TAIL = 4


def truncate_keep_eos(ids: list[int], max_length: int, eos_id: int) -> tuple[list[int], bool]:
    """The one truncation rule (training, `rmtrain score`, `rmtrain eval`): cut from the right
    keeping the closing tail (the last EOS and what follows it, e.g. ChatML's `<|im_end|>\n`),
    so the read-out token survives truncation unchanged."""
    if len(ids) <= max_length:
        return ids, False
    tail = [eos_id]
    for k in range(1, min(_MAX_TAIL + 1, len(ids)) + 1):
        if ids[-k] == eos_id:
            tail = ids[-k:]
            break
    return [*ids[: max_length - len(tail)], *tail], True


@dataclass
class DataStats:
    """What happened to the rows of one split; logged so that truncation and drops are visible."""

    rows: int = 0
    pairs: int = 0
    truncated: int = 0  # kept pairs with either side cut to max_length
    identical_dropped: int = 0  # chosen ids == rejected ids after tokenization
    inconsistent_skipped: int = 0  # cost objective, data.inconsistent_labels=skip
    severity_filtered: int = 0  # |severity_0 - severity_1| < data.min_severity_gap
    duplicates: int = 0  # kept pairs whose (chosen, rejected) ids occur earlier in the split
    in_train: int = 0  # eval sets: pairs whose (chosen, rejected) ids are also training pairs

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        """Prefix is prepended as is: ``as_dict("data/train/")`` → ``{"data/train/rows": ...}``."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def build_pairs(
    rows: datasets.Dataset,
    cfg: DataConfig,
    tokenizer: Any,
    objective: str = "reward",
    drop_identical: bool = True,
) -> tuple[PairTable, DataStats]:
    """Tokenized (chosen, rejected) pairs of validated rows, and the stats of what was cut,
    skipped or dropped. Texts are rendered with the template `data.template` names."""
    rows = rows.with_format(None)
    cols: dict[str, list[Any]] = rows[:]
    n = len(rows)
    cols.setdefault(SOURCE_COL, ["<rows>"] * n)
    cols.setdefault(ROW_COL, list(range(1, n + 1)))
    first = {k: v[0] for k, v in cols.items()} if n else None
    schema = resolve(cfg.format, cfg.path, rows.column_names, first)
    if objective == "cost" and cfg.preference != "safer":
        raise DataError("objective=cost trains on safety pairs: set data.preference=safer")
    raw, skipped = schema.to_pairs(cols, cfg, objective)
    table, stats, _ = tokenize_pairs(raw, cfg, tokenizer, drop_identical)
    stats.rows = n
    stats.inconsistent_skipped, stats.severity_filtered = skipped.inconsistent, skipped.severity
    return table, stats


def encode(
    tokenizer: Any, texts: list[str], max_length: int | None
) -> tuple[list[list[int]], list[bool]]:
    """THE ids of rendered texts: `tokenizer(text)`, cut to `max_length` keeping the closing
    tail (:func:`truncate_keep_eos`; None: no cut); and which texts were cut."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    ids, cut = [], []
    for seq in tokenizer(texts)["input_ids"] if texts else []:
        seq = seq if isinstance(seq, list) else list(seq)  # (a fast tokenizer's are lists)
        if max_length is not None:
            seq, was_cut = truncate_keep_eos(seq, max_length, eos_id)
        else:
            was_cut = False
        ids.append(seq)
        cut.append(was_cut)
    return ids, cut


def encode_pairs(
    raw: RawPairs, tokenizer: Any, template: str, max_length: int | None
) -> tuple[list[list[int]], list[list[int]], list[bool], list[bool]]:
    """THE ids of both sides of every pair: rendered with the trained chat template `template`
    (:func:`rmtrain.text.trained_template`), tokenized and cut (:func:`encode`); and which
    sides were cut. A conversation the template cannot render is a DataError naming its row."""
    ids: dict[str, list[list[int]]] = {}
    cut: dict[str, list[bool]] = {}
    for side in ("chosen", "rejected"):
        texts = []
        for i, conversation in enumerate(getattr(raw, side)):
            try:
                texts.append(render(tokenizer, conversation, template))
            except TextError as exc:
                raise DataError(where(raw.source[i], raw.row[i], side, str(exc))) from exc
        ids[side], cut[side] = encode(tokenizer, texts, max_length)
    return ids["chosen"], ids["rejected"], cut["chosen"], cut["rejected"]


def run_template(tokenizer: Any, cfg: DataConfig) -> str:
    """The trained chat template of `data.template` (a DataError when the tokenizer has none)."""
    try:
        return trained_template(tokenizer, cfg.template)
    except TextError as exc:
        raise DataError(str(exc)) from exc


def tokenize_pairs(
    raw: RawPairs, cfg: DataConfig, tokenizer: Any, drop_identical: bool = True
) -> tuple[PairTable, DataStats, int]:
    """Render (`data.template`), tokenize and cut (`data.max_length`) both sides of every pair:
    the pair table, its stats (pairs, truncated, identical_dropped, duplicates) and how many
    sequences were cut. Pairs whose two sides are identical are dropped unless evaluation keeps
    them (`drop_identical=False`: a benchmark counts them as ties)."""
    chosen, rejected, cut_c, cut_r = encode_pairs(
        raw, tokenizer, run_template(tokenizer, cfg), cfg.max_length
    )
    same = [chosen[i] == rejected[i] for i in range(len(raw))]
    keep = [i for i in range(len(raw)) if not (drop_identical and same[i])]
    stats = DataStats(pairs=len(keep), identical_dropped=len(raw) - len(keep))
    stats.truncated = sum(cut_c[i] or cut_r[i] for i in keep)
    # The pairs of one row (K responses to one prompt) form a group: stored once, trained
    # together with loss.k_way.
    rows: dict[tuple[str, int], int] = {}
    groups = [rows.setdefault((raw.source[i], raw.row[i]), len(rows)) for i in keep]
    table = PairTable.from_lists(
        [chosen[i] for i in keep],
        [rejected[i] for i in keep],
        {k: [getattr(raw, k)[i] for i in keep] for k in LABELS},
        [pair_meta(raw, i) for i in keep],
        groups,
    )
    stats.duplicates = table.duplicates()
    return table, stats, sum(cut_c[i] + cut_r[i] for i in keep)


def pair_meta(raw: RawPairs, i: int) -> str:
    """Pair i's meta: its source and row, and the labels evaluation groups it by (JSON)."""
    return json.dumps(
        {"source": raw.source[i], "row": raw.row[i], **(raw.meta[i] if raw.meta else {})}
    )
