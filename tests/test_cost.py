"""objective=cost at the data level, on hand-written PKU-SafeRLHF v1 rows, and its CLI checks.

The cost pair's chosen side is the SAFER response (``safer_response_id``), the rejected side the
less safe one; ``chosen_unsafe`` / ``rejected_unsafe`` carry ``not is_response_k_safe`` into the
sign terms. Loss values and ``pair_metrics`` sign accuracy are tested in test_losses.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import train_in_process, write_jsonl

from rmtrain.config import DataConfig
from rmtrain.data.pairs import build_pairs
from rmtrain.data.sources import load_rows
from rmtrain.errors import DataError
from rmtrain.text import format_text
from rmtrain.toy.sample_data import HARM_CATEGORIES, generate_rows
from rmtrain.toy.tokenizer import build_tiny_tokenizer

PROMPT = "How do I bake bread at home?"


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


def row(safe: tuple[bool, bool], severity: tuple[int, int], safer: int, tag: str) -> dict[str, Any]:
    """One v1 row; response k reads '<tag> k' (plus a harmful phrase when unsafe)."""
    responses = [
        f"{tag} {k}: knead the dough." + ("" if safe[k] else " Also, steal the flour.")
        for k in (0, 1)
    ]
    harm = [{c: (not safe[k]) and c == "Economic Crime" for c in HARM_CATEGORIES} for k in (0, 1)]
    return {
        "prompt": PROMPT,
        "response_0": responses[0],
        "response_1": responses[1],
        "prompt_source": "test",
        "response_0_source": "test",
        "response_1_source": "test",
        "is_response_0_safe": safe[0],
        "is_response_1_safe": safe[1],
        "response_0_harm_category": harm[0],
        "response_1_harm_category": harm[1],
        "response_0_severity_level": severity[0],
        "response_1_severity_level": severity[1],
        "better_response_id": 1 - safer,  # disagrees with safer: the preference must matter
        "safer_response_id": safer,
        "response_0_sha256": "0" * 64,
        "response_1_sha256": "1" * 64,
    }


# (name, safe, severity, safer_response_id) and the expected (chosen_unsafe, rejected_unsafe).
CASES: list[tuple[str, tuple[bool, bool], tuple[int, int], int, tuple[bool, bool]]] = [
    ("mixed-a", (True, False), (0, 2), 0, (False, True)),
    ("mixed-b", (False, True), (3, 0), 1, (False, True)),
    ("both-safe", (True, True), (0, 0), 1, (False, False)),
    ("both-unsafe-gap", (False, False), (3, 1), 1, (True, True)),
    ("both-unsafe-tie", (False, False), (2, 2), 0, (True, True)),
]
# A row whose safer_response_id points at the unsafe response while the other one is safe.
INCONSISTENT = row((True, False), (0, 1), 1, "bad")


def _write(directory: Path, rows: list[dict[str, Any]]) -> Path:
    return write_jsonl(directory / "train.jsonl", rows)


def _pairs(directory: Path, tok: Any, **kw: Any) -> tuple[Any, Any]:
    cfg = DataConfig(path=str(directory), preference="safer", **kw)
    return build_pairs(load_rows(cfg, "train"), cfg, tok, objective="cost")


def _ids(tok: Any, response: str) -> list[int]:
    return list(tok(format_text(tok, "safe_rlhf", PROMPT, response))["input_ids"])


def test_cost_pairs_keep_both_safe_and_both_unsafe(tmp_path: Path, tok: Any) -> None:
    rows = [row(safe, sev, safer, name) for name, safe, sev, safer, _ in CASES]
    _write(tmp_path, rows)
    pairs, stats = _pairs(tmp_path, tok)
    assert (stats.rows, stats.pairs, stats.inconsistent_skipped, stats.severity_filtered) == (
        5,
        5,
        0,
        0,
    )
    for p, r, (name, _, sev, safer, labels) in zip(pairs, rows, CASES, strict=True):
        assert (p["chosen_unsafe"], p["rejected_unsafe"]) == labels, name
        assert p["chosen_input_ids"] == _ids(tok, r[f"response_{safer}"]), name
        assert p["rejected_input_ids"] == _ids(tok, r[f"response_{1 - safer}"]), name
        assert (p["chosen_severity"], p["rejected_severity"]) == (sev[safer], sev[1 - safer])
        assert abs(p["chosen_severity"] - p["rejected_severity"]) == abs(sev[0] - sev[1])
    # The cost pair never has an unsafe chosen (safer) side against a safe rejected side.
    assert not any(p["chosen_unsafe"] and not p["rejected_unsafe"] for p in pairs)


def test_inconsistent_labels_error_names_row_and_field(tmp_path: Path, tok: Any) -> None:
    rows = [row(safe, sev, safer, name) for name, safe, sev, safer, _ in CASES]
    rows.insert(3, INCONSISTENT)  # line 4
    path = _write(tmp_path, rows)
    expected = (
        rf"^{path}: row 4: field 'safer_response_id': points at response_1, which is unsafe, "
        r"while response_0 is safe \(set data.inconsistent_labels=skip"
    )
    with pytest.raises(DataError, match=expected):
        _pairs(tmp_path, tok)
    with pytest.raises(DataError, match=expected):
        _pairs(tmp_path, tok, inconsistent_labels="error")


def test_inconsistent_labels_skip_is_counted(tmp_path: Path, tok: Any) -> None:
    rows = [row(safe, sev, safer, name) for name, safe, sev, safer, _ in CASES]
    rows[1:1] = [INCONSISTENT, INCONSISTENT | {"prompt": "Another prompt?"}]
    _write(tmp_path, rows)
    pairs, stats = _pairs(tmp_path, tok, inconsistent_labels="skip")
    assert (stats.rows, stats.pairs) == (7, 5)
    assert (stats.inconsistent_skipped, stats.severity_filtered) == (2, 0)
    assert [(p["chosen_unsafe"], p["rejected_unsafe"]) for p in pairs] == [c[4] for c in CASES]
    assert stats.as_dict("data/train/")["data/train/inconsistent_skipped"] == 2


@pytest.mark.parametrize(
    ("gap", "kept"),
    [
        (0, ["mixed-a", "mixed-b", "both-safe", "both-unsafe-gap", "both-unsafe-tie"]),
        (1, ["mixed-a", "mixed-b", "both-unsafe-gap"]),  # gaps 2, 3, 2
        (3, ["mixed-b"]),
    ],
)
def test_min_severity_gap_filters_and_counts(
    tmp_path: Path, tok: Any, gap: int, kept: list[str]
) -> None:
    rows = [row(safe, sev, safer, name) for name, safe, sev, safer, _ in CASES]
    rows.append(INCONSISTENT)  # gap 1: an inconsistent row is counted once, as inconsistent
    _write(tmp_path, rows)
    pairs, stats = _pairs(tmp_path, tok, inconsistent_labels="skip", min_severity_gap=gap)
    names = {name: k for k, (name, *_) in enumerate(CASES)}
    assert pairs["chosen_input_ids"] == [
        _ids(tok, rows[names[n]][f"response_{CASES[names[n]][3]}"]) for n in kept
    ]
    assert stats.inconsistent_skipped == 1
    assert stats.severity_filtered == len(CASES) - len(kept)
    assert stats.pairs + stats.inconsistent_skipped + stats.severity_filtered == len(CASES) + 1
    assert stats.rows == len(CASES) + 1
    assert all(abs(p["chosen_severity"] - p["rejected_severity"]) >= gap for p in pairs)


# --------------------------------------------------------------------------- CLI


def test_cli_cost_with_better_preference_fails_before_training(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    code, stderr = train_in_process(
        ["objective=cost", "data.preference=better", f"output_dir={run_dir}"], capsys, monkeypatch
    )
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rmtrain: error:"), stderr[-2000:]
    assert "objective=cost" in last and "data.preference=safer" in last
    assert "Traceback" not in stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_cli_cost_inconsistent_row_fails_with_its_line(tmp_path: Path, capsys, monkeypatch) -> None:
    rows = generate_rows(12, seed=4)
    rows.insert(5, INCONSISTENT)  # line 6
    data = tmp_path / "data"
    path = _write(data, rows)
    (data / "test.jsonl").write_text(path.read_text())
    run_dir = tmp_path / "run"
    code, stderr = train_in_process(
        [
            "objective=cost",
            "data.preference=safer",
            f"data.path={data}",
            "logger=none",
            f"output_dir={run_dir}",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"rmtrain: error: {path}: row 6: field 'safer_response_id'"), last
    assert "data.inconsistent_labels=skip" in last
    assert not (run_dir / "metrics.jsonl").exists()
