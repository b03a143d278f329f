"""A run's data: the training pairs (one source or a weighted mixture), the main eval set, the
extra eval sets, and the counts and held-out record that the run logs, checkpoints and writes
into the model card.

The mixed training set is materialised once, from the seed, before training starts: source k
contributes round(weight_k x pairs_k) pairs (whole copies, then a seeded sample of the rest), in
source order. The batch plan then permutes that fixed set per epoch exactly as it does for one
source, so resume and the data-order checks work unchanged.

``data.eval_fraction`` holds out a seeded fraction of each source's rows (before weighting, so a
repeated pair never lands on both sides); which rows were held out is recorded (file and line).

Every split the run reads is tokenized once into the data cache (:mod:`rmtrain.data.cache`)
and mapped; the sets here are selections of its pairs (an index each, no copy), and their counts
are computed from its arrays. So the eval fraction, split seed, weights and seed can change
without tokenizing again.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from rmtrain.config import DataConfig, SourceConfig
from rmtrain.data.cache import Prepared, Ranks, prepare
from rmtrain.data.pairs import DataStats
from rmtrain.data.sources import plan_read
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
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """The data cache entry's key, content digest and inputs (what a resume checks)."""
    prepared: Prepared | None = None


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


def held_out(n: int, fraction: float, seed: int) -> list[int]:
    """The seeded `fraction` of `n` rows (at least one, never all) that eval_fraction holds out,
    ascending."""
    k = min(max(1, round(fraction * n)), n - 1) if n > 1 else 0
    return sorted(random.Random(f"rmtrain-eval:{seed}").sample(range(n), k))


def carve(rows: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, ...]:
    """(train rows, held-out rows): a seeded `fraction` of the rows (at least one) held out."""
    held = held_out(len(rows), fraction, seed)
    mask = np.ones(len(rows), bool)
    mask[held] = False
    return rows.select(np.flatnonzero(mask)), rows.select(held)


def mix(pairs: PairTable, weight: float, seed: int, label: str) -> PairTable:
    """round(weight x n) pairs of a source: whole copies, then a seeded sample of the rest."""
    n = len(pairs)
    total = round(weight * n)
    whole, rest = divmod(total, n) if n else (0, 0)
    sample = sorted(random.Random(f"rmtrain-mix:{seed}:{label}").sample(range(n), rest))
    return pairs.select([*range(n)] * whole + sample)


def _sum(stats: list[DataStats]) -> DataStats:
    total = DataStats()
    for s in stats:
        for f in dataclasses.fields(DataStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total


def load_run_data(
    d: DataConfig,
    tokenizer: Any,
    objective: str,
    seed: int,
    ranks: Ranks | None = None,
    progress: bool = False,
) -> RunData:
    """Everything a run trains and evaluates on (see the module docstring). `ranks`: the launch's
    ranks, which share the tokenizing of a cold cache; `progress`: show a progress bar."""
    mixture = [(src.display(), source_config(d, src), src.weight) for src in d.mixture]
    if not mixture:
        if Path(d.path).expanduser().is_file() and not (d.eval_fraction or d.eval_path):
            raise DataError(
                f"{d.path}: a single file holds no eval split: set data.eval_fraction=0.1 to "
                "hold out rows, or data.eval_path=<eval file>"
            )
        mixture = [("", d, 1.0)]
    if objective == "cost" and d.preference != "safer":
        raise DataError("objective=cost trains on safety pairs: set data.preference=safer")

    reads = [plan_read(scfg, scfg.train_split) for _, scfg, _ in mixture]
    out = RunData(PairTable.empty(), PairTable.empty())
    if d.eval_fraction:
        out.held_out = {"method": "eval_fraction", "eval_fraction": d.eval_fraction,
                        "split_seed": d.split_seed, "rows": {}}  # fmt: skip
    else:
        if d.eval_path:
            ecfg = dataclasses.replace(d, path=d.eval_path, mixture=[])
            out.held_out = {"method": "eval_path", "path": d.eval_path, "split": d.eval_split}
        else:
            ecfg = d
            out.held_out = {"method": "split", "path": d.path, "split": d.eval_split}
        reads.append(plan_read(ecfg, ecfg.eval_split))
    extra = [(src.display(), source_config(d, src)) for src in d.eval_sets]
    reads += [plan_read(scfg, src.split) for (_, scfg), src in zip(extra, d.eval_sets, strict=True)]
    data = prepare(reads, tokenizer, d, objective, ranks, progress)
    out.prepared, out.fingerprint = data, data.fingerprint
    every = data.table()

    train_parts, unweighted, eval_parts, train_stats, eval_stats = [], [], [], [], []
    for k, (label, _, weight) in enumerate(mixture):
        rows = None
        if d.eval_fraction:
            held = np.asarray(held_out(data.rows(k), d.eval_fraction, d.split_seed), np.int64)
            rows = np.ones(data.rows(k), bool)
            rows[held] = False
            out.held_out["rows"].update(data.row_lines(k, held))
            index, stats = data.split(k, ~rows)
            eval_parts.append(every.select(index))
            eval_stats.append(stats)
        index, stats = data.split(k, rows)
        pairs = every.select(index)
        stats.duplicates = pairs.duplicates()
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
        out.eval = PairTable.concat(eval_parts)
        main_stats = _sum(eval_stats)
    else:
        index, main_stats = data.split(len(mixture))
        out.eval = every.select(index)
    main_stats.duplicates = out.eval.duplicates()
    train_keys = out.train.pair_hashes()
    main_stats.in_train = out.eval.overlap(train_keys)
    out.counts["eval"] = main_stats.as_dict()

    first_set = len(reads) - len(extra)
    for k, (name, _) in enumerate(extra):
        index, stats = data.split(first_set + k)
        pairs = every.select(index)
        stats.duplicates = pairs.duplicates()
        stats.in_train = pairs.overlap(train_keys)
        out.eval_sets[name] = pairs
        out.counts[f"eval/{name}"] = stats.as_dict()

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


def load_pairs(
    cfg: DataConfig,
    split: str,
    tokenizer: Any,
    objective: str = "reward",
    drop_identical: bool = True,
    ranks: Ranks | None = None,
) -> tuple[PairTable, DataStats]:
    """The pairs of one split (through the data cache) and their counts: what `rmtrain eval`
    reads, and the cached path's answer to :func:`rmtrain.data.pairs.build_pairs`."""
    if objective == "cost" and cfg.preference != "safer":
        raise DataError("objective=cost trains on safety pairs: set data.preference=safer")
    data = prepare([plan_read(cfg, split)], tokenizer, cfg, objective, ranks)
    index, stats = data.split(0, drop_identical=drop_identical)
    table = data.table().select(index)
    stats.duplicates = table.duplicates()
    return table, stats


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


def cache_summary(data: Prepared) -> str:
    """The console line about the data cache: its entry, its size, and whether this launch
    tokenized it or found it (and how long that took)."""
    store = data.store
    how = "tokenized" if data.built else "found in the cache"
    return (
        f"data cache: {len(store['hashes']):,} pairs, {len(store['tokens']):,} tokens, "
        f"{store.nbytes() / 2**30:.2f} GiB at {store.path} ({how} in {data.seconds:.1f} s)"
    )
