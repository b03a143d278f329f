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
from rmtrain.data.collate import truncate_keep_eos
from rmtrain.data.errors import DataError, where
from rmtrain.data.formats import resolve
from rmtrain.data.sources import ROW_COL, SOURCE_COL
from rmtrain.text import TextError, render, trained_template


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


PAIR_FEATURES = datasets.Features(
    {
        "chosen_input_ids": datasets.List(datasets.Value("int32")),
        "rejected_input_ids": datasets.List(datasets.Value("int32")),
        "chosen_unsafe": datasets.Value("bool"),
        "rejected_unsafe": datasets.Value("bool"),
        "chosen_severity": datasets.Value("int32"),
        "rejected_severity": datasets.Value("int32"),
        "margin": datasets.Value("float32"),
        # JSON: the source file and row, and what evaluation groups the pair by (RawPairs.meta)
        "meta": datasets.Value("string"),
    }
)


def pair_key(chosen: list[int], rejected: list[int]) -> int:
    """A hash of a tokenized pair, to count duplicates and train/eval overlap."""
    return hash((tuple(chosen), tuple(rejected)))


def build_pairs(
    rows: datasets.Dataset, cfg: DataConfig, tokenizer: Any, objective: str = "reward"
) -> tuple[datasets.Dataset, DataStats]:
    """Tokenized (chosen, rejected) pairs of validated rows, and the stats of what was cut,
    skipped or dropped. Texts are rendered with the template `data.template` names."""
    if objective not in ("reward", "cost"):
        raise ValueError(f"objective must be 'reward' or 'cost', got {objective!r}")
    if objective == "cost" and cfg.preference != "safer":
        raise DataError("objective=cost trains on safety pairs: set data.preference=safer")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    try:
        template = trained_template(tokenizer, cfg.template)
    except TextError as exc:
        raise DataError(str(exc)) from exc
    rows = rows.with_format(None)
    cols: dict[str, list[Any]] = rows[:]
    n = len(rows)
    cols.setdefault(SOURCE_COL, ["<rows>"] * n)
    cols.setdefault(ROW_COL, list(range(1, n + 1)))
    first = {k: v[0] for k, v in cols.items()} if n else None
    schema = resolve(cfg.format, cfg.path, rows.column_names, first)
    raw, skipped = schema.to_pairs(cols, cfg, objective)
    stats = DataStats(
        rows=n, inconsistent_skipped=skipped.inconsistent, severity_filtered=skipped.severity
    )

    ids: dict[str, list[list[int]]] = {}
    cut = [False] * len(raw)
    for side in ("chosen", "rejected"):
        texts = []
        for i, conversation in enumerate(getattr(raw, side)):
            try:
                texts.append(render(tokenizer, conversation, template))
            except TextError as exc:
                raise DataError(where(raw.source[i], raw.row[i], side, str(exc))) from exc
        ids[side] = []
        for i, seq in enumerate(tokenizer(texts)["input_ids"] if texts else []):
            seq, was_cut = truncate_keep_eos(list(seq), cfg.max_length, eos_id)
            ids[side].append(seq)
            cut[i] = cut[i] or was_cut

    keep = [i for i in range(len(raw)) if ids["chosen"][i] != ids["rejected"][i]]
    stats.identical_dropped = len(raw) - len(keep)
    stats.truncated = sum(cut[i] for i in keep)
    stats.pairs = len(keep)
    seen: set[int] = set()
    for i in keep:
        key = pair_key(ids["chosen"][i], ids["rejected"][i])
        stats.duplicates += key in seen
        seen.add(key)
    columns: dict[str, list[Any]] = {
        "chosen_input_ids": ids["chosen"],
        "rejected_input_ids": ids["rejected"],
        "chosen_unsafe": raw.chosen_unsafe,
        "rejected_unsafe": raw.rejected_unsafe,
        "chosen_severity": raw.chosen_severity,
        "rejected_severity": raw.rejected_severity,
        "margin": raw.margin,
        "meta": [
            json.dumps({"source": raw.source[i], "row": raw.row[i], **meta})
            for i, meta in enumerate(raw.meta or [{}] * len(raw))
        ],
    }
    kept = {k: [v[i] for i in keep] for k, v in columns.items()}
    return datasets.Dataset.from_dict(kept, features=PAIR_FEATURES), stats
