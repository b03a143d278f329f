"""The evaluation a training run does (issue 12): every eval set gets the metrics of
`rmtrain eval`, and they must be the numbers `rmtrain eval` computes on the finished export.

One short run trains with three extra eval sets in three layouts (PKU-SafeRLHF v1 with harm
categories and severities, RewardBench-style pairs with subsets, RM-Bench style variants). The
second implementation is `rmtrain eval` itself: it reads the raw files again, renders them through
`rmtrain score`'s Scorer and scores them with the *reloaded export* (plain transformers), so the
two sides share only the metric functions, not the data path or the forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL, check_ok, read_jsonl, read_metrics, run_train, write_jsonl

from rmtrain.eval.run import evaluate_file
from rmtrain.scoring import Scorer
from rmtrain.toy.sample_data import generate_rows

SETS = ("pku", "bench", "styles")


def _files(root: Path) -> dict[str, Path]:
    rows = generate_rows(24, seed=11)
    # Every third pair's label flipped: the sample data is easy, and a model that gets
    # everything right would make every accuracy compared below 1.0.
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r["better_response_id"] = 1 - r["better_response_id"]
    pku = rows[:12]
    bench = [
        {
            "prompt": r["prompt"],
            "chosen": r[f"response_{r['better_response_id']}"],
            "rejected": r[f"response_{1 - r['better_response_id']}"],
            "subset": ["chat", "xstest-should-refuse", "math-prm"][i % 4 % 3],
        }
        for i, r in enumerate(rows[12:24])
    ]
    styles = [
        {
            "prompt": r["prompt"],
            "subset": "refusals-dangerous",
            "chosen": [b["chosen"], b["chosen"] + " Indeed.", "## " + b["chosen"]],
            "rejected": [b["rejected"], b["rejected"] + " Sure.", "## " + b["rejected"]],
        }
        for r, b in zip(rows[:4], bench, strict=False)
    ]
    files = {"pku": root / "pku.jsonl", "bench": root / "bench.jsonl", "styles": root / "st.jsonl"}
    for name, data in (("pku", pku), ("bench", bench), ("styles", styles)):
        write_jsonl(files[name], data)
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("evaltrain")
    files = _files(root)
    sets = ",".join(f"{{path:'{files[n]}',label:{n}}}" for n in SETS)
    run_dir = root / "run"
    proc = run_train([*SMALL, "data.max_length=128", "trainer.max_steps=2", "trainer.lr=2e-4",
                      f"data.eval_sets=[{sets}]", f"output_dir={run_dir}"])  # fmt: skip
    check_ok(proc)
    return run_dir, files


def _close(a: Any, b: Any, where: str = "summary") -> None:
    """Nested equality: counts and names exactly, floats (score-derived) to 5e-4."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=5e-4), where
    else:
        assert a == b, where


def _drop(summary: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in keys}


@pytest.mark.parametrize("name", SETS)
def test_training_eval_equals_rmtrain_eval_of_the_export(trained, name: str) -> None:
    run_dir, files = trained
    scorer = Scorer(run_dir / "export", batch_size=8)
    scorer.max_length = scorer.meta["max_length"]
    theirs, their_pairs = evaluate_file(scorer, files[name])
    ours = json.loads((run_dir / "eval" / f"{name}.json").read_text())
    our_pairs = read_jsonl(run_dir / "eval" / f"{name}.pairs.jsonl")

    # The same pairs with the same scores (training's padded forward vs the reloaded export).
    key = "chosen_scores" if name == "styles" else "chosen_score"
    assert len(our_pairs) == len(their_pairs)
    for a, b in zip(our_pairs, their_pairs, strict=True):
        assert a[key] == pytest.approx(b[key], abs=2e-4)
    # Then every block agrees: overall, subsets, harm categories, severities, safety groups,
    # RM-Bench tiers, calibration and length bias (both count a response's tokens after the
    # prefix the two sides share).
    assert ours["n_pairs"] == theirs["n_pairs"]
    for block in ("by_subset", "by_category", "safety", "rmbench", "length_bias"):
        assert (block in ours) == (block in theirs), block
    _close(ours, _drop(theirs, "data", "format", "preference", "objective"))
    assert 0.3 < ours["overall"]["accuracy"] < 0.9  # the flipped labels are ranked wrong
    if name == "pku":
        assert ours["safety"]["by_harm_category"] and ours["safety"]["by_severity"]
    if name == "styles":
        assert ours["rmbench"]["hard"] is not None

    # The dashboard scalars of the last eval are the summary's numbers.
    last = [r for r in read_metrics(run_dir) if f"eval/{name}/accuracy" in r][-1]
    assert last[f"eval/{name}/ece"] == pytest.approx(ours["calibration"]["ece"])
    if name == "bench":
        for subset, stats in ours["by_subset"].items():
            assert last[f"eval/{name}/subset/{subset}/accuracy"] == stats["accuracy"]


def test_run_report_links_every_set(trained) -> None:
    run_dir, _ = trained
    report = (run_dir / "report.md").read_text()
    for name in ("main", *SETS):
        assert f"## Eval set `{name}`" in report
        assert (run_dir / "eval" / name / "reliability.png").stat().st_size > 1000
    assert "![Training curves](curves.png)" in report
