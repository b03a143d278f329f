"""`rmtrain score`: score a JSONL file with an exported reward (or cost) model.

Each input line is one JSON object in one of three forms:

- ``{"prompt": ..., "response": ...}`` → adds ``"score"``;
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` → adds ``"score"``;
- ``{"prompt": ..., "chosen": ..., "rejected": ...}`` → adds ``"chosen_score"`` and
  ``"rejected_score"``; the summary reports pairwise accuracy.

Texts are built exactly as in training (`rmtrain.text.render` with the chat template the export
was trained with, EOS included), scored in length-sorted batches; the output keeps the input
order.
A score does not depend on the batch size or the padding side (the read-out is the last position
whose attention mask is 1). Normalisation is applied only when asked for (``--normalize``).
The output is written atomically: on any error no (partial) output file is left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from rmtrain.data.collate import pad_sequences, truncate_keep_eos
from rmtrain.model import NORMALIZE_STATS, AutoModelForScore, score_stats
from rmtrain.text import TEMPLATES, check_messages, exchange, render, trained_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ScoreInputError(ValueError):
    """A bad input row: '<file>: line <n>: field '<name>': <problem>'."""


class NonFiniteScores(ValueError):
    """The model produced NaN/inf: never written as (invalid) JSON."""


# --------------------------------------------------------------------------- scorer


class Scorer:
    """Score texts with an export: ``Scorer(path).score_texts(["...", ...]) -> [float, ...]``.

    ``template``: "auto" (what the export was trained with, ``config.json["rmtrain"]
    ["template"]``; safe_rlhf for checkpoints without rmtrain metadata), "safe_rlhf" or "chat";
    used by `text` / `messages_text`. ``normalize``: False (raw scores, the default), True or
    "eval" (eval-set mean/std recorded in the export) or "running" (training EMA).
    ``max_length``: None (no cut) or cut longer texts from the right keeping EOS, like training
    (the CLI's default is the export's trained max_length).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 8,
        padding_side: str = "right",
        normalize: bool | str = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        template: str = "auto",
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if template not in ("auto", *TEMPLATES):
            raise ValueError(f"template must be auto, safe_rlhf or chat, got {template!r}")
        self.path = Path(path)
        self.batch_size, self.padding_side, self.max_length = batch_size, padding_side, max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForScore.from_pretrained(self.path, **kwargs)
        self.model.to(self.device)  # type: ignore[arg-type]
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{path}: a score model with one output is needed, "
                f"got {self.model.config.num_labels}"
            )
        self.meta: dict[str, Any] = dict(getattr(self.model.config, "rmtrain", None) or {})
        self.template = (
            (self.meta.get("template") or "safe_rlhf") if template == "auto" else template
        )
        self.objective = self.meta.get("objective") or getattr(
            self.model.config, "score_type", "reward"
        )
        self.normalize: str | None = None
        if normalize:
            self.normalize = "eval" if normalize is True else str(normalize)
            if self.normalize not in NORMALIZE_STATS:
                raise ValueError(f"normalize must be True, 'eval' or 'running', got {normalize!r}")
            score_stats(self.model.config, self.normalize)  # fail now, not after scoring
        self.chat_template = trained_template(self.tokenizer, self.template)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id  # safe: the read-out uses the mask
        self.truncated = 0  # texts cut to max_length
        # The model's context; longer texts are scored, counted and warned about.
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 10**9)
        self.over_context = 0

    def text(self, prompt: str, response: str) -> str:
        return self.messages_text(exchange(prompt, response))

    def messages_text(self, messages: list[dict[str, str]]) -> str:
        return render(self.tokenizer, messages, self.chat_template)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        out: list[list[int]] = []
        eos = self.tokenizer.eos_token_id
        for ids in self.tokenizer(list(texts))["input_ids"]:
            ids = list(ids)
            if self.max_length is not None:
                ids, cut = truncate_keep_eos(ids, self.max_length, eos)
                self.truncated += cut
            self.over_context += len(ids) > self.context
            out.append(ids)
        return out

    @torch.inference_mode()
    def score_texts(
        self, texts: Sequence[str], progress: bool = False, desc: str = "scoring"
    ) -> list[float]:
        """End scores of already formatted texts, in input order (length-sorted batches)."""
        if not texts:
            return []
        seqs = self._ids(texts)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        scores: list[float] = [0.0] * len(seqs)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr):
            idx = order[start : start + self.batch_size]
            batch = pad_sequences([seqs[i] for i in idx], self.pad_id, self.padding_side)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            end = self.model(**batch).end_scores[:, 0].float()
            if self.normalize:
                end = self.model.normalize_scores(end, self.normalize)
            for i, value in zip(idx, end.tolist(), strict=True):
                scores[i] = float(value)
        return scores

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]], length: int | None = None) -> list[float]:
        """Raw end scores (never normalised) of token-id sequences run as ONE batch, right-padded
        to `length` (default: the longest). No truncation: the ids are scored as given.

        Why a fixed `length`: a sequence's score then depends only on its own ids and `length`,
        not on the other rows (`rmtrain serve` pads each sequence to a length bucket of its own,
        so its score is the same whatever it is batched with)."""
        if not seqs:
            return []
        batch = pad_sequences(seqs, self.pad_id, "right", length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return [float(x) for x in self.model(**batch).end_scores[:, 0].float().tolist()]


# --------------------------------------------------------------------------- JSONL


def _where(path: Path, line: int, field: str, problem: str) -> str:
    return f"{path}: line {line}: field '{field}': {problem}"


def _text_problem(value: Any) -> str | None:
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"expected str, got {type(value).__name__} {value!r:.40}"
    return None


def side_conversation(row: dict[str, Any], side: str) -> list[dict[str, str]] | str:
    """The conversation a pair row scores on one side, or a problem (str).

    `side` holds a response string (with a `prompt` string), or a message list: a whole
    conversation starting with the user (UltraFeedback-binarized; TRL implicit prompt), or the
    assistant turn(s) after a `prompt` (a string, or a message list: TRL explicit prompt).
    """
    value, prompt = row.get(side), row.get("prompt")
    if isinstance(value, str):
        if not isinstance(prompt, str):
            return f"a response string needs a prompt string, got prompt={prompt!r:.40}"
        return exchange(prompt, value)
    if not isinstance(value, list) or not value:
        return f"expected a string or a list of messages, got {value!r:.40}"
    if isinstance(value[0], dict) and value[0].get("role") in ("user", "system"):
        messages = value
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}, *value]
    elif isinstance(prompt, list):
        messages = [*prompt, *value]
    else:
        return "a list of assistant messages needs a prompt (a string or a message list)"
    return check_messages(messages) or messages


def _row_kind(row: dict[str, Any]) -> tuple[str, tuple[str, str] | None]:
    """('single' | 'messages' | 'pair', (field, problem) or None). A row with `chosen` or
    `rejected` is always a pair, whatever else it holds (UltraFeedback rows carry `messages`)."""
    if "chosen" in row or "rejected" in row:
        for side in ("chosen", "rejected"):
            if side not in row:
                return "pair", (side, "missing (a pair row needs chosen and rejected)")
            found = side_conversation(row, side)
            if isinstance(found, str):
                return "pair", (side, found)
        return "pair", None
    if "messages" in row:
        problem = check_messages(row["messages"])
        return "messages", ("messages", problem) if problem else None
    fields: tuple[str, ...]
    if "response" in row:
        kind, fields = "single", ("prompt", "response")
    else:
        return "single", (
            "response",
            "missing (a row needs prompt+response, messages, or prompt+chosen+rejected)",
        )
    for field in fields:
        problem = _text_problem(row.get(field))
        if problem:
            return kind, (field, problem)
    return kind, None


def read_rows(path: Path) -> list[tuple[int, dict[str, Any], str]]:
    """(line number, row, kind) for every non-blank line; ScoreInputError on the first bad one."""
    rows: list[tuple[int, dict[str, Any], str]] = []
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ScoreInputError(f"{path}: cannot read: {exc.strerror}") from exc
    with handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ScoreInputError(
                    _where(path, n, "<json>", f"not UTF-8 ({exc.reason} at byte {exc.start})")
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScoreInputError(
                    _where(path, n, "<json>", f"invalid JSON: {exc.msg} (column {exc.colno})")
                ) from exc
            if not isinstance(row, dict):
                raise ScoreInputError(
                    _where(path, n, "<json>", f"expected a JSON object, got {type(row).__name__}")
                )
            kind, found = _row_kind(row)
            if found:
                raise ScoreInputError(_where(path, n, *found))
            rows.append((n, row, kind))
    if not rows:
        raise ScoreInputError(f"{path}: no rows to score")
    return rows


def score_rows(
    scorer: Scorer, rows: list[tuple[int, dict[str, Any], str]], path: Path, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scored copies of the rows (input order) and a summary (pairwise accuracy for pairs)."""
    texts: list[str] = []
    slots: list[tuple[int, str]] = []  # (row index, output field) of each text
    for i, (line, row, kind) in enumerate(rows):
        jobs: list[tuple[str, str]]  # (output field, input field)
        if kind == "pair":
            jobs = [(f"{side}_score", side) for side in ("chosen", "rejected")]
        else:
            jobs = [("score", "messages" if kind == "messages" else "response")]
        for field, src in jobs:
            try:
                if kind == "messages":
                    text = scorer.messages_text(row["messages"])
                elif kind == "pair":
                    conversation = side_conversation(row, src)
                    assert not isinstance(conversation, str)  # checked by read_rows
                    text = scorer.messages_text(conversation)
                else:
                    text = scorer.text(row["prompt"], row["response"])
            except ValueError as exc:
                raise ScoreInputError(_where(path, line, src, str(exc))) from exc
            texts.append(text)
            slots.append((i, field))
    scores = scorer.score_texts(texts, progress=progress)
    bad = [slots[k] for k, v in enumerate(scores) if not math.isfinite(v)]
    if bad:
        i, field = bad[0]
        raise NonFiniteScores(
            f"{path}: {len(bad)} non-finite score(s), the first at line {rows[i][0]} "
            f"({field}): the model's weights are broken (a diverged run?); nothing was written"
        )
    out = [dict(row) for _, row, _ in rows]
    for (i, field), value in zip(slots, scores, strict=True):
        out[i][field] = value

    lower_is_better = scorer.objective == "cost"
    pairs = [r for r, (_, _, kind) in zip(out, rows, strict=True) if kind == "pair"]
    correct = sum(
        (r["chosen_score"] < r["rejected_score"])
        if lower_is_better
        else (r["chosen_score"] > r["rejected_score"])
        for r in pairs
    )
    summary: dict[str, Any] = {
        "rows": len(rows),
        "texts": len(texts),
        "pairs": len(pairs),
        "pairwise_accuracy": correct / len(pairs) if pairs else None,
        "correct_pairs": correct,
        "score_mean": sum(scores) / len(scores),
        "objective": scorer.objective,
        "accuracy_rule": "chosen_score < rejected_score"
        if lower_is_better
        else "chosen_score > rejected_score",
        "template": scorer.template,
        "normalized": scorer.normalize,
        "truncated": scorer.truncated,
        "max_length": scorer.max_length,
        "over_context": scorer.over_context,
        "batch_size": scorer.batch_size,
        "padding_side": scorer.padding_side,
    }
    return out, summary


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it 0600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rmtrain score",
        description="Score a JSONL file (prompt+response, chat messages, or prompt+chosen+"
        "rejected pairs) with an exported model; writes the rows with their scores as JSONL.",
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
    p.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_length is not None and (args.max_length < 0 or args.max_length == 1):
        p.error("--max-length must be >= 2 (or 0: no cut)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_rows(args.input)  # validate everything before loading the model
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
    out, summary = score_rows(scorer, rows, args.input, progress=not args.no_progress)
    summary.update(model=str(args.model), input=str(args.input), output=str(args.output))

    def write(f: Any) -> None:
        for row in out:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(args.output, write)
    if args.summary is not None:
        write_atomic(args.summary, lambda f: f.write(json.dumps(summary, indent=1) + "\n"))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ScoreInputError, NonFiniteScores) as err:
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
