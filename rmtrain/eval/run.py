"""`rmtrain eval --model <export | run dir | checkpoint> --data <file> [--out DIR]`.

Scores every pair of an evaluation file with an export (through `rmtrain.score.Scorer`: the
trained text format, length-sorted batches, padding-side independent) and writes

- `<out>/eval/<set>.json`: every metric of :func:`rmtrain.eval.metrics.summarize`;
- `<out>/eval/<set>.pairs.jsonl`: the per-pair scores, lengths and labels (for hand counts);
- `<out>/eval/<set>/*.png` and `<out>/eval/<set>/report.md`;

and prints a compact table. Rows may be:

- RewardBench-style pairs: `prompt` + `chosen` + `rejected` (strings, or message lists as in
  `rmtrain score`), with optional `subset`, `category`, `id`;
- RM-Bench rows: `chosen` and `rejected` are lists of style variants (3×3 comparison);
- RewardBench 2 rows: `chosen` / `rejected` lists of correct / incorrect completions with
  `num_correct`, `num_incorrect`, `total_completions`, `subset`, `id` (best-of-N per row, the
  Ties formula, the mean of the six subsets);
- PKU-SafeRLHF rows (`response_0/1`, `better_response_id` / `safer_response_id`, safety labels,
  severities, harm categories): the chosen side follows `--preference` (default: `safer` for a
  cost model, else `better`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rmtrain.eval import metrics
from rmtrain.eval.outputs import write_set
from rmtrain.score import NonFiniteScores, ScoreInputError, Scorer, side_conversation
from rmtrain.text import exchange


def resolve_export(path: Path, workdir: Path) -> Path:
    """An export directory for `path`: an export itself, a run directory's `export/`, or a
    checkpoint (exported into `workdir` first)."""
    if (path / "config.json").is_file():
        return path
    if (path / "export" / "config.json").is_file():
        return path / "export"
    from rmtrain.export import export_checkpoint

    return export_checkpoint(path, workdir / "export")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ScoreInputError(f"{path}: cannot read: {exc.strerror}") from exc
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ScoreInputError(f"{path}: line {n}: field '<json>': {exc}") from exc
        if not isinstance(row, dict):
            raise ScoreInputError(f"{path}: line {n}: field '<json>': expected a JSON object")
        rows.append((n, row))
    if not rows:
        raise ScoreInputError(f"{path}: no rows to evaluate")
    return rows


def _layout(row: dict[str, Any]) -> str:
    if "response_0" in row and "response_1" in row:
        return "pku_saferlhf"
    if "num_correct" in row and "total_completions" in row:
        return "rewardbench2"
    chosen = row.get("chosen")
    if isinstance(chosen, list) and chosen and all(isinstance(c, str) for c in chosen):
        return "rmbench"
    return "pairs"


def _conversations(
    path: Path, line: int, row: dict[str, Any], layout: str, preference: str
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """(chosen conversations, rejected conversations) of one row."""

    def fail(field: str, problem: str) -> ScoreInputError:
        return ScoreInputError(f"{path}: line {line}: field '{field}': {problem}")

    if layout == "pku_saferlhf":
        key = f"{preference}_response_id"
        c = row.get(key)
        if c not in (0, 1) or isinstance(c, bool):
            raise fail(key, f"expected 0 or 1, got {c!r:.40}")
        for k in (0, 1):
            if not isinstance(row.get(f"response_{k}"), str):
                raise fail(f"response_{k}", "expected str")
        if not isinstance(row.get("prompt"), str):
            raise fail("prompt", "expected str")
        p = row["prompt"]
        return [exchange(p, row[f"response_{c}"])], [exchange(p, row[f"response_{1 - c}"])]
    if layout == "rmbench":
        out = []
        for side in ("chosen", "rejected"):
            values = row.get(side)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise fail(side, "expected a list of response strings")
            if not isinstance(row.get("prompt"), str):
                raise fail("prompt", "expected str")
            out.append([exchange(row["prompt"], v) for v in values])
        if len(out[0]) != len(out[1]):
            raise fail("rejected", "needs as many style variants as chosen")
        return out[0], out[1]
    sides = []
    for side in ("chosen", "rejected"):
        found = side_conversation(row, side) if side in row else f"missing ({side})"
        if isinstance(found, str):
            raise fail(side, found)
        sides.append([found])
    return sides[0], sides[1]


def evaluate_file(
    scorer: Scorer, data: Path, preference: str | None = None, progress: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-pair records) of one evaluation file."""
    kind: metrics.Kind = "cost" if scorer.objective == "cost" else "reward"
    preference = preference or ("safer" if kind == "cost" else "better")
    rows = _read_jsonl(data)
    layout = _layout(rows[0][1])
    if layout == "rewardbench2":
        return evaluate_rewardbench2(scorer, data, progress)
    texts: list[str] = []
    responses: list[str] = []
    plan: list[tuple[int, int]] = []  # (n chosen, n rejected) texts per row
    for line, row in rows:
        chosen, rejected = _conversations(data, line, row, _layout(row), preference)
        for conversation in (*chosen, *rejected):
            try:
                texts.append(scorer.messages_text(conversation))
            except ValueError as exc:
                raise ScoreInputError(f"{data}: line {line}: {exc}") from exc
            responses.append(conversation[-1]["content"])
        plan.append((len(chosen), len(rejected)))
    scores = _score(scorer, texts, progress)
    lengths = [
        len(ids) for ids in scorer.tokenizer(responses, add_special_tokens=False)["input_ids"]
    ]
    records: list[dict[str, Any]] = []
    at = 0
    for (line, row), (n_c, n_r) in zip(rows, plan, strict=True):
        c_scores, r_scores = scores[at : at + n_c], scores[at + n_c : at + n_c + n_r]
        c_lens, r_lens = lengths[at : at + n_c], lengths[at + n_c : at + n_c + n_r]
        at += n_c + n_r
        record: dict[str, Any] = {"line": line, "id": row.get("id"), "subset": row.get("subset")}
        record["category"] = row.get("category")
        if layout == "rmbench":
            record.update(chosen_scores=c_scores, rejected_scores=r_scores,
                          chosen_lens=c_lens, rejected_lens=r_lens)  # fmt: skip
        else:
            record.update(chosen_score=c_scores[0], rejected_score=r_scores[0],
                          chosen_len=c_lens[0], rejected_len=r_lens[0])  # fmt: skip
        if layout == "pku_saferlhf":
            record.update(metrics.pku_pair_labels(row, row[f"{preference}_response_id"]))
        records.append(record)
    bad = [r["line"] for r in records for v in _scores_of(r) if not _finite(v)]
    if bad:
        raise NonFiniteScores(
            f"{data}: non-finite scores on {len(bad)} pair(s), the first at line {bad[0]}: the "
            "model's weights are broken (a diverged run?)"
        )
    summary = metrics.summarize(records, kind=kind)
    summary.update(data=str(data), layout=layout, preference=preference, objective=kind)
    return summary, records


def evaluate_rewardbench2(
    scorer: Scorer, data: Path, progress: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-row records) of a RewardBench 2 file, read through the data format
    registry: the `rewardbench2` adapter checks the rows (errors name file, row and field) and
    turns each row into its (correct, incorrect) pairs; every completion is scored once; the
    pairs' scores are regrouped per row (:func:`metrics.regroup_completions`) for the official
    numbers. The records (one per row, per-completion scores) go to the pairs file."""
    from rmtrain.config import DataConfig
    from rmtrain.data.errors import DataError
    from rmtrain.data.formats import BY_NAME
    from rmtrain.data.sources import load_rows

    kind: metrics.Kind = "cost" if scorer.objective == "cost" else "reward"
    cfg = DataConfig(path=str(data), format="rewardbench2")
    try:
        rows = load_rows(cfg, cfg.train_split).with_format(None)
        raw, _ = BY_NAME["rewardbench2"].to_pairs(rows[:], cfg, "reward")
    except DataError as exc:
        raise ScoreInputError(str(exc)) from exc
    slots: dict[tuple[Any, ...], int] = {}  # (source, row, side, index) -> text position
    texts: list[str] = []
    responses: list[str] = []
    for i, meta in enumerate(raw.meta):
        ci, ri = meta["completion"]
        for side, k, conversation in (("c", ci, raw.chosen[i]), ("r", ri, raw.rejected[i])):
            key = (raw.source[i], raw.row[i], side, k)
            if key not in slots:
                slots[key] = len(texts)
                try:
                    texts.append(scorer.messages_text(conversation))
                except ValueError as exc:
                    raise ScoreInputError(f"{data}: line {raw.row[i]}: {exc}") from exc
                responses.append(conversation[-1]["content"])
    scores = _score(scorer, texts, progress)
    if not all(_finite(x) for x in scores):
        raise NonFiniteScores(f"{data}: non-finite scores: the model's weights are broken")
    lengths = [
        len(ids) for ids in scorer.tokenizer(responses, add_special_tokens=False)["input_ids"]
    ]
    pairs = []
    for i, meta in enumerate(raw.meta):
        c = slots[(raw.source[i], raw.row[i], "c", meta["completion"][0])]
        r = slots[(raw.source[i], raw.row[i], "r", meta["completion"][1])]
        pairs.append({**meta, "source": raw.source[i], "row": raw.row[i],
                      "chosen_score": scores[c], "rejected_score": scores[r],
                      "chosen_len": lengths[c], "rejected_len": lengths[r]})  # fmt: skip
    records = [{"line": rec.pop("row"), **rec} for rec in metrics.regroup_completions(pairs)]
    summary = metrics.summarize(records, kind=kind)
    summary.update(data=str(data), layout="rewardbench2", preference=None, objective=kind)
    return summary, records


def _world() -> tuple[int, int]:
    """(rank, world size) under a launcher (torchrun, deepspeed), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _score(scorer: Scorer, texts: list[str], progress: bool) -> list[float]:
    """Every text's score. Under a launcher each process scores a strided share and every
    process gets them all (so all of them reach the same result, or the same error)."""
    rank, world = _world()
    if world == 1:
        return scorer.score_texts(texts, progress=progress, desc="evaluating")
    from rmtrain.engine import all_gather_object

    mine = scorer.score_texts(texts[rank::world], progress=progress and rank == 0,
                              desc=f"evaluating ({world} processes)")  # fmt: skip
    parts = all_gather_object(mine)
    scores = [0.0] * len(texts)
    for r, part in enumerate(parts):
        scores[r::world] = part
    return scores


def _scores_of(record: dict[str, Any]) -> list[float]:
    if "chosen_scores" in record:
        return [*record["chosen_scores"], *record["rejected_scores"]]
    return [record["chosen_score"], record["rejected_score"]]


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


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
    p.add_argument("--preference", choices=("better", "safer"), default=None)
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
                    scorer, data, args.preference, progress=not args.no_progress
                )
                if rank != 0:
                    continue
                name = data.name.removesuffix(".jsonl").removesuffix(".json")
                write_set(args.out, name, summary, records)
                path = args.out / "eval" / f"{name}.json"
                print(f"{data}: {summary['n_pairs']} pairs -> {path}\n{table(summary)}")
    except (ScoreInputError, NonFiniteScores, FileNotFoundError) as err:
        if rank == 0:
            print(f"rmtrain eval: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if world > 1:
        from rmtrain.engine import shutdown

        shutdown()


if __name__ == "__main__":
    main()
