"""What an evaluation leaves on disk, for `rmtrain eval` and for a finished training run.

Per evaluation set ``<name>``, under ``<root>/eval/``:

- ``<name>.json``: every metric of :func:`rmtrain.eval.metrics.summarize`;
- ``<name>.pairs.jsonl``: one line per pair (scores, lengths, labels), for hand counts;
- ``<name>/histograms.png``, ``reliability.png``, ``categories.png`` and ``report.md``.

A training run also gets ``curves.png`` (loss, accuracy, margin from ``metrics.jsonl``) and a
``report.md`` at the top of its run directory that embeds the curves and every set's plots.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rmtrain.eval import plots
from rmtrain.eval.metrics import EvalSet
from rmtrain.files import write_atomic, write_jsonl
from rmtrain.objective import oriented_gap
from rmtrain.text import adds_bos


def write_set(
    root: Path, name: str, summary: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, Path]:
    """eval/<name>.json, eval/<name>.pairs.jsonl, and the PNGs and report in eval/<name>/;
    returns the images by caption."""
    folder = root / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.json", json.dumps(summary, indent=1) + "\n")
    write_jsonl(folder / f"{name}.pairs.jsonl", records)
    figures = folder / name
    figures.mkdir(exist_ok=True)
    flat = [r for r in records if "chosen_score" in r]
    rb2 = summary.get("rewardbench2")
    images: dict[str, Path] = {}
    if flat:
        images["Scores of chosen vs rejected"] = plots.plot_reward_histograms(
            flat, figures / "histograms.png"
        )
    elif rb2:  # one score per completion, not per pair
        images["Scores of correct vs incorrect completions"] = plots.plot_score_histograms(
            [x for r in records for x in r["chosen_scores"]],
            [x for r in records for x in r["rejected_scores"]],
            figures / "histograms.png",
            title="RewardBench 2: scores of correct vs incorrect completions",
            labels=("correct", "incorrect"),
        )
    images["Reliability diagram"] = plots.plot_reliability(
        summary["calibration"], figures / "reliability.png"
    )
    groups = summary.get("by_subset") or summary.get("by_category")
    if summary.get("safety", {}).get("by_harm_category"):
        groups = summary["safety"]["by_harm_category"]
    if rb2:
        images["RewardBench 2 score per subset"] = plots.plot_category_accuracy(
            {k: {"accuracy": v["score"], "n": v["n"]} for k, v in rb2["subsets"].items()},
            figures / "categories.png",
            title="RewardBench 2 score per subset",
            xlabel="score (best-of-N with the tie penalty; Ties: its own formula)",
            reference=None,  # chance depends on the number of completions per row
        )
    elif groups:
        images["Accuracy per category"] = plots.plot_category_accuracy(
            groups, figures / "categories.png"
        )
    plots.write_report(figures, summary, images, title=f"Evaluation: {name}")
    return images


def write_run(
    run_dir: Path,
    evaluations: Iterable[EvalSet],
    metrics_rows: Sequence[Mapping[str, Any]],
    title: str,
) -> dict[str, Path]:
    """A finished run's evaluation files, curves.png and report.md; returns every image by
    caption (for the wandb run)."""
    images: dict[str, Path] = {}
    curves = plots.plot_training_curves(metrics_rows, run_dir / "curves.png", title=title)
    images["Training curves"] = curves
    sections = ["", "## Training curves", "", "![Training curves](curves.png)"]
    for ev in evaluations:
        set_images = write_set(run_dir, ev.name, ev.summary, ev.records)
        sections += ["", f"## Eval set `{ev.name}`", "",
                     f"All metrics: [eval/{ev.name}.json](eval/{ev.name}.json); per pair: "
                     f"[eval/{ev.name}.pairs.jsonl](eval/{ev.name}.pairs.jsonl)."]  # fmt: skip
        sections += plots.report_section(ev.summary, set_images, run_dir, "###")
        images.update({f"{ev.name}/{caption}": path for caption, path in set_images.items()})
    report = "\n".join([f"# {title}", *sections]) + "\n"
    write_atomic(run_dir / "report.md", report)
    return images


def worst_pairs(
    records: Sequence[Mapping[str, Any]], kind: str = "reward", k: int = 10
) -> list[dict[str, Any]]:
    """The k pairs the model ranks most wrongly: the lowest chosen - rejected margin (for a
    cost model, the lowest rejected - chosen cost)."""
    flat = [r for r in records if "chosen_score" in r]
    flat.sort(key=lambda r: oriented_gap(kind, r["chosen_score"], r["rejected_score"]))
    return [dict(r) for r in flat[:k]]


def write_eval_scores(path: Path, samples: list[tuple[list[int], float]], tokenizer: Any) -> None:
    """`eval_scores.jsonl`: the trained model's end scores for a few eval sequences (ids and
    text, as `tokenizer(text)` gives the ids back), to check exports against."""
    rows = []
    for ids, score in samples:
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        if ids[:1] == [tokenizer.bos_token_id] and adds_bos(tokenizer):
            decoded = decoded.removeprefix(tokenizer.bos_token)  # tokenizer(text) adds it
        rows.append({"input_ids": ids, "text": decoded, "score": score})
    write_jsonl(path, rows)
