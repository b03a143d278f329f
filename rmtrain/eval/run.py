"""`rmtrain eval --model <export | run dir | checkpoint> --data <file> [--out DIR]`.

Reads each evaluation file exactly as training reads data (`rmtrain.data`: every training
format, detected from the columns or forced with `--format`; the export's template and
max_length; through the data cache, so a file evaluated again is not tokenized again), scores
every distinct sequence once with the export (`rmtrain.scoring.Scorer`) and computes every metric
from per-pair records with `rmtrain.eval.metrics.summarize`, the same code that evaluates during
training. Writes

- `<out>/eval/<set>.json`: every metric;
- `<out>/eval/<set>.pairs.jsonl`: the per-pair scores, lengths and labels (for hand counts);
- `<out>/eval/<set>/*.png` and `<out>/eval/<set>/report.md`;

and prints a compact table. RewardBench files get RewardBench's section scores, RM-Bench files
(`chosen` / `rejected` lists of style variants) its easy / normal / hard accuracies,
RewardBench 2 files (`chosen` / `rejected` lists of correct / incorrect completions,
`num_correct`, ...) the official best-of-N per subset, the Ties formula and the mean of the six
subsets, and PKU-SafeRLHF files the safety breakdowns, their chosen side following
`--preference` (default: `safer` for a cost model, else `better`). Pairs whose two sides are
identical are kept (a tie).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmtrain.config import SourceConfig
from rmtrain.data.assemble import load_pairs
from rmtrain.data.cache import Ranks
from rmtrain.data.sources import plan_read
from rmtrain.errors import DataError, UserError
from rmtrain.eval import metrics
from rmtrain.eval.outputs import write_set
from rmtrain.scoring import NonFiniteScores, Scorer, add_data_arguments


def resolve_export(path: Path, workdir: Path) -> Path:
    """An export directory for `path`: an export itself, a run directory's `export/`, or a
    checkpoint (exported into `workdir` first)."""
    if (path / "config.json").is_file():
        return path
    if (path / "export" / "config.json").is_file():
        return path / "export"
    from rmtrain.export import export_checkpoint

    return export_checkpoint(path, workdir / "export")


def evaluate_file(
    scorer: Scorer,
    data: Path,
    preference: str | None = None,
    fmt: str = "auto",
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-pair records) of one evaluation file."""
    kind: metrics.Kind = "cost" if scorer.objective == "cost" else "reward"
    preference = scorer.default_preference(preference)
    cfg = scorer.data_config(str(data), fmt)
    read = plan_read(cfg, cfg.train_split)  # a single file is read whole, every row checked
    if read.format == "pku_saferlhf" and preference == "safer":
        if "safer_response_id" not in read.pieces[0].columns:
            raise DataError(f"{data}: field 'safer_response_id': missing (--preference safer)")
        cfg = dataclasses.replace(cfg, preference="safer")
    table, _ = load_pairs(cfg, cfg.train_split, scorer.tokenizer, drop_identical=False,
                          ranks=_ranks())  # fmt: skip
    # Every distinct sequence once (RM-Bench's 3 x 3 pairs hold 6 texts).
    unique: dict[bytes, int] = {}
    slots = np.empty((len(table), 2), dtype=np.int64)
    seqs: list[np.ndarray] = []
    for p in range(len(table)):
        for k, side in enumerate(("chosen", "rejected")):
            ids = table.seq(side, p)
            slots[p, k] = unique.setdefault(ids.tobytes(), len(unique))
            if slots[p, k] == len(seqs):
                seqs.append(ids)
    scores = np.asarray(_score(scorer, seqs, progress))
    if not np.isfinite(scores).all():
        first = table.meta_of(int(np.flatnonzero(~np.isfinite(scores[slots]).all(1))[0]))
        raise NonFiniteScores(
            f"{data}: non-finite scores, the first at row {first['row']}: the model's weights "
            "are broken (a diverged run?)"
        )
    records = [
        table.record(p, float(scores[c]), float(scores[r])) for p, (c, r) in enumerate(slots)
    ]
    records = metrics.regroup(records)  # RM-Bench / RewardBench 2 rows from their pairs
    summary = metrics.summarize(records, kind=kind)
    summary.update(data=str(data), format=read.format, preference=cfg.preference, objective=kind)
    return summary, records


def _world() -> tuple[int, int]:
    """(rank, world size) under a launcher (torchrun, deepspeed), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _ranks() -> Ranks:
    """Under a launcher, the processes share tokenizing a file the data cache lacks."""
    rank, world = _world()
    if world == 1:
        return Ranks()
    from rmtrain.engine import all_gather_object

    return Ranks(rank, world, all_gather_object)


def _score(scorer: Scorer, seqs: list[np.ndarray], progress: bool) -> list[float]:
    """Every sequence's score. Under a launcher each process scores a strided share and every
    process gets them all (so all of them reach the same result, or the same error)."""
    rank, world = _world()
    if world == 1:
        return scorer.score_sequences(seqs, progress=progress, desc="evaluating")
    from rmtrain.engine import all_gather_object

    mine = scorer.score_sequences(seqs[rank::world], progress=progress and rank == 0,
                                  desc=f"evaluating ({world} processes)")  # fmt: skip
    parts = all_gather_object(mine)
    scores = [0.0] * len(seqs)
    for r, part in enumerate(parts):
        scores[r::world] = part
    return scores


def table(summary: dict[str, Any]) -> str:
    """A compact text table: overall, per subset / category, and the benchmark sections."""
    lines = [f"{'set':<32} {'pairs':>6} {'accuracy':>9} {'margin':>8}"]
    overall = summary["overall"]
    lines.append(
        f"{'overall':<32} {overall.get('n', 0):>6} {_f(overall.get('accuracy'))} "
        f"{_f(overall.get('mean_margin'))}"
    )
    for block in ("by_subset", "by_category"):
        for name, stats in sorted((summary.get(block) or {}).items()):
            lines.append(f"  {name[:30]:<30} {stats.get('n', 0):>6} {_f(stats.get('accuracy'))}")
    safety = summary.get("safety") or {}
    for block, title in (("by_harm_category", "harm"), ("by_severity", "severity"),
                         ("by_safety", "safety")):  # fmt: skip
        for name, stats in sorted((safety.get(block) or {}).items()):
            lines.append(f"  {title}/{name[:30 - len(title) - 1]:<{29 - len(title)}} "
                         f"{stats.get('n', 0):>6} {_f(stats.get('accuracy'))}")  # fmt: skip
    for block in ("rewardbench", "rmbench"):
        for name, value in (summary.get(block) or {}).items():
            if isinstance(value, float):
                lines.append(f"{block}/{name:<24} {'':>6} {_f(value)}")
    rb2 = summary.get("rewardbench2") or {}
    for name, stats in (rb2.get("subsets") or {}).items():
        lines.append(f"rewardbench2/{name[:19]:<19} {stats['n']:>6} {_f(stats['score'])}")
    if rb2:
        lines.append(f"rewardbench2/score {'':>20} {_f(rb2.get('score'))}")
    return "\n".join(lines)


def _f(x: Any) -> str:
    return f"{x:>9.4f}" if isinstance(x, float) else f"{'n/a':>9}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rmtrain eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="export, run dir or checkpoint")
    p.add_argument("--data", required=True, type=Path, nargs="+", help="evaluation JSONL file(s)")
    p.add_argument("--out", type=Path, default=Path("."), help="writes <out>/eval/<set>.*")
    add_data_arguments(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="default: the trained one")
    p.add_argument("--device", default=None, help="default: this process's GPU if any, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Under `torchrun` / the `deepspeed` launcher every process scores a share of each file
    (on its own GPU) and rank 0 writes the results."""
    args = parse_args(argv)
    rank, world = _world()
    if world > 1:
        from rmtrain.engine import init_distributed

        init_distributed(timeout_s=1800)
    device = args.device or (
        f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    )
    try:
        with tempfile.TemporaryDirectory() as work:
            export = resolve_export(args.model, Path(work))
            scorer = Scorer(export, batch_size=args.batch_size, device=device)
            scorer.max_length = args.max_length or scorer.meta.get("max_length")
            for data in args.data:
                summary, records = evaluate_file(
                    scorer, data, args.preference, args.format, progress=not args.no_progress
                )
                if rank != 0:
                    continue
                name = SourceConfig(path=str(data)).display()
                write_set(args.out, name, summary, records)
                path = args.out / "eval" / f"{name}.json"
                print(f"{data}: {summary['n_pairs']} pairs -> {path}\n{table(summary)}")
    except (UserError, FileNotFoundError) as err:
        if rank == 0:
            print(f"rmtrain eval: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if world > 1:
        from rmtrain.engine import shutdown

        shutdown()


if __name__ == "__main__":
    main()
