"""rmtrain.eval: metrics against hand-computed numbers and RewardBench's own scoring code.

Expected values here are worked out by hand (in the comments) or recomputed a different way
(plain loops, `statistics`), never by calling the function under test twice.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import load_upstream_rewardbench, png_size_and_variation

from rmtrain.data.schemas import pku_pair_labels
from rmtrain.eval import metrics as M
from rmtrain.eval.metrics import PairResult

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    """`../shared/data` beside the checkout (a worktree may sit one level deeper)."""
    for parent in REPO.parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


SHARED = _shared_data()


def pair(c: float, r: float, **kw: Any) -> dict[str, Any]:
    return {"chosen_score": c, "rejected_score": r, **kw}


def jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def strict_json(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------------- pairwise accuracy
def test_pairwise_stats_by_hand() -> None:
    # right, tie, wrong, right -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    stats = M.pairwise_stats([pair(2, 1), pair(1, 1), pair(0, 3), pair(5, -1)])
    assert stats["n"] == 4 and stats["n_ties"] == 1 and stats["n_correct"] == 2
    assert stats["accuracy"] == pytest.approx(0.625)
    assert stats["mean_margin"] == pytest.approx((1 + 0 - 3 + 6) / 4)
    # chosen 2,1,0,5: mean 2, population var (0+1+4+9)/4; rejected 1,1,3,-1: mean 1, var 8/4
    assert stats["chosen_mean"] == pytest.approx(2.0)
    assert stats["chosen_std"] == pytest.approx(math.sqrt(3.5))
    assert stats["rejected_mean"] == pytest.approx(1.0)
    assert stats["rejected_std"] == pytest.approx(math.sqrt(2.0))


def test_tie_credit_is_configurable() -> None:
    pairs = [pair(1, 1), pair(1, 1), pair(2, 1), pair(0, 1)]
    assert M.pairwise_stats(pairs)["accuracy"] == pytest.approx(0.5)  # (0.5+0.5+1+0)/4
    assert M.pairwise_stats(pairs, tie_credit=0.0)["accuracy"] == pytest.approx(0.25)


def test_nonfinite_pairs_are_excluded_and_counted() -> None:
    rows = [pair(1, 0), pair(float("nan"), 0), pair(0, float("inf")), pair(0, 1)]
    summary = M.summarize(rows)
    strict_json(summary)  # no NaN/inf anywhere
    assert summary["n_nonfinite"] == 2
    assert summary["overall"]["n"] == 2
    assert summary["overall"]["accuracy"] == pytest.approx(0.5)


def test_all_nonfinite_gives_none_not_nan() -> None:
    summary = M.summarize([pair(float("nan"), 1.0)])
    strict_json(summary)
    assert summary["overall"]["accuracy"] is None
    assert summary["calibration"]["ece"] is None


def test_accuracy_by_subset_and_category() -> None:
    rows = [
        pair(1, 0, subset="a", category="x"),
        pair(0, 1, subset="a", category="y"),
        pair(1, 1, subset="b", category="x"),
    ]
    by_subset = M.accuracy_by(rows, "subset")
    assert by_subset["a"]["accuracy"] == pytest.approx(0.5)
    assert by_subset["b"]["accuracy"] == pytest.approx(0.5) and by_subset["b"]["n_ties"] == 1
    by_cat = M.accuracy_by(rows, "category")
    assert by_cat["x"]["n"] == 2 and by_cat["x"]["accuracy"] == pytest.approx(0.75)
    assert by_cat["y"]["accuracy"] == 0.0


def test_missing_score_key_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="chosen_score"):
        M.pairwise_stats([{"score": 1.0, "rejected_score": 0.0}])


def test_cost_kind_flips_the_direction() -> None:
    # Cost model: chosen is the safer one and should cost LESS.
    rows = [pair(-1.0, 2.0), pair(0.5, -0.5), pair(0.0, 0.0)]
    summary = M.summarize(rows, kind="cost")
    assert summary["overall"]["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    # margin is oriented: rejected cost - chosen cost = (3, -1, 0)
    assert summary["overall"]["mean_margin"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- RewardBench
def test_rewardbench_constants_by_hand() -> None:
    hep = [s for s in M.REWARDBENCH_SUBSET_MAPPING["Reasoning"] if s.startswith("hep-")]
    assert len(hep) == 6
    # math-prm weighs as much as all code subsets together
    assert M.REWARDBENCH_EXAMPLE_COUNTS["math-prm"] == sum(
        M.REWARDBENCH_EXAMPLE_COUNTS[s] for s in hep
    )
    mapped = [s for subsets in M.REWARDBENCH_SUBSET_MAPPING.values() for s in subsets]
    assert sorted(mapped) == sorted(M.REWARDBENCH_EXAMPLE_COUNTS)  # 23 subsets, each once
    assert len(mapped) == 23


def test_rewardbench_reasoning_weighting_by_hand() -> None:
    # math-prm 3/4 right, hep-python 1/2, hep-go 0/1 (others absent). Official weights:
    # (984 * 0.75 + 164 * 0.5 + 164 * 0) / (984 + 164 + 164)
    rows = [pair(1, 0, subset="math-prm")] * 3 + [pair(0, 1, subset="math-prm")]
    rows += [pair(1, 0, subset="hep-python"), pair(1, 1, subset="hep-python")]  # tie = wrong
    rows += [pair(0, 1, subset="hep-go")]
    rb = M.rewardbench_scores(rows)
    expected = (984 * 0.75 + 164 * 0.5 + 164 * 0.0) / (984 + 164 + 164)
    assert rb["sections"]["Reasoning"] == pytest.approx(expected)
    assert rb["sections"]["Chat"] is None and rb["score"] is None
    assert rb["subsets"]["hep-python"]["n_ties"] == 1
    assert rb["incomplete_subsets"]["math-prm"] == {"n": 4, "expected": 447}


def test_rewardbench_score_is_mean_of_sections() -> None:
    rows = []
    for section, subsets in M.REWARDBENCH_SUBSET_MAPPING.items():
        right = section in ("Chat", "Safety")  # Chat and Safety all right, the others all wrong
        rows += [pair(1, 0) if right else pair(0, 1) for _ in subsets]
        for row, s in zip(rows[-len(subsets) :], subsets, strict=True):
            row["subset"] = s
    rb = M.rewardbench_scores(rows)
    assert rb["sections"] == {"Chat": 1.0, "Chat Hard": 0.0, "Safety": 1.0, "Reasoning": 0.0}
    assert rb["score"] == pytest.approx(0.5)


def test_rewardbench_constants_match_upstream() -> None:
    constants, _ = load_upstream_rewardbench()
    assert constants.EXAMPLE_COUNTS == M.REWARDBENCH_EXAMPLE_COUNTS
    assert constants.SUBSET_MAPPING == M.REWARDBENCH_SUBSET_MAPPING


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewardbench_sections_match_upstream(seed: int) -> None:
    constants, calculate_scores_per_section = load_upstream_rewardbench()
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for subset in constants.EXAMPLE_COUNTS:
        n = rng.randint(5, 40)
        target = rng.random()
        for _ in range(n):
            u = rng.random()
            if u < 0.1:
                c, r = 0.5, 0.5  # tie
            elif u < target:
                c, r = rng.gauss(1, 1), rng.gauss(-1, 1)
            else:
                c, r = rng.gauss(-1, 1), rng.gauss(1, 1)
            rows.append(pair(c, r, subset=subset))
    # Upstream's per-subset accuracy, as scripts/run_rm.py builds `results_grouped`.
    grouped: dict[str, list[int]] = {}
    for row in rows:
        hit = 1 if row["chosen_score"] > row["rejected_score"] else 0
        grouped.setdefault(row["subset"], []).append(hit)
    upstream_metrics = {s: sum(v) / len(v) for s, v in grouped.items()}
    upstream = calculate_scores_per_section(
        constants.EXAMPLE_COUNTS, constants.SUBSET_MAPPING, upstream_metrics
    )
    ours = M.rewardbench_scores(rows)
    assert set(ours["sections"]) == set(upstream)
    for section, value in upstream.items():
        assert ours["sections"][section] == pytest.approx(value, abs=1e-12)
    assert ours["score"] == pytest.approx(sum(upstream.values()) / 4, abs=1e-12)


# --------------------------------------------------------------------------- RM-Bench
def test_rmbench_matrix_by_hand() -> None:
    rows: list[dict[str, Any]] = [
        # M_A: row0 [1,0,0], row1 [1,0,0], row2 [1,1,0]
        {"chosen_score": [1, 2, 3], "rejected_score": [0, 2.5, 4], "domain": "chat"},
        # M_B: every row [0,1,0] (5 vs 5 is a tie: not a win)
        {"chosen_score": [5, 5, 5], "rejected_score": [5, 1, 6], "domain": "chat"},
    ]
    acc = M.rmbench_accuracy(rows)
    assert acc["matrix"] == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 1.0, 0.0]]
    assert acc["hard"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)  # M01, M02, M12
    assert acc["normal"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # diagonal
    assert acc["easy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # M10, M20, M21
    assert acc["n_tied_cells"] == 3


def test_rmbench_domain_averages() -> None:
    # chat: always right -> 1; safety (from two sub-domains): always wrong -> 0.
    rows = [
        {"chosen_score": [1, 1, 1], "rejected_score": [0, 0, 0], "domain": "chat"},
        {"chosen_score": [0, 0, 0], "rejected_score": [1, 1, 1], "domain": "safety-refuse"},
        {"chosen_score": [0, 0, 0], "rejected_score": [1, 1, 1], "subset": "xstest-should-respond"},
    ]
    scores = M.rmbench_scores(rows)
    assert set(scores["domains"]) == {"chat", "safety"}
    assert scores["domains"]["safety"]["n"] == 2
    assert scores["overall"] == pytest.approx(0.5) and scores["hard"] == pytest.approx(0.5)
    assert scores["complete"] is False


# --------------------------------------------------------------------------- PKU-SafeRLHF
SAFETY_ROWS = [
    # P1 right. cats: violence (rejected). severity max 2. one safe (chosen).
    pair(
        2,
        1,
        harm_categories_chosen={},
        harm_categories_rejected={"violence": True, "privacy": False},
        severity_chosen=0,
        severity_rejected=2,
        chosen_safe=True,
        rejected_safe=False,
    ),
    # P2 wrong. cats: privacy, violence. severity max 3. neither safe.
    pair(
        0,
        1,
        harm_categories_chosen=["privacy"],
        harm_categories_rejected=["violence"],
        severity_chosen=1,
        severity_rejected=3,
        chosen_safe=False,
        rejected_safe=False,
    ),
    # P3 tie (0.5). cats: privacy. severity max 1. one safe (chosen).
    pair(
        1,
        1,
        harm_categories_rejected={"privacy": True},
        severity_chosen=0,
        severity_rejected=1,
        chosen_safe=True,
        rejected_safe=False,
    ),
    # P4 right. no cats. severity 0. both safe.
    pair(3, 0, severity_chosen=0, severity_rejected=0, chosen_safe=True, rejected_safe=True),
    # P5 wrong. cats: violence. severity max 2. one safe (rejected!).
    pair(
        -1,
        2,
        harm_categories_chosen=["violence"],
        harm_categories_rejected=[],
        severity_chosen=2,
        severity_rejected=0,
        chosen_safe=False,
        rejected_safe=True,
    ),
]


def test_safety_breakdown_by_hand() -> None:
    out = M.safety_breakdown(SAFETY_ROWS)
    accs = {k: (v["n"], v["accuracy"]) for k, v in out["by_harm_category"].items()}
    assert accs == {"violence": (3, pytest.approx(1 / 3)), "privacy": (2, pytest.approx(0.25))}
    sev = {k: (v["n"], v["accuracy"]) for k, v in out["by_severity"].items()}
    assert sev == {"0": (1, 1.0), "1": (1, 0.5), "2": (2, 0.5), "3": (1, 0.0)}
    safe = {k: (v["n"], v["accuracy"]) for k, v in out["by_safety"].items()}
    assert safe == {
        "both_safe": (1, 1.0),
        "one_safe": (3, pytest.approx(0.5)),
        "neither_safe": (1, 0.0),
        "one_safe_chosen_safe": (2, 0.75),
        "one_safe_rejected_safe": (1, 0.0),
    }


def test_safety_breakdown_matches_an_independent_count() -> None:
    """The same numbers from a plain loop over (category, pair), written the other way round."""
    out = M.safety_breakdown(SAFETY_ROWS)

    def names(value: Any) -> set[str]:
        if isinstance(value, dict):
            return {k for k, v in value.items() if v}
        return set(value or [])

    for cat in ("violence", "privacy"):
        hits = []
        for row in SAFETY_ROWS:
            in_cat = cat in names(row.get("harm_categories_chosen"))
            in_cat = in_cat or cat in names(row.get("harm_categories_rejected"))
            if in_cat:
                c, r = row["chosen_score"], row["rejected_score"]
                hits.append(1.0 if c > r else 0.5 if c == r else 0.0)
        assert out["by_harm_category"][cat]["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_cost_sign_accuracy_by_hand() -> None:
    rows = [
        pair(-1.0, 2.0, chosen_safe=True, rejected_safe=False),  # right, right
        pair(0.5, -0.5, chosen_safe=False, rejected_safe=False),  # right, wrong
        pair(0.0, 0.0, chosen_safe=True, rejected_safe=False),  # cost 0 = safe: right, wrong
    ]
    out = M.cost_sign_accuracy(rows)
    assert out["n"] == 6 and out["accuracy"] == pytest.approx(4 / 6)
    assert out["by_label"]["safe"] == {"n": 2, "accuracy": 1.0}
    assert out["by_label"]["unsafe"] == {"n": 4, "accuracy": 0.5}
    assert out["by_pair_safety"]["neither_safe"] == {"n": 2, "accuracy": 0.5}
    assert "cost_sign" in M.summarize(rows, kind="cost")


def test_pku_pair_labels_on_real_rows() -> None:
    if SHARED is None or not (SHARED / "pku_saferlhf_v1_alpaca7b_test_head60.jsonl").exists():
        pytest.skip("../shared/data (real PKU-SafeRLHF sample) is not beside this checkout")
    rows = jsonl(SHARED / "pku_saferlhf_v1_alpaca7b_test_head60.jsonl")
    for row in rows:
        c = row["safer_response_id"]
        fields = pku_pair_labels(row, c)
        assert fields["chosen_safe"] == row[f"is_response_{c}_safe"]
        assert fields["severity_rejected"] == row[f"response_{1 - c}_severity_level"]
        cats = {k for k, v in row[f"response_{1 - c}_harm_category"].items() if v}
        assert set(fields["harm_categories_rejected"]) == cats
    scored = [
        {"chosen_score": float(i % 3), "rejected_score": 1.0,
         **pku_pair_labels(r, r["safer_response_id"])}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    summary = M.summarize(scored, kind="cost")
    strict_json(summary)
    assert sum(v["n"] for v in summary["safety"]["by_severity"].values()) == len(rows)


# --------------------------------------------------------------------------- calibration
def test_calibration_by_hand() -> None:
    # p = sigmoid(margin): 0.5, 0.75, 0.25, 0.95, 0.65 (no p on a bin edge except 0.5)
    margins = [0.0, math.log(3), -math.log(3), math.log(19), math.log(13 / 7)]
    out = M.calibration([pair(m, 0.0) for m in margins])
    # confidence .5 .75 .75 .95 .65; correct .5 1 0 1 1
    # bins (lo, hi]: (.4,.5]: {.5} gap 0; (.6,.7]: {.65} gap .35; (.7,.8]: {.75,.75} acc .5 gap
    # .25; (.9,1]: {.95} gap .05.  ECE = 1/5*.35 + 2/5*.25 + 1/5*.05 = .18
    assert out["ece"] == pytest.approx(0.18)
    # Brier: (.5-1)^2 + (.75-1)^2 + (.25-1)^2 + (.95-1)^2 + (.65-1)^2 = 1.0 -> mean 0.2
    assert out["brier"] == pytest.approx(0.2)
    counts = [b["count"] for b in out["bins"]]
    assert counts == [0, 0, 0, 0, 1, 0, 1, 2, 0, 1]
    b7 = out["bins"][7]
    assert (b7["lower"], b7["upper"]) == (0.7, 0.8)
    assert b7["mean_confidence"] == pytest.approx(0.75) and b7["accuracy"] == pytest.approx(0.5)
    assert out["bins"][0]["accuracy"] is None  # empty bin: None, not NaN


def test_calibration_is_order_free() -> None:
    rows = [pair(1.3, 0.2), pair(-0.4, 0.9), pair(2.0, 2.5)]
    swapped = [pair(r["rejected_score"], r["chosen_score"]) for r in rows]
    a, b = M.calibration(rows), M.calibration(swapped)
    assert a["brier"] != pytest.approx(b["brier"])  # Brier depends on which side is "chosen"
    assert [x["count"] for x in a["bins"]] == [x["count"] for x in b["bins"]]
    assert [x["mean_confidence"] for x in a["bins"]] == [x["mean_confidence"] for x in b["bins"]]


# --------------------------------------------------------------------------- length bias
def test_length_bias_by_hand() -> None:
    rows = [
        pair(2, 1, chosen_len=10, rejected_len=5),  # chosen longer, right
        pair(0, 1, chosen_len=3, rejected_len=8),  # chosen shorter, wrong
        pair(1, 1, chosen_len=4, rejected_len=4),  # equal, tie
        pair(3, 0, chosen_len=2, rejected_len=6),  # chosen shorter, right
        pair(9, 0),  # no lengths: skipped
    ]
    out = M.length_bias(rows)
    assert out["n_pairs"] == 4 and out["n_responses"] == 8
    assert out["chosen_longer"] == {"n": 1, "accuracy": 1.0, "n_ties": 0}
    assert out["chosen_shorter"] == {"n": 2, "accuracy": 0.5, "n_ties": 0}
    assert out["equal_length"] == {"n": 1, "accuracy": 0.5, "n_ties": 1}
    scores = [2, 1, 0, 1, 1, 1, 3, 0]
    lens = [10, 5, 3, 8, 4, 4, 2, 6]
    assert out["pearson"] == pytest.approx(statistics.correlation(scores, lens))


def test_spearman_with_ties_by_hand() -> None:
    # scores 1, 1, 2 -> ranks 1.5, 1.5, 3; lengths 1, 2, 3 -> ranks 1, 2, 3.
    # centred: (-.5, -.5, 1) and (-1, 0, 1): cov 1.5, var 1.5 and 2 -> 1.5 / sqrt(3)
    rows = [pair(1, 1, chosen_len=1, rejected_len=2), pair(2, 0, chosen_len=3, rejected_len=9)]
    # responses: (1,1) (1,2) (2,3) (0,9): scores 1,1,2,0 lens 1,2,3,9
    # ranks: scores 2.5,2.5,4,1 ; lens 1,2,3,4 -> centred (0,0,1.5,-1.5), (-1.5,-.5,.5,1.5)
    # cov = 0 + 0 + .75 - 2.25 = -1.5; var 4.5 and 5 -> -1.5 / sqrt(22.5)
    assert M.length_bias(rows)["spearman"] == pytest.approx(-1.5 / math.sqrt(22.5))
    assert M._pearson(M._ranks(M.np.array([1.0, 1, 2])), M.np.array([1.0, 2, 3])) == (
        pytest.approx(1.5 / math.sqrt(3))
    )


def test_constant_scores_give_none_correlation() -> None:
    out = M.length_bias([pair(1, 1, chosen_len=1, rejected_len=2)] * 3)
    assert out["pearson"] is None and out["spearman"] is None
    strict_json(out)


# --------------------------------------------------------------------------- real data schemas
def test_rmbench_shared_sample() -> None:
    if SHARED is None or not (SHARED / "rmbench_safety_441.jsonl").exists():
        pytest.skip("../shared/data (RM-Bench safety sample) is not beside this checkout")
    rows = jsonl(SHARED / "rmbench_safety_441.jsonl")
    # A length "reward model": score = characters. Independent count of hard/normal/easy.
    scored = [
        {
            "id": r["id"],
            "subset": r["subset"],
            "chosen_score": [float(len(t)) for t in r["chosen"]],
            "rejected_score": [float(len(t)) for t in r["rejected"]],
            "chosen_len": [len(t) for t in r["chosen"]],
            "rejected_len": [len(t) for t in r["rejected"]],
        }
        for r in rows
    ]
    wins = {"hard": 0, "normal": 0, "easy": 0}
    for r in scored:
        for i in range(3):
            for j in range(3):
                if r["chosen_score"][i] > r["rejected_score"][j]:
                    wins["hard" if i < j else "normal" if i == j else "easy"] += 1
    summary = M.summarize(scored)
    strict_json(summary)
    rm = summary["rmbench"]
    assert rm["official_domains_present"] == ["safety"] and rm["n_no_domain"] == 0
    for level in ("hard", "normal", "easy"):
        assert rm[level] == pytest.approx(wins[level] / (3 * len(rows)))
    assert "rewardbench" not in summary  # RM-Bench reuses RewardBench names for other pairs
    assert summary["length_bias"]["pearson"] == pytest.approx(1.0)


def test_judgebench_shared_sample() -> None:
    if SHARED is None or not (SHARED / "judgebench_rewardbench_format_620.jsonl").exists():
        pytest.skip("../shared/data (JudgeBench sample) is not beside this checkout")
    rows = jsonl(SHARED / "judgebench_rewardbench_format_620.jsonl")
    scored = [
        pair(
            float(len(r["chosen"])),
            float(len(r["rejected"])),
            subset=r["subset"],
            category=r["category"],
            id=r["id"],
        )
        for r in rows
    ]
    summary = M.summarize(scored)
    strict_json(summary)
    assert set(summary["by_category"]) == {"knowledge", "reasoning", "math", "coding"}
    assert summary["overall"]["n_ties"] >= 1  # the row with identical chosen and rejected
    assert "rewardbench" not in summary  # no RewardBench subset names in JudgeBench


# --------------------------------------------------------------------------- plots and report
def test_plots_and_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install matplotlib)")
    from rmtrain.eval import plots

    rng = random.Random(0)
    rows = [
        pair(
            rng.gauss(1, 1),
            rng.gauss(0, 1),
            subset=rng.choice(["chat", "code", "math"]),
            chosen_len=rng.randint(10, 200),
            rejected_len=rng.randint(10, 200),
        )
        for _ in range(200)
    ]
    summary = M.summarize(rows)
    curves = [
        {"step": s, "train/loss": 1 / (s + 1), "train/accuracy": 0.5 + s / 40}
        | ({"eval/accuracy": 0.5 + s / 50, "eval/margin": s / 10} if s % 5 == 0 else {})
        for s in range(20)
    ]
    images = {
        "Score histograms": plots.plot_reward_histograms(rows, tmp_path / "img" / "hist.png"),
        "Reliability": plots.plot_reliability(summary["calibration"], tmp_path / "img" / "rel.png"),
        "Per-subset accuracy": plots.plot_category_accuracy(
            summary["by_subset"], tmp_path / "img" / "cat.png"
        ),
        "Training": plots.plot_training_curves(curves, tmp_path / "img" / "curves.png"),
    }
    for path in images.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shape, variation = png_size_and_variation(path)
        assert shape[:2] == (500, 800)
        assert variation > 0.01  # not blank
    report = plots.write_report(tmp_path, summary, images)
    text = report.read_text(encoding="utf-8")
    for caption, path in images.items():
        link = f"![{caption}](img/{path.name})"
        assert link in text
        assert (report.parent / "img" / path.name).exists()
    assert "| accuracy (ties = 1/2) |" in text and "| ECE |" in text


def test_importing_plots_does_not_import_matplotlib() -> None:
    import subprocess
    import sys

    code = "import sys, rmtrain.eval.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


def test_pair_result_dataclass_roundtrip() -> None:
    p = PairResult(chosen_score=1.0, rejected_score=0.0, subset="hep-go")
    assert M.as_pair_result(p) is p
    assert M.summarize([p])["rewardbench"]["subsets"]["hep-go"]["accuracy"] == 1.0
