"""RewardBench 2 (issue 21): the format adapter, the official numbers by hand and against the
`rewardbench` package's own scoring code (`reroll_and_score_dataset` for the best-of-N subsets,
`process_single_model` for Ties), and `rmtrain eval` on an RB2-layout file end to end.

No real RewardBench 2 data is available here: the files are generated in the tests, in its
layout (`chosen` / `rejected` lists, `num_correct`, `num_incorrect`, `total_completions`,
`subset`, `id` with `ref:N` / `tied:N` in Ties).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import make_export, read_jsonl, write_jsonl

from rmtrain.config import DataConfig
from rmtrain.data.formats import resolve
from rmtrain.data.pairs import build_pairs
from rmtrain.data.sources import load_rows
from rmtrain.errors import DataError
from rmtrain.eval import metrics as M
from rmtrain.eval.run import main as eval_main
from rmtrain.scoring import Scorer
from rmtrain.toy.tokenizer import build_tiny_tokenizer

WORDS = ["flour", "water", "salt", "yeast", "oven", "bread", "dough", "knead", "rise", "bake"]


def rb2_rows(seed: int = 0, per_subset: int = 3, ties_prompts: int = 3) -> list[dict[str, Any]]:
    """Rows in RewardBench 2's layout: 1 correct + 3 incorrect completions (best-of-4) in the
    five best-of-N subsets (a few with more), and `ref:N` (1 correct) / `tied:N` (3 correct)
    rows in Ties."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randrange(2, 10)))

    rows: list[dict[str, Any]] = []
    for subset in M.REWARDBENCH2_SUBSETS[:-1]:
        for _ in range(per_subset):
            n_c, n_r = (1, 3) if rng.random() < 0.8 else (2, 4)
            rows.append(_row(str(len(rows)), f"Question {len(rows)}?", [text() for _ in range(n_c)],
                             [text() for _ in range(n_r)], subset))  # fmt: skip
    for p in range(ties_prompts):
        for kind, n_c in (("ref", 1), ("tied", 3)):
            chosen, rejected = [text() for _ in range(n_c)], [text() for _ in range(2)]
            rows.append(
                _row(f"{kind}:{p}", f"Name a primary color ({p})", chosen, rejected, "Ties")
            )
    return rows


def _row(row_id: str, prompt: str, chosen: list[str], rejected: list[str], subset: str) -> dict:
    return {"id": row_id, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "num_correct": len(chosen), "num_incorrect": len(rejected),
            "total_completions": len(chosen) + len(rejected), "subset": subset}  # fmt: skip


def scored(chosen: list[float], rejected: list[float], subset: str, row_id: str = "0") -> dict:
    return {"chosen_scores": chosen, "rejected_scores": rejected, "subset": subset,
            "id": row_id, "num_correct": len(chosen)}  # fmt: skip


# --------------------------------------------------------------------------- by hand


def test_best_of_n_by_hand() -> None:
    assert M.rewardbench2_best_of_n(scored([1.0], [0.0, 0.5, -1.0], "Math")) == 1.0
    assert M.rewardbench2_best_of_n(scored([1.0], [1.0, 0.5, -1.0], "Math")) == 0.5  # 2 at top
    assert M.rewardbench2_best_of_n(scored([2.0], [2.0, 2.0, 2.0], "Math")) == 0.25  # all equal
    assert M.rewardbench2_best_of_n(scored([0.0], [1.0, 0.5, -1.0], "Math")) == 0.0
    # only the FIRST correct completion counts, as upstream's `scores[0] == max`
    assert M.rewardbench2_best_of_n(scored([0.0, 3.0], [1.0, -1.0], "Focus")) == 0.0


def test_ties_by_hand() -> None:
    rows = [
        # prompt 0: ref gap = 2 - 1 = 1; tied correct 5, 4, 3.5 -> d = 1.5, gap = 3.5 - 1 = 2.5
        scored([2.0], [1.0, 0.0], "Ties", "ref:0"),
        scored([5.0, 4.0, 3.5], [1.0, -1.0], "Ties", "tied:0"),
        # prompt 1: ref wrong (gap -1); tied: d = 1, gap = 0.5 (accurate, but 0.5 < d)
        scored([0.0], [1.0, -2.0], "Ties", "ref:1"),
        scored([2.0, 1.5, 1.0], [0.5, 0.0], "Ties", "tied:1"),
    ]
    t = M.rewardbench2_ties(rows)
    assert t["ref_accuracy"] == 0.5 and t["tied_accuracy"] == 1.0
    assert t["correctness_preferred"] == 0.5  # 2.5 > 1.5 yes; 0.5 > 1 no
    assert t["correctness_preferred_hard"] == 0.0  # min(1, 2.5) > 1.5 no; min(-1, .5) > 1 no
    margin = (math.tanh(1 / 1.5 - 1) + math.tanh(-1 / 1 - 1)) / 2
    assert t["correctness_margin"] == pytest.approx(margin, abs=1e-12)
    want = 0.3 * 1.0 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * margin
    assert t["score"] == pytest.approx(want, abs=1e-12)


def test_ties_zero_spread_as_current_upstream() -> None:
    """d = 0 (two correct answers scored the same): compared and divided as numpy does, as
    upstream's current code: x / 0 -> +-inf (tanh +-1), 0 / 0 -> NaN -> 0."""
    rows = [
        scored([2.0], [1.0], "Ties", "ref:0"),
        scored([3.0, 3.0], [1.0], "Ties", "tied:0"),  # d = 0, min(g) = 1 -> tanh(inf) = 1
        scored([2.0], [2.0], "Ties", "ref:1"),
        scored([3.0, 3.0], [3.0], "Ties", "tied:1"),  # d = 0, min(g) = 0 -> NaN -> 0
    ]
    t = M.rewardbench2_ties(rows)
    assert t["correctness_preferred"] == 0.5  # 2 > 0 yes; 0 > 0 no
    assert t["correctness_margin"] == pytest.approx(0.5)


def test_partial_sets_have_no_headline_number() -> None:
    rows = [scored([1.0], [0.0, 0.5, -1.0], "Math"), scored([0.0], [1.0, 0.5, 2.0], "Math")]
    rb2 = M.rewardbench2_scores(rows)
    assert rb2["scores"] == {"Math": 0.5} and rb2["score"] is None
    assert rb2["missing_subsets"] == ["Factuality", "Precise IF", "Safety", "Focus", "Ties"]
    only_ref = M.rewardbench2_ties([scored([2.0], [1.0], "Ties", "ref:0")])
    assert only_ref["ref_accuracy"] == 1.0 and only_ref["score"] is None
    nan = M.rewardbench2_scores([scored([float("nan")], [1.0], "Math")])
    assert nan["n_nonfinite"] == 1 and nan["scores"] == {}


# --------------------------------------------------------------------------- official code


def _load_upstream_v2() -> dict[str, Any]:
    """`reroll_and_score_dataset`, `process_single_model` and its helper `sample_stats` from
    the installed `rewardbench` package (0.1.4 on PyPI), compiled out of `utils.py` without
    running the package's imports (fastchat, its model zoo); they get numpy, pandas,
    `datasets.Dataset` and math, as upstream's module has them."""
    spec = importlib.util.find_spec("rewardbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the reference package: pip install --no-deps rewardbench==0.1.4")
    import numpy as np
    import pandas as pd
    from datasets import Dataset

    path = Path(next(iter(spec.submodule_search_locations))) / "utils.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {"reroll_and_score_dataset", "process_single_model", "sample_stats"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in body} == names, f"{path} lacks one of {names}"
    namespace: dict[str, Any] = {"np": np, "pd": pd, "math": math, "Dataset": Dataset}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def official_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """RewardBench 2's subset scores as upstream's scripts/run_v2.py computes them from the
    per-completion scores: the unrolled completions (correct first) rerolled per row for the
    best-of-N `results`, each subset's mean of them, and Ties by `process_single_model`."""
    from datasets import Dataset

    up = _load_upstream_v2()
    flat = {"text": [], "scores": [], "subset": [], "id": []}
    for r in rows:
        for s in (*r["chosen_scores"], *r["rejected_scores"]):
            flat["text"].append("x")
            flat["scores"].append(s)
            flat["subset"].append(r["subset"])
            flat["id"].append(r["id"])
    totals = [len(r["chosen_scores"]) + len(r["rejected_scores"]) for r in rows]
    out_dataset = up["reroll_and_score_dataset"](Dataset.from_dict(flat), totals)
    out_dataset = out_dataset.add_column("num_correct", [len(r["chosen_scores"]) for r in rows])
    result = {}
    for subset in sorted(set(flat["subset"])):
        part = out_dataset.filter(lambda ex, s=subset: ex["subset"] == s)
        if subset.lower() == "ties":
            result[subset] = up["process_single_model"](part)[1]
        else:
            result[subset] = sum(part["results"]) / len(part["results"])
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_the_official_implementation(seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for subset in M.REWARDBENCH2_SUBSETS[:-1]:
        for i in range(rng.randint(8, 30)):
            n_c, n_r = (1, 3) if rng.random() < 0.8 else (rng.randint(1, 3), rng.randint(2, 5))
            skill = rng.random()
            chosen = [rng.gauss(skill, 1) for _ in range(n_c)]
            rejected = [rng.gauss(0, 1) for _ in range(n_r)]
            if rng.random() < 0.3:  # coarse scores: ties at the top get the 1/k penalty
                chosen, rejected = [round(x) for x in chosen], [round(x) for x in rejected]
            rows.append(scored(chosen, rejected, subset, str(i)))
    for p in range(rng.randint(5, 20)):
        for kind, n_c in (("ref", 1), ("tied", rng.randint(2, 5))):
            chosen = [rng.gauss(1, 1) for _ in range(n_c)]  # distinct: d > 0
            rejected = [rng.gauss(0, 1) for _ in range(rng.randint(1, 4))]
            rows.append(scored(chosen, rejected, "Ties", f"{kind}:{p}"))
    rng.shuffle(rows)
    official = official_scores(rows)
    ours = M.rewardbench2_scores(rows)
    assert set(ours["scores"]) == set(official) == set(M.REWARDBENCH2_SUBSETS)
    for subset, value in official.items():
        assert ours["scores"][subset] == pytest.approx(value, abs=1e-12), subset
    assert ours["score"] == pytest.approx(sum(official.values()) / 6, abs=1e-12)
    assert any(0 < M.rewardbench2_best_of_n(r) < 1 for r in rows)  # the tie penalty was hit


# --------------------------------------------------------------------------- the format


def test_the_format_is_detected_and_becomes_every_combination(tmp_path: Path) -> None:
    rows = rb2_rows()
    path = write_jsonl(tmp_path / "rb2.jsonl", rows)
    assert resolve("auto", "x", rows[0], rows[0]).name == "rewardbench2"
    rmbench = {"prompt": "p", "chosen": ["a", "b"], "rejected": ["c", "d"], "subset": "chat"}
    assert resolve("auto", "x", rmbench, rmbench).name == "rmbench"

    tok = build_tiny_tokenizer()
    cfg = DataConfig(path=str(path), format="auto", max_length=256)
    pairs, stats = build_pairs(load_rows(cfg, "train"), cfg, tok)
    assert stats.rows == len(rows)
    assert len(pairs) == sum(r["num_correct"] * r["num_incorrect"] for r in rows)
    metas = [json.loads(m) for m in pairs["meta"]]
    assert metas[0] == {"source": str(path), "row": 1, "subset": "Factuality", "id": "0",
                        "completion": [0, 0], "num_correct": rows[0]["num_correct"]}  # fmt: skip
    # Scores per completion -> pair records -> regrouped rows: each completion back in place.
    truth = {(m["row"], side, k): random.random() for m in metas
             for side, k in (("c", m["completion"][0]), ("r", m["completion"][1]))}  # fmt: skip
    records = [
        {**m, "chosen_score": truth[(m["row"], "c", m["completion"][0])],
         "rejected_score": truth[(m["row"], "r", m["completion"][1])]}
        for m in metas
    ]  # fmt: skip
    regrouped = M.regroup(records)
    assert len(regrouped) == len(rows)
    for got, row in zip(regrouped, rows, strict=True):
        assert got["id"] == row["id"] and got["subset"] == row["subset"]
        assert got["chosen_scores"] == [truth[(got["row"], "c", k)]
                                        for k in range(row["num_correct"])]  # fmt: skip
        assert len(got["rejected_scores"]) == row["num_incorrect"]
    summary = M.summarize(regrouped)
    assert summary["rewardbench2"]["score"] is not None
    assert summary["n_pairs"] == len(pairs)  # generic metrics over every comparison
    assert "rewardbench" not in summary and "rmbench" not in summary


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"num_correct": 2}, "num_correct", "chosen has 1 completions"),
        ({"num_incorrect": 1}, "num_incorrect", "rejected has 3 completions"),
        ({"total_completions": 5}, "total_completions", "there are 4 completions"),
        ({"subset": "Ties", "id": "7"}, "id", "'ref:N' or 'tied:N'"),
        ({"chosen": "one text"}, "chosen", "list of response texts"),
        ({"num_correct": True}, "num_correct", "int count"),
    ],
)
def test_bad_rows_name_row_and_field(tmp_path, change, field, words) -> None:
    rows = rb2_rows()
    rows[2] = {**rows[2], **change}
    path = write_jsonl(tmp_path / "rb2.jsonl", rows)
    cfg = DataConfig(path=str(path), format="rewardbench2")
    with pytest.raises(DataError) as exc:
        build_pairs(load_rows(cfg, "train"), cfg, build_tiny_tokenizer())
    assert f"{path}: row 3: field '{field}'" in str(exc.value)
    assert words in str(exc.value)


# --------------------------------------------------------------------------- rmtrain eval


def test_rmtrain_eval_writes_the_official_numbers(tmp_path, capsys) -> None:
    export = make_export(tmp_path / "export", template="chat", seed=3)
    rows = rb2_rows(seed=1, per_subset=4, ties_prompts=4)
    data = write_jsonl(tmp_path / "rb2.jsonl", rows)
    eval_main(["--model", str(export), "--data", str(data), "--out", str(tmp_path / "out"),
               "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "eval" / "rb2.json").read_text())
    records = read_jsonl(tmp_path / "out" / "eval" / "rb2.pairs.jsonl")
    assert summary["format"] == "rewardbench2" and len(records) == len(rows)

    # every completion scored on its own, as `Scorer` (what `rmtrain score` uses) scores it
    scorer = Scorer(export)
    for rec, row in zip(records, rows, strict=True):
        assert rec["id"] == row["id"] and rec["num_correct"] == row["num_correct"]
        texts = [scorer.text(row["prompt"], c) for c in (*row["chosen"], *row["rejected"])]
        want = scorer.score_texts(texts)
        assert rec["chosen_scores"] + rec["rejected_scores"] == pytest.approx(want, abs=1e-5)

    # the numbers written and printed are the official implementation's on those scores
    official = official_scores(records)
    rb2 = summary["rewardbench2"]
    for subset, value in official.items():
        assert rb2["scores"][subset] == pytest.approx(value, abs=1e-12)
        assert f"rewardbench2/{subset}" in printed
    assert rb2["score"] == pytest.approx(sum(official.values()) / 6, abs=1e-12)
    assert f"{rb2['score']:.4f}" in printed
    figures = tmp_path / "out" / "eval" / "rb2"
    assert {p.name for p in figures.iterdir()} >= {"histograms.png", "categories.png",
                                                    "reliability.png", "report.md"}  # fmt: skip
    assert "RewardBench 2 score" in (figures / "report.md").read_text()
    assert M.headline(summary)["rewardbench2/score"] == pytest.approx(rb2["score"])


def test_rmtrain_eval_names_a_bad_row(tmp_path, capsys) -> None:
    export = make_export(tmp_path / "export", template="chat")
    rows = rb2_rows()
    rows[4]["num_incorrect"] = 9
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as exc:
        eval_main(["--model", str(export), "--data", str(data), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert f"{data}: row 5: field 'num_incorrect'" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
