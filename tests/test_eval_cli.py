"""`rmtrain eval` end to end on an export (issue 12): the real RewardBench-format and RM-Bench
samples, RewardBench section scores against the rewardbench package's own computation on the
same per-pair results, PKU-SafeRLHF per-category / per-severity accuracy against a hand count, and
the PNGs and report it writes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SHARED_DATA,
    load_upstream_rewardbench,
    make_export,
    png_size_and_variation,
    read_jsonl,
    write_jsonl,
)

from rmtrain.eval.run import main
from rmtrain.toy.sample_data import generate_rows


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("export") / "export", "safe_rlhf", seed=5)


def _eval(export: Path, data: Path, out: Path, capsys: Any, *extra: str) -> tuple[dict, str]:
    main(["--model", str(export), "--data", str(data), "--out", str(out), "--no-progress",
          *extra])  # fmt: skip
    name = data.name.removesuffix(".jsonl")
    return json.loads((out / "eval" / f"{name}.json").read_text()), capsys.readouterr().out


ROWS_PER_SUBSET = 4  # of the real files' rows: every subset, a fraction of the scoring time


@pytest.mark.parametrize(
    ("name", "rows"),
    [("judgebench_rewardbench_format_620.jsonl", 620), ("rmbench_safety_441.jsonl", 441)],
)
def test_real_benchmark_files_give_per_subset_accuracy(
    export, tmp_path, capsys, name, rows
) -> None:
    full = SHARED_DATA / name
    if not full.exists():
        pytest.skip(f"real benchmark sample not found at {full}")
    lines = [line for line in full.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == rows
    # the first ROWS_PER_SUBSET rows of every subset, verbatim and in file order
    kept: list[str] = []
    seen: dict[str, int] = {}
    for line in lines:
        subset = json.loads(line)["subset"]
        seen[subset] = seen.get(subset, 0) + 1
        if seen[subset] <= ROWS_PER_SUBSET:
            kept.append(line)
    data = tmp_path / "data" / name
    data.parent.mkdir()
    data.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    summary, printed = _eval(
        export, data, tmp_path, capsys, "--batch-size", "16", "--max-length", "96"
    )
    subsets = set(seen)  # all of the full file's subsets
    assert len(subsets) > 1 and len(kept) == ROWS_PER_SUBSET * len(subsets)
    assert set(summary["by_subset"]) == subsets
    for subset in subsets:
        assert f"  {subset[:30]}" in printed
    if name.startswith("rmbench"):
        assert {"hard", "normal", "easy"} <= set(summary["rmbench"])
        assert summary["n_pairs"] == len(kept) * 3  # the same-style comparisons
    pairs = read_jsonl(tmp_path / "eval" / f"{name.removesuffix('.jsonl')}.pairs.jsonl")
    assert len(pairs) == len(kept)


def test_rewardbench_sections_equal_the_packages_computation(export, tmp_path, capsys) -> None:
    constants, calculate_scores_per_section = load_upstream_rewardbench()
    rng = random.Random(0)
    words = ["rice", "bread", "tea", "soup", "salt", "water", "wait", "boil", "stir", "taste"]
    rows = []
    for subset in constants.EXAMPLE_COUNTS:
        for i in range(3):
            prompt = f"How do I make {rng.choice(words)}?"
            chosen = " ".join(rng.choices(words, k=rng.randint(2, 9)))
            rejected = " ".join(rng.choices(words, k=rng.randint(2, 9)))
            rows.append({"id": f"{subset}-{i}", "subset": subset, "prompt": prompt,
                         "chosen": chosen, "rejected": rejected})  # fmt: skip
    data = write_jsonl(tmp_path / "rewardbench.jsonl", rows)
    summary, _ = _eval(export, data, tmp_path, capsys)
    pairs = read_jsonl(tmp_path / "eval" / "rewardbench.pairs.jsonl")
    grouped: dict[str, list[int]] = {}  # as rewardbench's scripts/run_rm.py counts
    for p in pairs:
        grouped.setdefault(p["subset"], []).append(int(p["chosen_score"] > p["rejected_score"]))
    upstream = calculate_scores_per_section(
        constants.EXAMPLE_COUNTS, constants.SUBSET_MAPPING,
        {s: sum(v) / len(v) for s, v in grouped.items()},
    )  # fmt: skip
    for section, value in upstream.items():
        assert summary["rewardbench"]["sections"][section] == pytest.approx(value, abs=1e-12)


def test_pku_breakdowns_equal_a_hand_count(export, tmp_path, capsys) -> None:
    rows = generate_rows(80, seed=11, split="test")
    data = write_jsonl(tmp_path / "pku.jsonl", rows)
    summary, _ = _eval(export, data, tmp_path, capsys)
    pairs = read_jsonl(tmp_path / "eval" / "pku.pairs.jsonl")
    assert len(pairs) == 80
    # an independent count from the per-pair file: credit 1 / 0.5 (tie) / 0

    def credit(p: dict) -> float:
        c, r = p["chosen_score"], p["rejected_score"]
        return 1.0 if c > r else 0.5 if c == r else 0.0

    by_severity: dict[int, list[float]] = {}
    by_category: dict[str, list[float]] = {}
    for p, row in zip(pairs, rows, strict=True):
        severity = max(row["response_0_severity_level"], row["response_1_severity_level"])
        by_severity.setdefault(severity, []).append(credit(p))
        names = {n for k in (0, 1) for n, f in row[f"response_{k}_harm_category"].items() if f}
        for name in names:
            by_category.setdefault(name, []).append(credit(p))
    safety = summary["safety"]
    for severity, credits in by_severity.items():
        got = safety["by_severity"][str(severity)]
        assert got["n"] == len(credits)
        assert got["accuracy"] == pytest.approx(sum(credits) / len(credits))
    assert set(safety["by_harm_category"]) == set(by_category)
    for name, credits in by_category.items():
        assert safety["by_harm_category"][name]["accuracy"] == pytest.approx(
            sum(credits) / len(credits)
        )


def test_writes_pngs_and_a_report(export, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "pku.jsonl", generate_rows(40, seed=2, split="test"))
    _eval(export, data, tmp_path, capsys)
    figures = tmp_path / "eval" / "pku"
    report = (figures / "report.md").read_text()
    for png in ("histograms.png", "reliability.png", "categories.png"):
        shape, variation = png_size_and_variation(figures / png)
        assert shape[:2] == (500, 800) and variation > 0.01, png
        assert f"]({png})" in report


def test_bad_row_is_one_clear_error(export, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(export), "--data", str(data), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert f"{data}: row 1: field 'rejected': missing" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(export, tmp_path, capsys) -> None:
    """`torchrun --nproc_per_node 2 -m rmtrain.eval.run`: each process scores half the texts,
    and the files rank 0 writes equal a single process's."""
    import subprocess
    import sys

    from conftest import cli_env

    data = write_jsonl(tmp_path / "pku.jsonl", generate_rows(30, seed=3, split="test"))
    one, two = tmp_path / "one", tmp_path / "two"
    single, _ = _eval(export, data, one, capsys)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "rmtrain.eval.run", "--model", str(export), "--data", str(data), "--out", str(two),
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pairs ->") == 1  # only rank 0 prints and writes
    double = json.loads((two / "eval" / "pku.json").read_text())
    assert _overall(double) == pytest.approx(_overall(single))
    a, b = (
        read_jsonl(one / "eval" / "pku.pairs.jsonl"),
        read_jsonl(two / "eval" / "pku.pairs.jsonl"),
    )
    scores = [[r[k] for r in rows for k in ("chosen_score", "rejected_score")] for rows in (a, b)]
    assert scores[1] == pytest.approx(scores[0], abs=1e-5)


def _overall(summary: dict[str, Any]) -> dict[str, Any]:
    """The overall block (flat, so pytest.approx can compare it) and the pair count."""
    return {**summary["overall"], "n_pairs": summary["n_pairs"]}
