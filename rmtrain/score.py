"""`rmtrain score`: score a JSONL file with an exported reward (or cost) model.

Each input line is one JSON object:

- ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``
  → adds ``"score"``;
- a preference row in any format `rmtrain train` accepts (TRL standard / conversational,
  HH-RLHF, UltraFeedback, PKU-SafeRLHF, RewardBench, RM-Bench; `rmtrain.data.formats`) → adds
  ``"chosen_score"`` and ``"rejected_score"`` (RM-Bench's style variants: the lists
  ``"chosen_scores"`` / ``"rejected_scores"``); the summary reports pairwise accuracy.

Every text is rendered and cut exactly as in training, so a row scores the token ids training
saw (`rmtrain.scoring.Scorer`); the output keeps the input order and is written atomically: on
any error no (partial) output file is left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rmtrain.data.formats import raw_pairs, resolve
from rmtrain.data.pairs import tokenize_pairs
from rmtrain.errors import DataError, UserError, where
from rmtrain.eval.metrics import MULTI_RESPONSE_KEYS
from rmtrain.files import read_jsonl, write_atomic, write_jsonl
from rmtrain.model import NORMALIZE_STATS
from rmtrain.objective import oriented_gap
from rmtrain.scoring import DTYPES, NonFiniteScores, Scorer, add_data_arguments
from rmtrain.text import TEMPLATES, check_messages

PAIR_KEYS = ("chosen", "rejected", "response_0", "responses", "completions")


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) of every row; a single text row (prompt + response, or messages) is checked
    here, a preference row by its format's adapter (`score_rows`). DataError names file, line
    and field."""
    rows = list(read_jsonl(path))
    for line, row in rows:
        if any(k in row for k in PAIR_KEYS):
            continue
        if "messages" in row:
            if problem := check_messages(row["messages"]):
                raise DataError(where(str(path), line, "messages", problem))
            continue
        if "response" not in row:
            raise DataError(where(str(path), line, "response", "missing (a row needs "
                                  "prompt+response, messages, or a preference pair)"))  # fmt: skip
        for field in ("prompt", "response"):
            value = row.get(field)
            if not isinstance(value, str):
                problem = (
                    "missing" if value is None else f"expected str, got {type(value).__name__}"
                )
                raise DataError(where(str(path), line, field, problem))
    if not rows:
        raise DataError(f"{path}: no rows to score")
    return rows


def score_rows(
    scorer: Scorer,
    rows: list[tuple[int, dict[str, Any]]],
    path: Path,
    progress: bool,
    preference: str = "better",
    fmt: str = "auto",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scored copies of the rows (input order) and a summary (pairwise accuracy for pairs)."""
    seqs: list[Any] = []
    slot_of: dict[tuple[int, str, int | None], int] = {}  # (row, output field, position) -> seq

    def add(ids: Any, i: int, field: str, pos: int | None = None) -> int:
        if (i, field, pos) not in slot_of:
            slot_of[i, field, pos] = len(seqs)
            seqs.append(ids)
        return slot_of[i, field, pos]

    texts, singles = [], []
    groups: dict[str, list[int]] = {}
    for i, (line, row) in enumerate(rows):
        if any(k in row for k in PAIR_KEYS):  # a preference row: grouped by its format
            groups.setdefault(resolve(fmt, str(path), row, row).name, []).append(i)
            continue
        field = "messages" if "messages" in row else "response"
        try:
            texts.append(scorer.messages_text(row[field]) if field == "messages"
                         else scorer.text(row["prompt"], row["response"]))  # fmt: skip
        except ValueError as exc:
            raise DataError(where(str(path), line, field, str(exc))) from exc
        singles.append(i)
    before = scorer.truncated
    for i, ids in zip(singles, scorer.encode(texts), strict=True):
        add(ids, i, "score")
    cut = scorer.truncated - before

    pairs: list[tuple[int, int]] = []  # (chosen seq, rejected seq) of every pair
    for name, members in groups.items():
        # The training adapters read the rows, so a row scores the ids training would see.
        cfg = scorer.data_config(
            str(path), name, preference if name == "pku_saferlhf" else "better"
        )
        raw, _ = raw_pairs([rows[i] for i in members], str(path), cfg, "reward")
        table, _, n_cut = tokenize_pairs(raw, cfg, scorer.tokenizer, drop_identical=False)
        cut += n_cut
        index_of_line = {rows[i][0]: i for i in members}
        for p in range(len(table)):
            meta = table.meta_of(p)
            i = index_of_line[meta["row"]]
            # RM-Bench / RewardBench 2 rows: [chosen response, rejected response] of the row
            style = next((meta[k] for k in MULTI_RESPONSE_KEYS if k in meta), None)
            ranked = meta.get("responses")  # K responses: [better, worse] response index
            ends = [
                add(table.seq(side, p), i, "scores", ranked[k])
                if ranked
                else add(
                    table.seq(side, p),
                    i,
                    f"{side}_scores" if style else f"{side}_score",
                    style[k] if style else None,
                )
                for k, side in enumerate(("chosen", "rejected"))
            ]
            pairs.append((ends[0], ends[1]))

    scores = scorer.score_sequences(seqs, progress=progress)
    out = [dict(row) for _, row in rows]
    for (i, field, pos), k in sorted(
        slot_of.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0)
    ):
        if not math.isfinite(scores[k]):
            raise NonFiniteScores(
                f"{path}: non-finite score(s), the first at line {rows[i][0]} ({field}): the "
                "model's weights are broken (a diverged run?); nothing was written"
            )
        if pos is None:
            out[i][field] = scores[k]
        else:  # a list by position (a response no pair compares stays None)
            at = out[i].setdefault(field, [])
            at.extend([None] * (pos + 1 - len(at)))
            at[pos] = scores[k]
    correct = sum(oriented_gap(scorer.objective, scores[c], scores[r]) > 0 for c, r in pairs)
    summary: dict[str, Any] = {
        "rows": len(rows),
        "texts": len(seqs),
        "pairs": len(pairs),
        "pairwise_accuracy": correct / len(pairs) if pairs else None,
        "correct_pairs": correct,
        "score_mean": sum(scores) / len(scores),
        "objective": scorer.objective,
        "accuracy_rule": "chosen_score < rejected_score"
        if scorer.objective == "cost"
        else "chosen_score > rejected_score",
        "template": scorer.template,
        "normalized": scorer.normalize,
        "truncated": cut,
        "max_length": scorer.max_length,
        "over_context": scorer.over_context,
        "batch_size": scorer.batch_size,
        "padding_side": scorer.padding_side,
    }
    return out, summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rmtrain score",
        description="Score a JSONL file (prompt+response, chat messages, or preference pairs in "
        "any training format) with an exported model; writes the rows with their scores as JSONL.",
    )
    p.add_argument("--model", required=True, help="export directory (config.json, weights)")
    p.add_argument("--input", required=True, type=Path, help="input JSONL")
    p.add_argument("--output", required=True, type=Path, help="output JSONL (written atomically)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--padding-side", choices=("left", "right"), default="right")
    p.add_argument(
        "--normalize",
        nargs="?",
        const="eval",
        default=None,
        choices=NORMALIZE_STATS,
        help="standardise scores with the statistics recorded in the export: eval (default "
        "when given) or running; off unless given",
    )
    p.add_argument(
        "--template",
        choices=("auto", *TEMPLATES),
        default="auto",
        help="text format; auto = what the export was trained with",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="cut longer texts from the right keeping EOS, as in training (default: the "
        "export's trained max_length; 0: no cut)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: the export's dtype"
    )
    add_data_arguments(p)
    p.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_length is not None and (args.max_length < 0 or args.max_length == 1):
        p.error("--max-length must be >= 2 (or 0: no cut)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_rows(args.input)  # read and check every line before loading the model
    scorer = Scorer(
        args.model,
        batch_size=args.batch_size,
        padding_side=args.padding_side,
        normalize=args.normalize or False,
        device=args.device,
        dtype=None if args.dtype == "auto" else DTYPES[args.dtype],
        template=args.template,
    )
    # Cut as in training unless told otherwise: the export records its trained max_length.
    trained = scorer.meta.get("max_length")
    scorer.max_length = trained if args.max_length is None else (args.max_length or None)
    preference = scorer.default_preference(args.preference)
    out, summary = score_rows(
        scorer, rows, args.input, not args.no_progress, preference, args.format
    )
    summary.update(model=str(args.model), input=str(args.input), output=str(args.output))
    write_jsonl(args.output, out)
    if args.summary is not None:
        write_atomic(args.summary, json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = run(args)
    except UserError as err:
        print(f"rmtrain score: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (OSError, ValueError) as err:
        print(f"rmtrain score: error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    line = f"scored {summary['texts']} texts from {summary['rows']} rows -> {args.output}"
    if summary["pairs"]:
        line += (
            f"; pairwise accuracy {summary['pairwise_accuracy']:.4f} "
            f"({summary['correct_pairs']}/{summary['pairs']} pairs, {summary['accuracy_rule']})"
        )
    if summary["normalized"]:
        line += f"; normalised with {summary['normalized']} stats"
    print(line, flush=True)
    if summary["truncated"]:
        print(
            f"rmtrain score: warning: {summary['truncated']} text(s) longer than max_length="
            f"{summary['max_length']} were cut from the right (EOS kept), as in training",
            file=sys.stderr,
        )
    if summary["over_context"]:
        print(
            f"rmtrain score: warning: {summary['over_context']} text(s) are longer than the "
            "model's context (max_position_embeddings); their scores are unreliable",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
