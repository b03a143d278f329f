"""A run's data: the training pairs (one source or a weighted mixture), the main eval set, the
extra eval sets, and the counts and held-out record that the run logs, checkpoints and writes
into the model card.

The mixed training set is materialised once, from the seed, before training starts: source k
contributes round(weight_k x pairs_k) pairs (whole copies, then a seeded sample of the rest), in
source order. The batch plan then permutes that fixed set per epoch exactly as it does for one
source, so resume and the data-order checks work unchanged.

``data.eval_fraction`` holds out a seeded fraction of each source's rows (before weighting, so a
repeated pair never lands on both sides); which rows were held out is recorded (file and line).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from rmtrain.config import DataConfig, SourceConfig
from rmtrain.data.pairs import DataStats, build_pairs
from rmtrain.data.sources import ROW_COL, SOURCE_COL, load_rows
from rmtrain.data.table import PairTable
from rmtrain.errors import DataError


@dataclass
class RunData:
    train: PairTable
    eval: PairTable
    eval_sets: dict[str, PairTable] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """{"train": ..., "eval": ..., "train/<source>": ..., "eval/<set>": ...} (RunRecord.data)."""
    held_out: dict[str, Any] = field(default_factory=dict)
    """How the main eval set was chosen; for eval_fraction the held-out rows, per file."""
    warnings: list[str] = field(default_factory=list)


def source_config(d: DataConfig, src: SourceConfig) -> DataConfig:
    """The data settings of one source: the run's, with the source's location and format."""
    return dataclasses.replace(
        d,
        path=src.path,
        format=src.format,
        name=src.name,
        revision=src.revision,
        train_split=src.split,
        eval_split=src.split,
        mixture=[],
        eval_sets=[],
        eval_fraction=0.0,
        eval_path=None,
    )


def carve(rows: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, ...]:
    """(train rows, held-out rows): a seeded `fraction` of the rows (at least one) held out."""
    n = len(rows)
    k = min(max(1, round(fraction * n)), n - 1) if n > 1 else 0
    held = set(random.Random(f"rmtrain-eval:{seed}").sample(range(n), k))
    keep = [i for i in range(n) if i not in held]
    return rows.select(keep), rows.select(sorted(held))


def mix(pairs: PairTable, weight: float, seed: int, label: str) -> PairTable:
    """round(weight x n) pairs of a source: whole copies, then a seeded sample of the rest."""
    n = len(pairs)
    total = round(weight * n)
    whole, rest = divmod(total, n) if n else (0, 0)
    sample = sorted(random.Random(f"rmtrain-mix:{seed}:{label}").sample(range(n), rest))
    return pairs.select([*range(n)] * whole + sample)


def _held_rows(rows: datasets.Dataset) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for source, row in zip(rows[SOURCE_COL], rows[ROW_COL], strict=True):
        out.setdefault(source, []).append(int(row))
    return out


def _sum(stats: list[DataStats]) -> DataStats:
    total = DataStats()
    for s in stats:
        for f in dataclasses.fields(DataStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total


def load_run_data(d: DataConfig, tokenizer: Any, objective: str, seed: int) -> RunData:
    """Everything a run trains and evaluates on (see the module docstring)."""
    mixture = [(src.display(), source_config(d, src), src.weight) for src in d.mixture]
    if not mixture:
        if Path(d.path).expanduser().is_file() and not (d.eval_fraction or d.eval_path):
            raise DataError(
                f"{d.path}: a single file holds no eval split: set data.eval_fraction=0.1 to "
                "hold out rows, or data.eval_path=<eval file>"
            )
        mixture = [("", d, 1.0)]

    out = RunData(PairTable.empty(), PairTable.empty())
    train_parts, unweighted, eval_parts, train_stats, eval_stats = [], [], [], [], []
    held: dict[str, list[int]] = {}
    for label, scfg, weight in mixture:
        rows = load_rows(scfg, scfg.train_split)
        if d.eval_fraction:
            rows, held_rows = carve(rows, d.eval_fraction, d.split_seed)
            held.update(_held_rows(held_rows))
            pairs, stats = build_pairs(held_rows, scfg, tokenizer, objective)
            eval_parts.append(pairs)
            eval_stats.append(stats)
        pairs, stats = build_pairs(rows, scfg, tokenizer, objective)
        unweighted.append(pairs)
        if label:
            mixed = mix(pairs, weight, seed, label)
            out.counts[f"train/{label}"] = {**stats.as_dict(), "mixed": len(mixed)}
            pairs = mixed
        train_parts.append(pairs)
        train_stats.append(stats)
    out.train = PairTable.concat(train_parts)
    total = _sum(train_stats)
    if d.mixture:  # across sources too, before weighting repeats pairs on purpose
        total.duplicates = PairTable.concat(unweighted).duplicates()
    out.counts["train"] = total.as_dict()
    if d.mixture:
        out.counts["train"]["mixed"] = len(out.train)

    if d.eval_fraction:
        out.held_out = {
            "method": "eval_fraction",
            "eval_fraction": d.eval_fraction,
            "split_seed": d.split_seed,
            "rows": held,
        }
        out.eval = PairTable.concat(eval_parts)
        main_stats = _sum(eval_stats)
    else:
        if d.eval_path:
            ecfg = dataclasses.replace(d, path=d.eval_path, mixture=[])
            out.held_out = {"method": "eval_path", "path": d.eval_path, "split": d.eval_split}
        else:
            ecfg = d
            out.held_out = {"method": "split", "path": d.path, "split": d.eval_split}
        out.eval, main_stats = build_pairs(
            load_rows(ecfg, ecfg.eval_split), ecfg, tokenizer, objective
        )
    main_stats.duplicates = out.eval.duplicates()
    train_keys = out.train.pair_hashes()
    main_stats.in_train = out.eval.overlap(train_keys)
    out.counts["eval"] = main_stats.as_dict()

    for src in d.eval_sets:
        scfg = source_config(d, src)
        pairs, stats = build_pairs(load_rows(scfg, src.split), scfg, tokenizer, objective)
        stats.in_train = pairs.overlap(train_keys)
        out.eval_sets[src.display()] = pairs
        out.counts[f"eval/{src.display()}"] = stats.as_dict()

    _check_not_empty(d, out)
    for name, counts in out.counts.items():
        if counts.get("duplicates"):
            out.warnings.append(
                f"{name}: {counts['duplicates']} duplicate pairs (same chosen and rejected tokens "
                "as an earlier pair)"
            )
        if counts.get("in_train"):
            out.warnings.append(
                f"{name}: {counts['in_train']} of {counts['pairs']} pairs are also training "
                "pairs (train/eval overlap)"
            )
    return out


def _check_not_empty(d: DataConfig, data: RunData) -> None:
    """A set left without pairs is one error naming its file, its rows and why they went."""
    paths = {"train": d.path, "eval": d.eval_path or d.path}
    paths.update({f"eval/{src.display()}": src.path for src in d.eval_sets})
    sets = [("train", data.train), ("eval", data.eval)]
    sets += [(f"eval/{name}", pairs) for name, pairs in data.eval_sets.items()]
    for name, pairs in sets:
        if len(pairs) == 0:
            c = data.counts.get(name, {})
            raise DataError(
                f"{paths.get(name, d.path)}: no usable pairs left in {name} ({c.get('rows', 0)} "
                f"rows; {c.get('identical_dropped', 0)} pairs identical after tokenization and "
                f"truncation to data.max_length={d.max_length}, "
                f"{c.get('inconsistent_skipped', 0)} inconsistent, "
                f"{c.get('severity_filtered', 0)} below data.min_severity_gap)"
            )


def summary(counts: dict[str, dict[str, int]]) -> list[str]:
    """Console lines at the start of a run: pairs, cuts and drops of every split and source."""
    lines = []
    for name, c in counts.items():
        extra = [f"{c['truncated']} truncated", f"{c['identical_dropped']} identical dropped"]
        for key in ("inconsistent_skipped", "severity_filtered", "duplicates", "in_train"):
            if c.get(key):
                extra.append(f"{c[key]} {key.replace('_', ' ')}")
        mixed = f" -> {c['mixed']} in the mixture" if "mixed" in c else ""
        pairs = f"{c['pairs']} pairs from {c['rows']} rows{mixed}"
        lines.append(f"data {name}: {pairs} ({', '.join(extra)})")
    return lines
